"""The host's identity: its name and a UUID that stays the same across restarts.

Migration uses the UUID to tell hosts apart (a migration to the same host is
refused), like libvirt's ``host_uuid``.  The first start writes
``host.json``; the ``[host]`` section of the config file may override either
value without the file being changed, so removing the override restores the
persisted identity.

A corrupt or unreadable ``host.json`` does not stop the daemon (every guest
on the host would become unmanageable): it is moved aside to
``host.json.corrupt-<time>``, a UUID still legible in it is kept, and only
when none is does the host get a new UUID.  Either way an ERROR is logged
naming the file kept aside; to keep an old UUID that was lost, set
``[host] uuid`` in the config file.
"""

from __future__ import annotations

import logging
import re
import socket
import uuid
from dataclasses import dataclass

from vmferry.daemon.config import DaemonConfig
from vmferry.daemon.state import StateDir
from vmferry.errors import ErrorCode, VmferryError

log = logging.getLogger(__name__)

_UUID_RE = re.compile(rb"[0-9a-fA-F]{8}-(?:[0-9a-fA-F]{4}-){3}[0-9a-fA-F]{12}")


@dataclass
class HostIdentity:
    hostname: str
    uuid: str


def _parse(state: StateDir, data: object) -> HostIdentity:
    problem = f"{state.host_file} is invalid"
    if not isinstance(data, dict):
        raise VmferryError(ErrorCode.INTERNAL_ERROR, f"{problem}: not a JSON object")
    hostname, host_uuid = data.get("hostname"), data.get("uuid")
    try:
        if not isinstance(hostname, str) or not hostname or not isinstance(host_uuid, str):
            raise ValueError
        host_uuid = str(uuid.UUID(host_uuid))
    except ValueError:
        raise VmferryError(
            ErrorCode.INTERNAL_ERROR,
            f'{problem}: it needs a non-empty "hostname" and a "uuid"',
        ) from None
    return HostIdentity(hostname=hostname, uuid=host_uuid)


def _salvage_uuid(state: StateDir) -> str | None:
    """The single UUID still legible in a corrupt host.json, if there is exactly one."""
    try:
        raw = state.host_file.read_bytes()[:65536]
    except OSError:
        return None
    found = {m.decode().lower() for m in _UUID_RE.findall(raw)}
    return found.pop() if len(found) == 1 else None


def _replace_corrupt(state: StateDir, err: VmferryError) -> HostIdentity:
    salvaged = _salvage_uuid(state)
    aside = state.move_aside(state.host_file)
    identity = HostIdentity(hostname=socket.gethostname(), uuid=salvaged or str(uuid.uuid4()))
    state.write_json(state.host_file, {"hostname": identity.hostname, "uuid": identity.uuid})
    kept = aside or "nowhere (rename failed)"
    if salvaged:
        log.error("%s; kept its host UUID %s, moved the file to %s", err.message, salvaged, kept)
    else:
        log.error(
            "%s; moved it to %s and generated a NEW host UUID %s: if this host had another "
            "one, set [host] uuid to it in the config file",
            err.message,
            kept,
            identity.uuid,
        )
    return identity


def load_or_create_host_identity(state: StateDir, config: DaemonConfig) -> HostIdentity:
    """
    Read ``host.json``, writing it with a new UUID on first start; apply config overrides.

    A corrupt or unreadable file is replaced (see the module docstring),
    never silently: the old file is kept aside and the change is logged.
    """
    try:
        data = state.read_json(state.host_file)
        identity = None if data is None else _parse(state, data)
    except VmferryError as err:
        identity = _replace_corrupt(state, err)
    if identity is None:
        identity = HostIdentity(hostname=socket.gethostname(), uuid=str(uuid.uuid4()))
        state.write_json(state.host_file, {"hostname": identity.hostname, "uuid": identity.uuid})
    if config.host.hostname:
        identity.hostname = config.host.hostname
    if config.host.uuid:
        identity.uuid = str(uuid.UUID(config.host.uuid))
    return identity
