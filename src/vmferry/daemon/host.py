"""The host's identity: its name and a UUID that stays the same across restarts.

Migration uses the UUID to tell hosts apart (a migration to the same host is
refused), like libvirt's ``host_uuid``.  The first start writes
``host.json``; the ``[host]`` section of the config file may override either
value without the file being changed, so removing the override restores the
persisted identity.
"""

from __future__ import annotations

import socket
import uuid
from dataclasses import dataclass

from vmferry.daemon.config import DaemonConfig
from vmferry.daemon.state import StateDir
from vmferry.errors import ErrorCode, VmferryError


@dataclass
class HostIdentity:
    hostname: str
    uuid: str


def _parse(state: StateDir, data: object) -> HostIdentity:
    problem = f"{state.host_file} is invalid"
    if not isinstance(data, dict):
        raise VmferryError(ErrorCode.INTERNAL_ERROR, f"{problem}: remove it to create a new one")
    hostname, host_uuid = data.get("hostname"), data.get("uuid")
    try:
        if not isinstance(hostname, str) or not hostname or not isinstance(host_uuid, str):
            raise ValueError
        host_uuid = str(uuid.UUID(host_uuid))
    except ValueError:
        raise VmferryError(
            ErrorCode.INTERNAL_ERROR,
            f'{problem} (needs a non-empty "hostname" and a "uuid"): '
            "fix it, or remove it to create a new host UUID",
        ) from None
    return HostIdentity(hostname=hostname, uuid=host_uuid)


def load_or_create_host_identity(state: StateDir, config: DaemonConfig) -> HostIdentity:
    """
    Read ``host.json``, writing it with a new UUID on first start; apply config overrides.

    :raise VmferryError: ``INTERNAL_ERROR`` if ``host.json`` is corrupt
        (a silently new UUID would make this a different host).
    """
    data = state.read_json(state.host_file)
    if data is None:
        identity = HostIdentity(hostname=socket.gethostname(), uuid=str(uuid.uuid4()))
        state.write_json(state.host_file, {"hostname": identity.hostname, "uuid": identity.uuid})
    else:
        identity = _parse(state, data)
    if config.host.hostname:
        identity.hostname = config.host.hostname
    if config.host.uuid:
        identity.uuid = str(uuid.UUID(config.host.uuid))
    return identity
