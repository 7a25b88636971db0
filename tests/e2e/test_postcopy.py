"""Post-copy end to end on real QEMU: the switch, abort refused, a daemon killed, the link cut.

The test guest dirties its memory faster than the migration bandwidth cap, so
pre-copy alone never converges: every migration here completes only because
it switched to post-copy. A post-copy bandwidth cap keeps the post-copy phase
a few seconds long, long enough to break something in the middle of it.

The link-cut cases run each daemon in a network namespace (``tests.netns``)
and cut the veth pair between them mid-post-copy.
"""

from __future__ import annotations

import asyncio
import contextlib
import signal
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import pytest

from tests.netns import NetnsHost, available, netns_hosts, netns_pair
from vmferry.client import AsyncClient, Client
from vmferry.client.migrate import MigrationReport, migrate, migrate_p2p
from vmferry.errors import ErrorCode, VmferryError
from vmferry.failpoints import ENV_VAR
from vmferry.migration import postcopy
from vmferry.migration.flags import MigrateFlags
from vmferry.migration.params import MigrationParams
from vmferry.testguest import Heartbeat, check_continuity, guest_xml
from vmferry.testing import Host, wait_heartbeat

pytestmark = pytest.mark.qemu

POSTCOPY = MigrateFlags.LIVE | MigrateFlags.POSTCOPY
# ~110 MB of the guest's memory is not zero; pre-copy at 32 MiB/s never catches a guest
# re-dirtying its 32 MiB buffer at 64 MiB/s.
GUEST = {"memory_mib": 128, "stamp_mib": 32, "dirty_mib_s": 64, "hb_ms": 200}
BANDWIDTH = 32
#: Keeps post-copy going for a few seconds: room to break things in the middle.
SLOW_POSTCOPY = 16
#: For the switch after the first pass: pre-copy must not complete first, however slowly a loaded
#: machine lets the guest dirty its memory (a starved TCG guest dirties a fraction of its
#: dirty_mib_s, and the default policy throttles it further: seen converging at load 27). No
#: policy, and a 1 ms downtime limit: QEMU completes pre-copy only below 32 KiB left at 32 MiB/s.
NO_PRECOPY_END: dict[str, Any] = {"policy": "none", "downtime_limit_ms": 1}


def _boot(c: Client, name: str) -> Heartbeat:
    c.create(guest_xml(name, **GUEST))  # type: ignore[arg-type]
    return wait_heartbeat(c, name)


def _wait(what: str, check: Callable[[], bool], timeout: float = 60.0, step: float = 0.1) -> float:
    """Wait until *check()* holds; return how long it took."""
    started = time.monotonic()
    while time.monotonic() - started < timeout:
        with contextlib.suppress(VmferryError):
            if check():
                return time.monotonic() - started
        time.sleep(step)
    raise AssertionError(f"timed out after {timeout:g} s waiting for {what}")


def _status(c: Client, name: str) -> str:
    return str(c.jobinfo(name).stats.get("status", "none"))


def _done_on(c: Client, name: str) -> bool:
    info = c.dominfo(name)
    return (info.state, info.reason, info.job.async_job) == ("running", "migrated", "none")


def _gone_from(c: Client, name: str) -> bool:
    return name not in [d.name for d in c.list_domains(all=True)]


def _check_arrived(src: Client, dst: Client, name: str, before: Heartbeat) -> Heartbeat:
    """The guest runs on *dst* only, same boot, memory intact."""
    _wait("the migration to complete on the destination", lambda: _done_on(dst, name))
    _wait("the source to let go of the guest", lambda: _gone_from(src, name), timeout=20)
    after = wait_heartbeat(dst, name, after=before)
    check_continuity(before, after)
    return after


class Background:
    """A migration run by a thread of its own (the test pokes at it meanwhile)."""

    def __init__(self, coro_fn: Callable[[], Any]) -> None:
        self.result: MigrationReport | None = None
        self.error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, args=(coro_fn,), daemon=True)
        self._thread.start()

    def _run(self, coro_fn: Callable[[], Any]) -> None:
        try:
            self.result = asyncio.run(coro_fn())
        except BaseException as err:  # handed to the test
            self.error = err

    def join(self, timeout: float = 90.0) -> Background:
        self._thread.join(timeout)
        assert not self._thread.is_alive(), "the migration did not return"
        return self


@pytest.fixture
def pair(fresh_pair: tuple[Host, Host]) -> tuple[Host, Host]:
    """Fresh daemons for each test: some cases kill a daemon or cut the link."""
    return fresh_pair


# -- switching -----------------------------------------------------------------------------------


def test_migrate_postcopy_switch_and_abort_refused(pair: tuple[Host, Host]) -> None:
    """Client-managed v3: migrate-postcopy switches a migration that cannot converge."""
    a, b = pair
    with a.client() as src, b.client() as dst:
        before = _boot(src, "pc1")
        with pytest.raises(VmferryError, match="only be started while outgoing migration"):
            src.start_postcopy("pc1")

        async def run() -> MigrationReport:
            async with AsyncClient(a.uri) as s, AsyncClient(b.uri) as d:
                params = MigrationParams(
                    bandwidth_mib_s=BANDWIDTH, postcopy_bandwidth_mib_s=SLOW_POSTCOPY
                )
                return await migrate(s, d, "pc1", POSTCOPY, params)

        started = time.monotonic()
        job = Background(run)
        _wait("pre-copy to run", lambda: _status(src, "pc1") == "active")
        time.sleep(1.0)  # a few passes: it does not converge
        assert _status(src, "pc1") == "active"
        src.start_postcopy("pc1")
        switched = time.monotonic() - started
        _wait("the switch", lambda: src.dominfo("pc1").reason == "post-copy", timeout=10)
        info = src.dominfo("pc1")
        assert (info.state, info.job.async_job) == ("paused", "migration out")
        with pytest.raises(VmferryError, match="cannot abort migration in post-copy mode"):
            src.jobabort("pc1")
        with pytest.raises(VmferryError, match="already in post-copy"):
            src.start_postcopy("pc1")
        _wait(
            "the guest to run on the destination while post-copy goes on",
            lambda: dst.dominfo("pc1").reason == "post-copy",
            timeout=10,
        )
        assert job.join().error is None, job.error
        report = job.result
        assert report is not None
        after = _check_arrived(src, dst, "pc1", before)
        assert after.errors == 0
        stats = dst.jobinfo("pc1", completed=True).stats
        assert stats.get("postcopy") == 1
        # The guest paused for the switch only, not for the whole post-copy phase
        # (the source measures it: STOP there, to Finish's reply less resumed_ago). The
        # destination's Finish resumed it, then waited out the post-copy phase (~5 s at
        # SLOW_POSTCOPY); a guest paused throughout would measure more than that Finish (from
        # before its call to after its reply). Not a fixed bound: the switch alone may take
        # seconds on a loaded machine.
        guest = src.jobinfo("pc1", completed=True).stats["guest_downtime_ms"]
        finish_ms = stats["destination_phases_ms"]["finish"]  # type: ignore[index]
        assert 0 < guest < finish_ms, (guest, finish_ms)
        assert report.stats["guest_downtime_ms"] == guest, report.stats
        print(
            f"\nmigrate-postcopy: switched at {switched:.2f} s, wall {report.wall_s:.2f} s, "
            f"guest downtime {guest} ms, steps {report.steps}"
        )


def test_postcopy_after_precopy_p2p(pair: tuple[Host, Host]) -> None:
    """p2p: the source daemon switches after the first full pass by itself."""
    a, b = pair
    with a.client() as src, b.client() as dst:
        before = _boot(src, "pc2")
        with pytest.raises(VmferryError, match="requires --postcopy"):
            MigrationParams(postcopy_after_precopy=True).validate(MigrateFlags.LIVE)

        async def run() -> MigrationReport:
            async with AsyncClient(a.uri) as s:
                params = MigrationParams(
                    bandwidth_mib_s=BANDWIDTH,
                    postcopy_after_precopy=True,
                    postcopy_bandwidth_mib_s=SLOW_POSTCOPY,
                    **NO_PRECOPY_END,
                )
                return await migrate_p2p(s, b.uri, "pc2", POSTCOPY, params)

        report = Background(run).join()
        assert report.error is None, report.error
        assert report.result is not None
        _check_arrived(src, dst, "pc2", before)
        stats = dst.jobinfo("pc2", completed=True).stats
        assert stats.get("postcopy") == 1, stats
        # As in test_migrate_postcopy_switch_and_abort_refused: less than the destination's
        # Finish, which resumed the guest and then waited out the post-copy phase.
        guest = src.jobinfo("pc2", completed=True).stats["guest_downtime_ms"]
        finish_ms = stats["destination_phases_ms"]["finish"]  # type: ignore[index]
        assert 0 < guest < finish_ms, (guest, finish_ms)
        print(f"\nafter-precopy p2p: wall {report.result.wall_s:.2f} s, guest downtime {guest} ms")


def test_postcopy_needs_v3_and_the_flag(pair: tuple[Host, Host]) -> None:
    a, b = pair
    with a.client() as src:
        _boot(src, "pc3")

        async def v2() -> MigrationReport:
            async with AsyncClient(a.uri) as s, AsyncClient(b.uri) as d:
                return await migrate(s, d, "pc3", POSTCOPY, MigrationParams(), version=2)

        with pytest.raises(VmferryError, match="requires migration protocol v3"):
            asyncio.run(v2())
        assert src.dominfo("pc3").state == "running"

        async def no_flag() -> MigrationReport:
            async with AsyncClient(a.uri) as s, AsyncClient(b.uri) as d:
                params = MigrationParams(bandwidth_mib_s=BANDWIDTH)
                return await migrate(s, d, "pc3", MigrateFlags.LIVE, params)

        job = Background(no_flag)
        _wait("pre-copy to run", lambda: _status(src, "pc3") == "active")
        with pytest.raises(VmferryError, match="requires migration to be started with"):
            src.start_postcopy("pc3")
        with pytest.raises(VmferryError, match="not outgoing migration in post-copy"):
            src.jobabort("pc3", postcopy=True)
        src.jobabort("pc3")
        assert job.join().error is not None
        assert src.dominfo("pc3").state == "running"


# -- a daemon dies during post-copy ---------------------------------------------------------------


def test_source_daemon_killed_during_postcopy(pair: tuple[Host, Host]) -> None:
    """The source daemon dies right after the switch; after its restart the job is kept and
    the migration completes, the guest on the destination with its memory intact."""
    a, b = pair
    a.extra_env[ENV_VAR] = "src-perform3-after=exit"
    a.kill()
    a.start()
    with a.client() as src, b.client() as dst:
        before = _boot(src, "pc4")

        async def run() -> MigrationReport:
            async with AsyncClient(a.uri) as s:
                params = MigrationParams(
                    bandwidth_mib_s=BANDWIDTH,
                    postcopy_after_precopy=True,
                    postcopy_bandwidth_mib_s=SLOW_POSTCOPY,
                    **NO_PRECOPY_END,
                )
                return await migrate_p2p(s, b.uri, "pc4", POSTCOPY, params)

        job = Background(run).join()
        assert isinstance(job.error, VmferryError)  # the daemon died under the call
        assert a.proc is not None and a.proc.wait(10) == -signal.SIGKILL
        a.extra_env.pop(ENV_VAR)
        a.start()
    with a.client() as src, b.client() as dst:
        try:
            info = src.dominfo("pc4")
        except VmferryError as err:
            # QEMU completed while the daemon was down (a loaded machine restarts slowly):
            # the restart completed the migration at once, and the source let go.
            assert err.code == ErrorCode.NO_DOMAIN, err
        else:
            if info.job.phase == "confirm_resume":
                # QEMU completed just now: the watcher of the kept job is stopping the source.
                assert info.job.async_owner_api == "migration-unattended", info
            else:
                # libvirt's "return 1": the job stays, nobody owns it, the guest is left paused.
                assert (info.state, info.job.async_job, info.job.phase) == (
                    "paused",
                    "migration out",
                    "postcopy_failed",
                ), info
                assert info.job.async_owner_api == ""
                # The stream flows on meanwhile: the destination's watcher may complete its
                # kept job (watch_incoming -> complete_unattended) before this look at it.
                incoming = dst.dominfo("pc4")
                assert incoming.job.async_job == "migration in" or _done_on(dst, "pc4"), incoming
        _check_arrived(src, dst, "pc4", before)


# -- the link between the hosts is cut during post-copy --------------------------------------------

netns = pytest.mark.skipif(bool(available()), reason=available() or "netns available")
LINK_DOWN_S = 6.0
#: A deadline for the source to notice the cut (3 keepalives 1 s apart, then the pause).
FAILURE_TIMEOUT_S = 60.0


def _failed_on_source(src: Client, name: str) -> bool:
    """The source's job is kept as failed post-copy: the phase and the reason both say so."""
    info = src.dominfo(name)
    return (info.reason, info.job.phase) == ("post-copy-failed", "postcopy_failed")


@contextlib.contextmanager
def _netns_pair() -> Iterator[tuple[Any, NetnsHost, NetnsHost]]:
    with netns_pair() as net, netns_hosts(net) as (a, b):
        a.start()
        b.start()
        try:
            yield net, a, b
        finally:
            with contextlib.suppress(Exception):
                net.link_up()


def _start_p2p(a: NetnsHost, b: NetnsHost, name: str, *, autoresume: bool) -> Background:
    async def run() -> MigrationReport:
        async with AsyncClient(a.uri) as s:
            params = MigrationParams(
                bandwidth_mib_s=BANDWIDTH,
                postcopy_after_precopy=True,
                postcopy_bandwidth_mib_s=SLOW_POSTCOPY,
                postcopy_autoresume=autoresume,
                **NO_PRECOPY_END,
            )
            return await migrate_p2p(s, b.tls_uri, name, POSTCOPY, params)

    return Background(run)


def _cut_mid_postcopy(net: Any, src: Client, dst: Client, name: str) -> None:
    _wait("post-copy", lambda: dst.dominfo(name).reason == "post-copy", timeout=30, step=0.05)
    time.sleep(0.5)
    net.link_down()


@netns
def test_link_cut_mid_postcopy_resumes_by_itself() -> None:
    with _netns_pair() as (net, a, b), a.client() as src, b.client() as dst:
        before = _boot(src, "pc5")
        job = _start_p2p(a, b, "pc5", autoresume=True)
        _cut_mid_postcopy(net, src, dst, "pc5")
        cut = time.monotonic()
        # The source notices the silent stream, pauses it and marks the job failed. The reason
        # follows QEMU's postcopy-paused event at once (qemu.lifecycle), the phase only once
        # the p2p call gave the job up (its keepalive, then p2p._settle_failure): wait for
        # both. The link stays down until then, however long a loaded machine takes.
        detect = _wait(
            "the source to mark post-copy failed",
            lambda: _failed_on_source(src, "pc5"),
            timeout=FAILURE_TIMEOUT_S,
        )
        info = src.dominfo("pc5")
        assert (info.state, info.reason, info.job.phase) == (
            "paused",
            "post-copy-failed",
            "postcopy_failed",
        ), info
        assert dst.dominfo("pc5").state == "running"  # the guest stays there, never here
        time.sleep(max(0.0, LINK_DOWN_S - (time.monotonic() - cut)))
        net.link_up()
        up = time.monotonic()
        resumed = _wait("the automatic resume", lambda: _done_on(dst, "pc5"), timeout=60)
        assert isinstance(job.join().error, VmferryError)  # the p2p call saw the link go
        _check_arrived(src, dst, "pc5", before)
        print(
            f"\nlink cut: failure marked {detect:.2f} s after the cut; completed "
            f"{resumed:.2f} s after the link came back ({time.monotonic() - up:.2f} s incl. checks)"
        )


@netns
def test_link_cut_mid_postcopy_resumed_by_hand() -> None:
    with _netns_pair() as (net, a, b), a.client() as src, b.client() as dst:
        before = _boot(src, "pc6")
        job = _start_p2p(a, b, "pc6", autoresume=False)
        _cut_mid_postcopy(net, src, dst, "pc6")
        _wait(
            "the source to mark post-copy failed",
            lambda: _failed_on_source(src, "pc6"),
            timeout=FAILURE_TIMEOUT_S,
        )
        assert isinstance(job.join().error, VmferryError)

        async def resume() -> MigrationReport:
            # Client-managed over the daemons' unix sockets; the stream takes the veth.
            async with AsyncClient(a.uri) as s, AsyncClient(b.uri) as d:
                flags = POSTCOPY | MigrateFlags.POSTCOPY_RESUME
                return await migrate(s, d, "pc6", flags, MigrationParams())

        # A try while the link is still down fails, and leaves both sides ready for the next.
        with pytest.raises(VmferryError):
            asyncio.run(resume())
        assert src.dominfo("pc6").job.phase == "postcopy_failed"
        # The try made the destination's Finish (waiting on the silent stream) give the job
        # up; that Finish may still be unwinding when the try's own error comes back.
        _wait(
            "the destination to hold the failed post-copy again",
            lambda: dst.dominfo("pc6").job.phase != "finish3",
            timeout=postcopy.RELEASE_WAIT_S,
        )
        incoming = dst.dominfo("pc6")
        assert (incoming.state, incoming.reason, incoming.job.phase) == (
            "running",
            "post-copy-failed",
            "postcopy_failed",
        ), incoming
        net.link_up()
        time.sleep(2.0)  # no automatic resume: it stays failed
        assert src.dominfo("pc6").job.phase == "postcopy_failed"
        assert dst.dominfo("pc6").state == "running"
        started = time.monotonic()
        report = asyncio.run(resume())
        took = time.monotonic() - started
        _check_arrived(src, dst, "pc6", before)
        with pytest.raises(VmferryError) as err:
            src.dominfo("pc6")
        assert err.value.code == ErrorCode.NO_DOMAIN
        print(f"\nresume by hand: {took:.2f} s, steps {report.steps}")
