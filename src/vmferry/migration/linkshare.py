"""A link that migrations take turns on: one sends at the full link, the next waits ready.

The evacuation drain (issue 9 §3) runs several migrations per link. Set-up
(Begin, the destination's Prepare and QEMU) and the end (Finish, Confirm)
move no memory, and two pre-copies sharing a link each re-send more of what
their guests dirty than one after the other would. So a :class:`Link` lets
its migrations set up together but gates the memory: at most ``senders`` (1)
send at once, in the order they arrived, each at ``link / senders``; the
next one is set up and waiting when the previous stops sending, so the link
never idles between migrations and no guest converges at less than the link.

The source's perform step calls :func:`admit` right before QEMU's ``migrate``,
everything else set up (it may wait there for its turn), and :func:`release`
when QEMU is done, whatever the outcome; a migration with no link assigned
(:func:`assign`) runs at once with its own cap. A sender leaves its link as
soon as QEMU's event says the stream is over (``completed`` or failed), not
after the final statistics and the policy's report: the next one's ``migrate``
then overlaps the Finish and Confirm, which move nothing. Not earlier, at the
switchover (``device``): QEMU sends the last dirty pages and the device state
uncapped then, while the guest is stopped, and a new stream at the full link
beside them would lengthen that downtime on a real link.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable

from vmferry.migration.params import MigrationParams
from vmferry.qemu.domain import QemuDomain
from vmferry.qemu.migration_status import TERMINAL
from vmferry.qemu.monitor import Monitor

log = logging.getLogger(__name__)
MIB = 1 << 20
# QEMU statuses in which a migration sends nothing any more.
_SWITCHED = TERMINAL
# How often a migration waiting for its turn looks whether it was aborted.
_ABORT_POLL_S = 0.25


class Link:
    """One link's bandwidth, given in turns to the migrations that want to send on it."""

    def __init__(
        self, name: str, bandwidth_mib_s: int, changed: asyncio.Event | None = None
    ) -> None:
        self.name = name
        self.bandwidth_mib_s = max(1, bandwidth_mib_s)
        self.senders = 1
        self.sending: dict[str, QemuDomain] = {}  # by domain UUID
        self.waiting: list[str] = []  # domain UUIDs, first come first served
        #: Domains whose migration stopped sending (it finishes elsewhere now).
        self.left: set[str] = set()
        #: When each domain's turn came and when it left the link (time.time()), by UUID.
        self.turns: dict[str, tuple[float, float]] = {}
        #: Set whenever a migration is set up or stops sending: the drain may set up another.
        self.changed = changed if changed is not None else asyncio.Event()
        self._turn = asyncio.Condition()

    def ready(self, uuid: str) -> bool:
        """Whether *uuid*'s migration is done setting up (it waits, sends, or has sent)."""
        return uuid in self.waiting or uuid in self.sending or uuid in self.left

    def share(self) -> int:
        """MiB/s a migration sends at."""
        return max(1, self.bandwidth_mib_s // self.senders)

    async def join(self, dom: QemuDomain, aborted: Callable[[], bool] = lambda: False) -> int:
        """Wait for *dom*'s turn to send; its cap. Returns early (0) if *aborted* says so."""
        async with self._turn:
            self.waiting.append(dom.uuid)
            self.changed.set()  # set up: the drain may set up the next one
            try:
                while not self._my_turn(dom.uuid):
                    if aborted():
                        return 0
                    with contextlib.suppress(TimeoutError):
                        await asyncio.wait_for(self._turn.wait(), _ABORT_POLL_S)
            finally:
                self.waiting.remove(dom.uuid)
            self.sending[dom.uuid] = dom
            self.turns[dom.uuid] = (time.time(), 0.0)
            self._turn.notify_all()  # the next in line may be the head now
            return self.share()

    def _my_turn(self, uuid: str) -> bool:
        return len(self.sending) < self.senders and self.waiting[0] == uuid

    async def leave(self, dom: QemuDomain) -> None:
        """*dom* stopped sending: the next in line goes."""
        async with self._turn:
            if self.sending.pop(dom.uuid, None) is None:
                return
            self.left.add(dom.uuid)
            self.turns[dom.uuid] = (self.turns.get(dom.uuid, (0.0, 0.0))[0], time.time())
            self._turn.notify_all()
        self.changed.set()


# The link each domain's next outgoing migration runs on, by domain UUID.
_ASSIGNED: dict[str, Link] = {}
# The watch that makes a sender leave its link at its switchover, by domain UUID.
_WATCHES: dict[str, asyncio.Task[None]] = {}


def assign(uuid: str, link: Link) -> None:
    """*uuid*'s next outgoing migration takes turns on *link*."""
    _ASSIGNED[uuid] = link


def unassign(uuid: str) -> None:
    _ASSIGNED.pop(uuid, None)


async def admit(dom: QemuDomain, params: MigrationParams, mon: Monitor) -> bool:
    """Right before ``migrate``: wait for *dom*'s turn on its link (False: it has none)."""
    link = _ASSIGNED.get(dom.uuid)
    if link is None:
        return False
    share = await link.join(dom, lambda: dom.job.abort_requested)
    if share:
        _WATCHES[dom.uuid] = asyncio.get_running_loop().create_task(_switchover(link, dom))
    if share and share != params.bandwidth_mib_s:
        await mon.execute("migrate-set-parameters", {"max-bandwidth": share * MIB})
        params.bandwidth_mib_s = share
    return True


async def _switchover(link: Link, dom: QemuDomain) -> None:
    """*dom* leaves *link* once QEMU's stream is over (its event, before the statistics)."""
    await dom.wait_for(lambda: dom.migration.status in _SWITCHED, None)
    log.info("%s switches over: the link to %s goes to the next migration", dom.name, link.name)
    await link.leave(dom)


async def release(dom: QemuDomain) -> None:
    """QEMU is done with *dom*'s memory (or failed): the link's next migration goes."""
    watch = _WATCHES.pop(dom.uuid, None)
    if watch is not None:
        watch.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await watch
    link = _ASSIGNED.get(dom.uuid)
    if link is not None:
        await link.leave(dom)
