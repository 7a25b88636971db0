"""
``make demo``: two vmferryd hosts on this machine, one guest, live migrations.

Run it from the repository root (``python -m vmferry.demo``, after ``make venv
guest``). It starts two daemons on unix sockets, boots the test guest on the
first, suspends and resumes it, kills and restarts the first daemon under the
running guest, migrates the guest to the second host and back (client-managed,
protocol v3), once more peer-to-peer, and shows one ``vmferry`` command line.
The guest's heartbeat is checked after every step: the same boot id, a
growing sequence and no memory errors, or the demo fails.

State and logs go to ``./.demo`` (wiped at the start of each run, kept
afterwards for reading). Every process the demo starts is stopped when it
ends, also on an error or Ctrl-C.

Exit status: 0 when every check held, 1 when one did not (the message says
which), 130 after Ctrl-C, SIGTERM or SIGHUP.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from types import FrameType

from rich.console import Console
from rich.table import Table

from vmferry.cli.progress import BarProgress
from vmferry.client import AsyncClient
from vmferry.client.migrate import MigrationReport, migrate, migrate_p2p
from vmferry.daemon.state import UNIX_PATH_MAX
from vmferry.errors import VmferryError
from vmferry.migration.flags import MigrateFlags
from vmferry.testguest import Heartbeat, check_continuity, guest_xml
from vmferry.testing import Host, kill_qemu, poll_heartbeat

DOMAIN = "demo-vm"
#: Migration ports of host N: PORT_BASE + 16*N ... + 15 (below the ephemeral range;
#: tests use 20000 and up).
PORT_BASE = 19500
SHORT_DIR_PREFIX = "vfdemo"
START_TIMEOUT_S = 20.0
HEARTBEAT_TIMEOUT_S = 30.0
#: Flags of every hop: like ``virsh migrate --live --persistent --undefinesource``.
HOP_FLAGS = MigrateFlags.LIVE | MigrateFlags.PERSIST_DEST | MigrateFlags.UNDEFINE_SOURCE

EXIT_FAILED = 1
EXIT_INTERRUPTED = 130

# Piped output (make demo | tee, the tests) gets room for full socket paths and UUIDs.
console = Console(highlight=False, width=None if sys.stdout.isatty() else 120)


class DemoFailure(Exception):
    """An invariant the demo checks did not hold; the message says which."""


class Interrupted(Exception):
    """SIGTERM or SIGHUP arrived (Ctrl-C arrives as KeyboardInterrupt)."""


# -- the two hosts ------------------------------------------------------------------------------


def demo_host(name: str, root: Path, state_dir: Path, socket: Path, port_min: int) -> Host:
    """One vmferryd of the demo: its state under ./.demo, its socket maybe under /tmp."""
    return Host(
        root,
        name,
        port_min,
        port_span=15,
        wait_timeout=None,
        log_level=None,
        insecure=True,  # the hops name each other's unix sockets (demo only)
        state_at=state_dir,
        socket_at=socket,
        uuid_value=str(uuid.uuid4()),
        # Own session: Ctrl-C must reach the demo only, which then stops things in order.
        new_session=True,
    )


async def start_host(host: Host) -> None:
    """Start *host*'s daemon and wait until it answers."""
    host.spawn()
    try:
        await host.wait_ready_async(START_TIMEOUT_S)
    except RuntimeError as err:
        raise DemoFailure(str(err)) from None


def kill_leftovers(workdir: Path) -> None:
    """Kill what an earlier demo that was itself killed may have left running."""
    for root in workdir.glob("host*"):
        with contextlib.suppress(OSError, ValueError):
            pid = int((root / "vmferryd.pid").read_text())
            # Only if that pid is still one of ours, not a recycled one.
            if b"vmferry.daemon.main" in Path(f"/proc/{pid}/cmdline").read_bytes():
                os.kill(pid, signal.SIGKILL)
        state = (root / "state").resolve()
        kill_qemu(state)
        if (root / "state").is_symlink() and state.parent.name.startswith(SHORT_DIR_PREFIX):
            shutil.rmtree(state.parent, ignore_errors=True)


def fits(state_dir: Path, socket: Path) -> bool:
    """Do the daemon's socket and the QMP sockets below *state_dir* fit in sun_path?"""
    qmp = state_dir / "run" / f".{'0' * 24}.qmp"  # the longest name StateDir may use
    return all(len(os.fsencode(p)) <= UNIX_PATH_MAX for p in (qmp, socket))


def make_hosts(workdir: Path) -> tuple[list[Host], Path | None]:
    """
    The two hosts, with everything under *workdir*, unless socket paths would
    be too long there: then state and sockets live in a short /tmp dir
    (returned), ``hostN/state`` links to it, and :meth:`Demo.cleanup` copies
    the state back.
    """
    short: Path | None = None
    if not fits(workdir / "host1" / "state", workdir / "host1" / "vmferryd.sock"):
        short = Path(tempfile.mkdtemp(prefix=SHORT_DIR_PREFIX, dir="/tmp"))
    made = []
    for i in (1, 2):
        root = workdir / f"host{i}"
        root.mkdir(parents=True)
        if short is None:
            state, sock = root / "state", root / "vmferryd.sock"
        else:
            state, sock = short / f"h{i}", short / f"h{i}.sock"
            (root / "state").symlink_to(state)
        made.append(demo_host(f"demo-host{i}", root, state, sock, PORT_BASE + 16 * i))
    return made, short


# -- what the demo shows ------------------------------------------------------------------------


def section(title: str) -> None:
    console.print()
    console.rule(f"[bold]{title}")


def hb_text(hb: Heartbeat) -> str:
    return f"boot={hb.boot} seq={hb.seq} errors={hb.errors}"


async def heartbeat(
    client: AsyncClient, *, after: Heartbeat | None = None, timeout: float = HEARTBEAT_TIMEOUT_S
) -> Heartbeat:
    """The guest's newest heartbeat once it is past *after* (or the first one)."""

    async def read() -> str:
        return (await client.console(DOMAIN)).data

    try:
        return await poll_heartbeat(read, after=after, timeout=timeout)
    except AssertionError as err:
        raise DemoFailure(f"{DOMAIN} on {client.uri}: {err}") from None


async def healthy(client: AsyncClient, before: Heartbeat, where: str) -> Heartbeat:
    """Wait for the next heartbeat and check it continues *before*; print the result."""
    after = await heartbeat(client, after=before)
    try:
        check_continuity(before, after)
    except AssertionError as err:
        raise DemoFailure(f"{where}: {err}") from None
    console.print(
        f"  heartbeat OK {where}: same boot {after.boot}, "
        f"seq {before.seq} -> {after.seq}, errors={after.errors}"
    )
    return after


def mib(n: object) -> str:
    return f"{int(n) / (1 << 20):.1f} MiB" if isinstance(n, int | float) else "-"


def ms(n: object) -> str:
    return f"{int(n)} ms" if isinstance(n, int | float) else "-"


@dataclass
class Hop:
    """One migration and what it showed."""

    label: str
    kind: str
    report: MigrationReport
    before: Heartbeat
    after: Heartbeat


def hop_table(hop: Hop) -> Table:
    stats = hop.report.stats
    table = Table(title=f"{hop.label} ({hop.kind})", title_justify="left", show_header=False)
    table.add_column("what", style="bold")
    table.add_column("value")
    table.add_row("wall time", f"{hop.report.wall_s * 1000:.0f} ms")
    steps = ", ".join(f"{k} {v * 1000:.0f}" for k, v in hop.report.steps.items())
    table.add_row("protocol steps (ms)", steps or "-")
    table.add_row("QEMU total time", ms(stats.get("total_time_ms")))
    table.add_row("downtime", ms(stats.get("downtime_ms")))
    table.add_row("bytes moved", mib(stats.get("data_processed")))
    table.add_row(
        "guest heartbeat",
        f"boot {hop.after.boot} ({'same' if hop.after.boot == hop.before.boot else 'NEW'}), "
        f"seq {hop.before.seq} -> {hop.after.seq}, errors={hop.after.errors}",
    )
    return table


# -- the demo itself ----------------------------------------------------------------------------


class Demo:
    """The demo's steps; :meth:`cleanup` undoes whatever of them ran."""

    def __init__(self, workdir: Path, guest_cmdline: str = "") -> None:
        self.workdir = workdir
        self.guest_cmdline = guest_cmdline
        self.hosts, self.short_dir = make_hosts(workdir)

    async def run(self) -> None:
        h1, h2 = self.hosts
        started = time.monotonic()

        section("1. two vmferryd hosts")
        await asyncio.gather(*(start_host(h) for h in self.hosts))
        await self.show_hosts()

        section(f"2. boot the test guest '{DOMAIN}' on {h1.name}")
        async with AsyncClient(h1.uri) as c1:
            await c1.define(guest_xml(DOMAIN, extra_cmdline=self.guest_cmdline))
            info = await c1.start(DOMAIN)
            console.print(f"  defined and started: state={info.state} reason={info.reason}")
            hb = await heartbeat(c1)
            console.print(f"  console heartbeat: VMFERRY-HB {hb_text(hb)}")
            self.expect(hb.errors == 0, f"the guest found {hb.errors} bad page(s) after boot")

            section("3. suspend and resume")
            info = await c1.suspend(DOMAIN)
            console.print(f"  suspended: state={info.state} reason={info.reason}")
            self.expect(info.state == "paused", f"suspend left the guest {info.state}")
            info = await c1.resume(DOMAIN)
            console.print(f"  resumed:   state={info.state} reason={info.reason}")
            self.expect(info.state == "running", f"resume left the guest {info.state}")
            hb = await healthy(c1, hb, "after resume")

        section(f"4. kill -9 the daemon of {h1.name}, start it again")
        pids = h1.qemu_pids()
        h1.kill(signal.SIGKILL)
        console.print(f"  vmferryd killed; guest QEMU still running: pid {pids}")
        self.expect(h1.qemu_pids() == pids, "the guest's QEMU died with its daemon")
        await start_host(h1)
        async with AsyncClient(h1.uri) as c1:
            info = await c1.dominfo(DOMAIN)
            console.print(
                f"  new vmferryd re-attached: state={info.state} reason={info.reason} "
                f"id={info.id} memory={info.memory_kib // 1024} MiB"
            )
            self.expect(info.state == "running", f"after the restart the guest is {info.state}")
            self.expect(h1.qemu_pids() == pids, "the restarted daemon did not keep the same QEMU")
            hb = await healthy(c1, hb, "after restart")

        section("5. live migration, client-managed (protocol v3)")
        for src, dst in ((h1, h2), (h2, h1)):
            hop, hb = await self.hop(src, dst, hb, p2p=False)
            console.print(hop_table(hop))

        section("6. peer-to-peer migration, and the CLI")
        hop, hb = await self.hop(h1, h2, hb, p2p=True)
        console.print(hop_table(hop))
        self.show_cli(h2)

        section("7. clean up")
        async with AsyncClient(h2.uri) as c2:
            await c2.destroy(DOMAIN)
            await c2.undefine(DOMAIN)
        console.print(f"  '{DOMAIN}' destroyed and undefined on {h2.name}")
        for h in self.hosts:
            self.expect(h.qemu_pids() == [], f"QEMU still running on {h.name}")
        elapsed = time.monotonic() - started
        console.print(f"\n[bold green]demo finished: all checks passed[/] ({elapsed:.1f} s)")

    @staticmethod
    def expect(ok: bool, message: str) -> None:
        if not ok:
            raise DemoFailure(message)

    async def show_hosts(self) -> None:
        infos = []
        for h in self.hosts:
            async with AsyncClient(h.uri) as client:
                infos.append(await client.host())
        table = Table(title="hosts", title_justify="left")
        table.add_column("")
        for info in infos:
            table.add_column(info.hostname, overflow="fold")
        rows = {
            "host uuid": [i.uuid for i in infos],
            "uri": [h.uri for h in self.hosts],
            "vmferry": [i.version for i in infos],
            "qemu": [i.qemu_version.split(" ")[0] for i in infos],
            "features": [", ".join(i.features) for i in infos],
        }
        for label, values in rows.items():
            table.add_row(label, *values)
        console.print(table)
        self.expect(len({i.uuid for i in infos}) == 2, "the two daemons report the same host UUID")

    async def hop(
        self, src: Host, dst: Host, before: Heartbeat, *, p2p: bool
    ) -> tuple[Hop, Heartbeat]:
        """Migrate the guest from *src* to *dst* under a progress bar; check it arrived well."""
        label = f"{src.name} -> {dst.name}"
        kind = "peer-to-peer" if p2p else "v3, client-managed"
        console.print(f"  migrating {label} ({kind})")
        async with AsyncClient(src.uri) as cs, AsyncClient(dst.uri) as cd:
            before = await heartbeat(cs, after=before)
            with BarProgress(console) as bar:
                if p2p:
                    flags = HOP_FLAGS | MigrateFlags.PEER2PEER
                    report = await migrate_p2p(cs, dst.uri, DOMAIN, flags, progress=bar)
                else:
                    report = await migrate(cs, cd, DOMAIN, HOP_FLAGS, version=3, progress=bar)
                bar.finish(report.stats)
            after = await self.after_hop(cs, cd, before, label)
        return Hop(label, kind, report, before, after), after

    async def after_hop(
        self, cs: AsyncClient, cd: AsyncClient, before: Heartbeat, label: str
    ) -> Heartbeat:
        """The guest runs on the destination, continuing; the source has nothing left."""
        info = await cd.dominfo(DOMAIN)
        self.expect(
            info.state == "running" and info.persistent,
            f"{label}: on the destination the guest is {info.state} "
            f"({'persistent' if info.persistent else 'transient'})",
        )
        left = [d.name for d in await cs.list_domains(all=True)]
        self.expect(DOMAIN not in left, f"{label}: the source still lists {DOMAIN}")
        after = await heartbeat(cd, after=before)
        try:
            check_continuity(before, after)
        except AssertionError as err:
            raise DemoFailure(f"{label}: {err}") from None
        return after

    def show_cli(self, host: Host) -> None:
        """One ``vmferry`` command line, as a user types it."""
        script = Path(sys.executable).with_name("vmferry")
        argv = [str(script)] if script.exists() else [sys.executable, "-m", "vmferry.cli.main"]
        args = ["-c", host.uri, "list", "--all"]
        console.print(f"\n  $ vmferry {' '.join(args)}")
        done = subprocess.run(
            [*argv, *args], capture_output=True, text=True, timeout=30, check=False
        )
        for line in (done.stdout + done.stderr).rstrip().splitlines():
            console.print(f"  {line}", markup=False)
        self.expect(done.returncode == 0, f"vmferry list exited with status {done.returncode}")
        self.expect(DOMAIN in done.stdout, f"vmferry list does not show {DOMAIN}")

    def cleanup(self) -> None:
        """Stop everything the demo started; never raises."""
        for h in self.hosts:
            if h.proc is not None and h.proc.poll() is None:
                with contextlib.suppress(Exception):
                    asyncio.run(self._destroy(h))
        for h in self.hosts:
            h.kill(signal.SIGTERM, timeout=15.0)
        # A daemon leaves its guests running when it stops (like libvirtd): kill what is left.
        for h in self.hosts:
            kill_qemu(h.state_dir)
        if self.short_dir is not None:
            for h in self.hosts:
                # Keep the state (QEMU and console logs) for reading, as in the usual layout.
                with contextlib.suppress(OSError, shutil.Error):
                    (h.root / "state").unlink()
                    skip = shutil.ignore_patterns("*.qmp", "*.sock")
                    shutil.copytree(h.state_dir, h.root / "state", ignore=skip, symlinks=True)
            shutil.rmtree(self.short_dir, ignore_errors=True)

    @staticmethod
    async def _destroy(h: Host) -> None:
        async with AsyncClient(h.uri, timeout=5.0) as client:
            for dom in await client.list_domains(all=True):
                if dom.state != "shutoff":
                    with contextlib.suppress(VmferryError):
                        await client.destroy(dom.name)
                with contextlib.suppress(VmferryError):
                    await client.undefine(dom.name)


#: Signals that end the demo like Ctrl-C does: a kill, a closed terminal.
STOP_SIGNALS = (signal.SIGTERM, signal.SIGHUP)


@contextlib.contextmanager
def stop_signals_raise() -> Iterator[None]:
    """SIGTERM and SIGHUP interrupt the demo like Ctrl-C does, so that cleanup runs."""

    def handler(signum: int, frame: FrameType | None) -> None:
        raise Interrupted

    previous = {sig: signal.signal(sig, handler) for sig in STOP_SIGNALS}
    try:
        yield
    finally:
        for sig, old in previous.items():
            signal.signal(sig, old)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m vmferry.demo", description=__doc__.split("\n")[1])
    p.add_argument(
        "--guest-cmdline",
        default="",
        metavar="ARGS",
        help="extra kernel arguments of the guest; 'vmferry.corrupt_after=0 "
        "vmferry.dirty_mib_s=0' makes it corrupt a page of its memory, to see the demo catch it",
    )
    p.add_argument(
        "--workdir",
        type=Path,
        default=Path(".demo"),
        help="state and logs of the demo's daemons (default ./.demo, wiped first)",
    )
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    workdir: Path = args.workdir.absolute()
    kill_leftovers(workdir)
    shutil.rmtree(workdir, ignore_errors=True)
    workdir.mkdir(parents=True)
    demo = Demo(workdir, args.guest_cmdline)
    status = 0
    sigint = signal.getsignal(signal.SIGINT)
    with stop_signals_raise():
        try:
            asyncio.run(demo.run())
        except (DemoFailure, VmferryError) as err:
            console.print("\n[bold red]demo FAILED:[/]", end=" ")
            console.print(str(err), markup=False)
            status = EXIT_FAILED
        except (KeyboardInterrupt, Interrupted):
            console.print("\n[bold yellow]demo interrupted[/]")
            status = EXIT_INTERRUPTED
        finally:
            # A second Ctrl-C must not cut the cleanup short.
            for sig in (signal.SIGINT, *STOP_SIGNALS):
                signal.signal(sig, signal.SIG_IGN)
            demo.cleanup()
            signal.signal(signal.SIGINT, sigint)
    if status:
        console.print(f"daemon logs: {workdir}/host*/vmferryd.log")
    return status


if __name__ == "__main__":
    sys.exit(main())
