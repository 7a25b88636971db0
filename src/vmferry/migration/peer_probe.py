"""Asking the destination daemon where a guest runs (the peer probe).

Used when the outcome of a migration is unknown on the source (Finish's
answer lost, the client gone after Perform, a restart in ``perform3_done``)
and before an automatic post-copy resume. The daemon's
:class:`~vmferry.migration.host.PeerConnector` makes the connection.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from enum import StrEnum
from typing import Any

from vmferry.domain.state import DomainState
from vmferry.errors import ErrorCode, VmferryError
from vmferry.jobs import AsyncJob
from vmferry.migration.host import MigrationHost
from vmferry.qemu.domain import QemuDomain

log = logging.getLogger(__name__)

#: One question to the destination while resolving an interrupted migration.
PEER_PROBE_TIMEOUT_S = 5.0


class PeerAnswer(StrEnum):
    """What the destination daemon says about the guest."""

    ARRIVED = "arrived"  # active there, no incoming job: the migration succeeded
    ABSENT = "absent"  # no such domain, or shut off there: it never took over
    BUSY = "busy"  # still in its incoming job: ask again later
    UNREACHABLE = "unreachable"  # no answer that can be trusted


@dataclass(frozen=True)
class MigrationPeer:
    """Where an outgoing migration went: the destination daemon and the domain's name there."""

    uri: str
    name: str
    host_uuid: str = ""  # from Prepare's cookie: the daemon at *uri* must be that host

    def to_dict(self) -> dict[str, str]:
        return {"uri": self.uri, "name": self.name, "host_uuid": self.host_uuid}

    @classmethod
    def from_dict(cls, data: Any) -> MigrationPeer | None:
        if not isinstance(data, dict) or not data.get("uri") or not data.get("name"):
            return None
        return cls(str(data["uri"]), str(data["name"]), str(data.get("host_uuid", "")))


def classify(state: str, async_job: str, *, same_uuid: bool) -> PeerAnswer:
    """The :class:`PeerAnswer` for the destination domain's *state* and *async_job*."""
    if not same_uuid:
        return PeerAnswer.ABSENT  # a different guest of that name: ours is not there
    if async_job == AsyncJob.MIGRATION_IN:
        return PeerAnswer.BUSY
    if state in (DomainState.RUNNING, DomainState.PAUSED):
        return PeerAnswer.ARRIVED
    return PeerAnswer.ABSENT


async def ask(host: MigrationHost, dom: QemuDomain, peer: MigrationPeer) -> PeerAnswer:
    """Ask *peer*'s daemon once where *dom* is (bounded by :data:`PEER_PROBE_TIMEOUT_S`)."""
    try:
        async with host.peers.connect(peer.uri, timeout=PEER_PROBE_TIMEOUT_S) as conn:
            if peer.host_uuid and (await conn.host()).uuid != peer.host_uuid:
                log.error("%s is no longer host %s: cannot ask it", peer.uri, peer.host_uuid)
                return PeerAnswer.UNREACHABLE
            info = await conn.dominfo(peer.name)
    except VmferryError as err:
        if err.code == ErrorCode.NO_DOMAIN:
            return PeerAnswer.ABSENT
        log.info("asking %s about %s: %s", peer.uri, dom.name, err.message)
        return PeerAnswer.UNREACHABLE
    except OSError as err:
        log.info("asking %s about %s: %s", peer.uri, dom.name, err)
        return PeerAnswer.UNREACHABLE
    return classify(info.state, info.async_job, same_uuid=info.uuid == dom.uuid)


async def answers(host: MigrationHost, peer: MigrationPeer) -> bool:
    """Whether *peer*'s daemon answers now, as the host it was (one short keepalive)."""
    ka = host.keepalive
    timeout = min(PEER_PROBE_TIMEOUT_S, ka.interval) if ka.interval > 0 else 1.0
    try:
        async with host.peers.connect(peer.uri, timeout=timeout) as conn:
            info = await conn.host(request_timeout=timeout)
    except (VmferryError, OSError):
        return False
    return not peer.host_uuid or info.uuid == peer.host_uuid
