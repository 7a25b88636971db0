"""What a daemon that died leaves behind, made by hand for the restart tests.

A bare QEMU started behind the daemon's back (:func:`stray_qemu`) and the
status record of a domain (:func:`write_status`): the tests set up the state
a crash leaves, then start the daemon on it.
"""

from __future__ import annotations

import subprocess
from pathlib import Path
from typing import Any

from vmferry.daemon.state import StateDir
from vmferry.domain.model import DomainDef
from vmferry.domain.xml import format_domain_xml


def stray_qemu(sock: Path, *args: str) -> subprocess.Popen[bytes]:
    """
    A QEMU with no machine, paused, in its own session, whose chardev ``m``
    listens on *sock*; *args* follow (the ``-mon`` on ``m``, a ``-uuid``, ...).
    The caller kills it.
    """
    argv = ["qemu-system-x86_64", "-machine", "none", "-nodefaults", "-display", "none", "-S"]
    argv += ["-chardev", f"socket,id=m,path={sock},server=on,wait=off", *args]
    return subprocess.Popen(argv, start_new_session=True)


def write_status(state_dir: StateDir, definition: DomainDef, /, **fields: Any) -> None:
    """Write the status record of transient *definition*: its name, UUID and XML, then *fields*."""
    record = {
        "name": definition.name,
        "uuid": definition.uuid,
        "persistent": False,
        "job": {},
        "xml": format_domain_xml(definition),
    }
    state_dir.write_json(state_dir.status_path(definition.name), {**record, **fields})
