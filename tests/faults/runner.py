"""Run one fault-matrix case on a pair of namespaced hosts and judge what it ended with.

The steps of :func:`run_case`:

1. start both daemons, the side of the failpoint with ``<point>=pause``;
   boot the test guest on the source (host A);
2. start the client (a process of its own) migrating the guest A -> B and wait
   until the failpoint is reached;
3. apply the fault, then release the failpoint;
4. restart what was killed (after :data:`RESTART_DELAY_S`), or bring the link
   back (after :data:`LINK_DOWN_S`);
5. wait (at most :data:`RECOVERY_TIMEOUT_S`) until neither side holds a job
   and no copy of the guest is paused, stable for :data:`SETTLE_S`; or, in
   post-copy, until one side keeps a *broken half* (a post-copy job whose
   other QEMU is gone, which nothing can complete), stable for
   :data:`STUCK_SETTLE_S`;
6. check: the guest runs on exactly one host with its memory intact (or on
   none, where the killed QEMU held its only copy: a broken half is then
   destroyed, as an operator would), and if it runs on the source, it never
   ran on the destination (no heartbeat of its boot on the destination's
   console); no QEMU left over, no incoming migration port open, no status
   file of an inactive domain; then a new migration with the same protocol
   must succeed.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

from tests.faults.cases import Case, Fault, Mode, committed
from tests.faults.pause import DIR_ENV
from tests.netns import PORT_MAX, PORT_MIN, NetnsHost, NetnsPair, netns_hosts
from vmferry.api.models import DomainInfo
from vmferry.daemon.lease import LeaseOwner, LockspaceLeases
from vmferry.errors import VmferryError
from vmferry.failpoints import ENV_VAR
from vmferry.testguest import GuestDisk, Heartbeat, check_continuity, guest_xml, parse_heartbeats
from vmferry.testing import wait_heartbeat
from vmferry.testing.disk import wait_disk_ready

GUEST = "g"
REPO = Path(__file__).resolve().parents[2]
#: This checkout's sources first (a worktree's, not the venv's editable install), then tests.
PYTHONPATH = f"{REPO / 'src'}:{REPO}"

#: How long the client may take to reach the failpoint (a deadline: a fresh client process,
#: Begin and Prepare's QEMU start take seconds each while another QEMU test runs besides).
REACH_TIMEOUT_S = 90.0
#: How long a killed daemon stays dead (unless the client gave up sooner).
RESTART_DELAY_S = 3.0
#: How long the link stays cut: longer than the p2p keepalive (3 x 1 s) gives up.
LINK_DOWN_S = 6.0
#: Bound on recovery, from the fault to a settled state.
RECOVERY_TIMEOUT_S = 60.0
#: A settled state must hold this long (a resolver may still act on it).
SETTLE_S = 1.5
#: A broken post-copy half must hold this long: the watchers complete a stream that did
#: complete within about a second, and retry a resume every few seconds.
STUCK_SETTLE_S = 6.0
#: Bound on the follow-up migration.
MIGRATE_TIMEOUT_S = 60.0


class CaseFailed(Exception):
    """A check did not hold: the message says which."""


@dataclass
class Result:
    case: Case
    verdict: str = "FAIL"  # PASS, LOST (expected: the only copy was killed), FAIL, N/A
    outcome: str = ""
    reason: str = ""
    recover_s: float | None = None
    wall_s: float = 0.0
    logs: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return self.verdict in ("PASS", "LOST", "N/A")


@dataclass
class _Run:
    """What one case has going."""

    case: Case
    net: NetnsPair
    src: NetnsHost
    dst: NetnsHost
    fpdir: Path
    client: subprocess.Popen[bytes] | None = None
    client_out: Path | None = None

    @property
    def lockspace(self) -> Path:
        """The hosts' shared lockspace, for a case with leases."""
        return self.fpdir.parent / "lockspace"

    def host(self, side: str) -> NetnsHost:
        return self.src if side == "src" else self.dst

    def env(self, armed: bool) -> dict[str, str]:
        env = {"PYTHONPATH": PYTHONPATH, DIR_ENV: str(self.fpdir)}
        if armed:
            env[ENV_VAR] = f"{self.case.point}=pause"
        return env


def run_case(net: NetnsPair, case: Case, *, keep_logs: Path | None = None) -> Result:
    """Run *case*; never raises for a failed check (the result says FAIL and why)."""
    result = Result(case)
    why = case.applicable()
    if why:
        result.verdict, result.outcome = "N/A", why
        return result
    started = time.monotonic()
    root = Path(tempfile.mkdtemp(prefix="vff", dir="/tmp"))
    try:
        with netns_hosts(net, root=root, module="tests.faults.pause") as (a, b):
            run = _Run(case, net, a, b, root / "fp")
            run.fpdir.mkdir()
            try:
                _execute(run, result)
            except CaseFailed as err:
                result.verdict, result.reason = "FAIL", str(err)
            except Exception as err:  # any surprise is this case's failure, not the run's
                result.verdict, result.reason = "FAIL", f"{type(err).__name__}: {err}"
            finally:
                _stop_client(run)
                with contextlib.suppress(subprocess.SubprocessError):
                    net.link_up()
                if not result.ok and keep_logs is not None:
                    result.logs = _keep_logs(run, keep_logs)
    finally:
        shutil.rmtree(root, ignore_errors=True)
    result.wall_s = time.monotonic() - started
    return result


def _execute(run: _Run, result: Result) -> None:
    case = run.case
    for side in ("src", "dst"):
        host = run.host(side)
        host.extra_env = run.env(armed=side == case.paused_side)
        if case.leases:
            run.lockspace.mkdir(exist_ok=True)
            host.extra_config = f'[cluster]\nlockspace = "{run.lockspace}"\n'
        host.start()
    hb0 = _boot(run.src, case.mode)
    _start_client(run, run.src, run.dst)
    _wait_reached(run)
    t_fault = time.monotonic()
    killed = _apply_fault(run)
    (run.fpdir / f"{case.point}.release").touch()
    if killed:
        _wait_client(run, RESTART_DELAY_S)
        for host in killed:
            host.extra_env = run.env(armed=False)
            host.start()
    if case.fault == Fault.CUT_LINK:
        time.sleep(LINK_DOWN_S)
        run.net.link_up()
    where, stuck = _wait_settled(run, t_fault, result)
    client_note = _client_result(run)
    _check(run, result, where, stuck, hb0, client_note)


# -- steps ----------------------------------------------------------------------------------------


def _guest_xml(mode: Mode) -> str:
    if mode == Mode.V3_POSTCOPY:
        # Re-dirties its 32 MiB buffer faster than the client's pre-copy cap: only the
        # switch to post-copy lets the migration complete.
        return guest_xml(GUEST, memory_mib=128, stamp_mib=32, dirty_mib_s=64, hb_ms=200)
    if mode == Mode.V3_STORAGE:
        return guest_xml(GUEST, disk=STORAGE_DISK)
    return guest_xml(GUEST)


#: The storage mode's disk: a volume of each host's own pool ``default`` (its state dir),
#: 4 MiB of it re-stamped by the guest at 1 MiB/s while it moves.
STORAGE_DISK = GuestDisk(pool="default", volume=f"{GUEST}.raw", blocks=1024, mib_s=1)
STORAGE_DISK_BYTES = 16 << 20


def _boot(host: NetnsHost, mode: Mode) -> Heartbeat:
    with host.client() as c:
        if mode == Mode.V3_STORAGE:
            with contextlib.suppress(VmferryError):  # there from the source of a migration
                c.vol_delete("default", f"{GUEST}.raw")
            c.vol_create("default", f"{GUEST}.raw", STORAGE_DISK_BYTES)
        c.create(_guest_xml(mode))
        if mode == Mode.V3_STORAGE:
            return wait_disk_ready(c, GUEST)
        return wait_heartbeat(c, GUEST)


def _start_client(run: _Run, src: NetnsHost, dst: NetnsHost) -> None:
    # p2p: the source daemon reaches the destination over the veth (TLS)
    dst_uri = dst.tls_uri if run.case.mode == Mode.P2P else dst.uri
    run.client_out = run.fpdir / f"client-{time.monotonic_ns()}.out"
    with run.client_out.open("wb") as out:
        run.client = subprocess.Popen(
            [sys.executable, "-m", "tests.faults.client", run.case.mode, src.uri, dst_uri, GUEST],
            stdout=out,
            stderr=subprocess.STDOUT,
            env={**os.environ, "PYTHONPATH": PYTHONPATH},
        )


def _wait_reached(run: _Run) -> None:
    hit = run.fpdir / f"{run.case.point}.hit"
    deadline = time.monotonic() + REACH_TIMEOUT_S
    while not hit.exists():
        assert run.client is not None
        if run.client.poll() is not None:
            raise CaseFailed(
                f"the migration ended before failpoint {run.case.point}: {_client_result(run)}"
            )
        if time.monotonic() > deadline:
            raise CaseFailed(f"failpoint {run.case.point} not reached within {REACH_TIMEOUT_S} s")
        time.sleep(0.05)


def _apply_fault(run: _Run) -> list[NetnsHost]:
    """Apply the case's fault; return the daemons it killed."""
    fault = run.case.fault
    if fault in (Fault.KILL_SRC_DAEMON, Fault.KILL_DST_DAEMON):
        host = run.src if fault == Fault.KILL_SRC_DAEMON else run.dst
        host.kill(signal.SIGKILL)
        return [host]
    if fault in (Fault.KILL_SRC_QEMU, Fault.KILL_DST_QEMU):
        host = run.src if fault == Fault.KILL_SRC_QEMU else run.dst
        pids = host.qemu_pids()
        if len(pids) != 1:
            raise CaseFailed(f"expected one QEMU on {host.name} at {run.case.point}, found {pids}")
        os.kill(pids[0], signal.SIGKILL)
    elif fault == Fault.KILL_CLIENT:
        assert run.client is not None
        run.client.kill()
        run.client.wait(timeout=10)
    elif fault == Fault.CUT_LINK:
        run.net.link_down()
    return []


def _wait_client(run: _Run, timeout: float) -> None:
    if run.client is not None:
        with contextlib.suppress(subprocess.TimeoutExpired):
            run.client.wait(timeout=timeout)


def _stop_client(run: _Run) -> None:
    if run.client is not None and run.client.poll() is None:
        run.client.kill()
        run.client.wait(timeout=10)


def _client_result(run: _Run) -> str:
    if run.client is None:
        return "no client"
    if run.client.poll() is None:
        return "client still running"
    if run.client.returncode == -signal.SIGKILL:
        return "client killed"
    assert run.client_out is not None
    text = run.client_out.read_text(errors="replace").strip()
    try:
        answer = json.loads(text.splitlines()[-1])
    except (ValueError, IndexError):
        return f"client exited {run.client.returncode}: {text[-300:]}"
    return "client: ok" if answer["ok"] else f"client: {_tidy(run, answer['error'])}"


def _tidy(run: _Run, text: str) -> str:
    """Run-specific paths and addresses as host names, so tables of two runs compare."""
    for host, tag in ((run.src, "A"), (run.dst, "B")):
        text = text.replace(str(host.root), f"<{tag}>").replace(host.address, f"<{tag}-veth>")
    return text


# -- settling and checks --------------------------------------------------------------------------


def _domains(host: NetnsHost) -> list[DomainInfo]:
    with host.client() as c:
        return [d for d in c.list_domains(all=True) if d.name == GUEST]


_POSTCOPY_REASONS = frozenset({"post-copy", "post-copy-failed"})
_POSTCOPY_PHASES = frozenset(
    {
        "postcopy_failed",
        "begin_resume",
        "perform_resume",
        "confirm_resume",
        "prepare_resume",
        "finish_resume",
    }
)


def _postcopy_job(d: DomainInfo) -> bool:
    """Whether *d* holds a migration job past the switch to post-copy."""
    return d.job.async_job in ("migration out", "migration in") and (
        d.reason in _POSTCOPY_REASONS or d.job.phase in _POSTCOPY_PHASES
    )


def _broken_half(run: _Run, seen: dict[str, list[DomainInfo]]) -> str:
    """The side keeping a post-copy job whose other QEMU is gone ("" if none).

    Such a half can never complete: the other QEMU held part of the guest.
    """
    if run.case.mode != Mode.V3_POSTCOPY or len(seen) != 2:
        return ""
    for side, other in (("src", "dst"), ("dst", "src")):
        if any(_postcopy_job(d) and d.state != "shutoff" for d in seen[side]) and not any(
            d.state != "shutoff" for d in seen[other]
        ):
            return side
    return ""


def _snapshot(run: _Run) -> tuple[dict[str, list[DomainInfo]], str, str]:
    """The guest's domain objects on each side, why this is not settled ("" if it is),
    and the side that keeps a broken post-copy half ("" if none)."""
    seen: dict[str, list[DomainInfo]] = {}
    for side in ("src", "dst"):
        try:
            seen[side] = _domains(run.host(side))
        except VmferryError as err:
            return seen, f"{side} daemon does not answer: {err}", ""
    if run.client is not None and run.client.poll() is None:
        return seen, "client still running", ""
    half = _broken_half(run, seen)
    if half:
        return seen, "", half
    for side, doms in seen.items():
        for d in doms:
            if d.job.async_job != "none" or d.job.job != "none":
                return seen, f"{side} holds job {d.job.async_job}/{d.job.phase} ({d.job.job})", ""
            if d.state not in ("running", "shutoff"):
                return seen, f"guest {d.state} ({d.reason}) on {side}", ""
    return seen, "", ""


def _wait_settled(run: _Run, t_fault: float, result: Result) -> tuple[list[str], str]:
    """Wait until nothing moves any more.

    Returns the sides the guest runs on, and the side keeping a broken
    post-copy half ("" if none; it is not among the first).
    """
    deadline = t_fault + RECOVERY_TIMEOUT_S
    settled_at: float | None = None
    why, last = "", ""
    seen: dict[str, list[DomainInfo]] = {}
    while time.monotonic() < deadline:
        seen, why, half = _snapshot(run)
        now = time.monotonic()
        state = why or f"half:{half}"
        if why or state != last:
            settled_at = None if why else now
        elif settled_at is not None and now - settled_at >= (STUCK_SETTLE_S if half else SETTLE_S):
            result.recover_s = round(settled_at - t_fault, 1)
            where = [s for s, doms in seen.items() for d in doms if d.state == "running"]
            return [s for s in where if s != half], half
        last = state
        time.sleep(0.25)
    raise CaseFailed(f"not recovered within {RECOVERY_TIMEOUT_S:.0f} s: {why}")


def _check(
    run: _Run, result: Result, where: list[str], half: str, hb0: Heartbeat, client: str
) -> None:
    case = run.case
    names = {"src": "A (source)", "dst": "B (destination)"}
    if len(where) > 1:
        raise CaseFailed(f"guest runs on both hosts; {client}")
    if half:
        note = _destroy_half(run, half, hb0)
        if where or not case.loss_allowed():
            raise CaseFailed(f"{names[half]} keeps a broken post-copy half ({note}); {client}")
        result.outcome = f"lost: {names[half]} kept a broken post-copy half ({note}); {client}"
    elif where:
        side = where[0]
        result.outcome = f"runs on {names[side]}; {client}"
        if side == "src" and committed(case.mode, case.point):
            raise CaseFailed(f"the source resumed a guest the destination had taken over; {client}")
        if side == "src":
            ran = _ran_on(run.dst, hb0)
            if ran is not None:
                raise CaseFailed(
                    f"the source resumed the guest after it ran on B (seq {ran.seq}); {client}"
                )
        with run.host(side).client() as c:
            hb = wait_heartbeat(c, GUEST, after=hb0)
        try:
            check_continuity(hb0, hb)
        except AssertionError as err:
            raise CaseFailed(f"{result.outcome}, but {err}") from None
    else:
        result.outcome = f"lost; {client}"
        if not case.loss_allowed():
            raise CaseFailed(f"guest lost although a copy survived; {client}")
    problems = _leftovers(run)
    if case.leases:
        problems += _lease_problems(run, where[0] if where else "")
    try:
        _migrate_again(run, where[0] if where else "")
    except (CaseFailed, AssertionError, VmferryError) as err:
        problems.append(str(err))
    if problems:
        raise CaseFailed("; ".join(problems))
    result.verdict = "PASS" if where else "LOST"


def _ran_on(host: NetnsHost, hb0: Heartbeat) -> Heartbeat | None:
    """The last heartbeat of *hb0*'s boot on *host*'s console (None: it never ran there)."""
    log = host.state_dir / "log" / f"{GUEST}.console.log"
    text = log.read_text(errors="replace") if log.exists() else ""
    beats = [hb for hb in parse_heartbeats(text) if hb.boot == hb0.boot]
    return beats[-1] if beats else None


def _destroy_half(run: _Run, side: str, hb0: Heartbeat) -> str:
    """Destroy the broken post-copy half on *side* (what an operator must do); describe it."""
    host = run.host(side)
    with host.client() as c:
        d = c.dominfo(GUEST)
        note = f"{d.state}/{d.reason}, job {d.job.async_job}/{d.job.phase}"
        if side == "src" and _ran_on(run.dst, hb0) is not None:
            note += ", the guest had run on B"
        c.destroy(GUEST)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            left = [x for x in c.list_domains(all=True) if x.name == GUEST]
            if not left or (left[0].state == "shutoff" and left[0].job.async_job == "none"):
                return note
            time.sleep(0.1)
    raise CaseFailed(f"the broken post-copy half on {host.name} ({note}) did not go away")


def _lease_problems(run: _Run, side: str) -> list[str]:
    """The guest's lease must be held by the host that runs it, by nobody if none does."""
    uuids = {d.uuid for s in ("src", "dst") for d in _domains(run.host(s))}
    if not uuids and not side:
        return []
    if len(uuids) != 1:
        return [f"the guest has {len(uuids)} UUIDs across the hosts: {sorted(uuids)}"]
    owner = LockspaceLeases(run.lockspace, LeaseOwner("", "")).holder_now(uuids.pop())
    want = run.host(side).host_uuid if side else ""
    held_by = owner.host_uuid if owner is not None else ""
    if held_by != want:
        names = {run.src.host_uuid: "A", run.dst.host_uuid: "B", "": "nobody"}
        return [
            f"the lease is held by {names.get(held_by, held_by)}, "
            f"not by {names[want]} where the guest runs"
        ]
    return []


def _leftovers(run: _Run) -> list[str]:
    """QEMUs, domains, migration ports and status files that should be gone."""
    problems = []
    for side in ("src", "dst"):
        host = run.host(side)
        active = [d.name for d in _domains(host) if d.state != "shutoff"]
        inactive = [d.name for d in _domains(host) if d.state == "shutoff"]
        if inactive:
            problems.append(f"{host.name} keeps the shut-off transient guest {inactive}")
        qemus = host.qemu_pids()
        if len(qemus) != len(active):
            problems.append(f"{host.name} has {len(qemus)} QEMU for {len(active)} active domain")
        ports = {p for p in run.net.listening_ports(side) if PORT_MIN <= p <= PORT_MAX}
        if ports:
            problems.append(f"{host.name} still listens on migration port(s) {sorted(ports)}")
        allowed = {f"{n}.json" for n in active} | {f"{n}.qmp" for n in active}
        allowed.add("autostarted")  # the boot id of the last autostart (daemon/autostart.py)
        run_dir = host.state_dir / "run"
        files = sorted(
            p.name
            for p in (run_dir.iterdir() if run_dir.exists() else [])
            if p.name not in allowed and not (p.name.startswith(".") and active)
        )
        if files:
            problems.append(f"{host.name} left {', '.join(files)} in state/run")
    if run.case.mode == Mode.V3_STORAGE and GUEST not in [d.name for d in _domains(run.dst)]:
        # the disk Prepare created goes when the guest did not move (the source keeps its own)
        with run.dst.client() as c:
            if f"{GUEST}.raw" in [v.name for v in c.vol_list("default")]:
                problems.append(f"{run.dst.name} keeps the volume the failed migration created")
    return problems


def _migrate_again(run: _Run, side: str) -> None:
    """The guest (a fresh one if it was lost) must migrate with the same protocol now."""
    if not side:
        side = "src"
        _boot(run.src, run.case.mode)
    src = run.host(side)
    dst = run.host("dst" if side == "src" else "src")
    with src.client() as c:
        before = wait_heartbeat(c, GUEST)
    _start_client(run, src, dst)
    assert run.client is not None
    try:
        run.client.wait(timeout=MIGRATE_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        raise CaseFailed(f"new migration still running after {MIGRATE_TIMEOUT_S:.0f} s") from None
    note = _client_result(run)
    if note != "client: ok":
        raise CaseFailed(f"the new migration failed: {note}")
    with dst.client() as c:
        info = c.dominfo(GUEST)
        if info.state != "running":
            raise CaseFailed(f"after the new migration the guest is {info.state} ({info.reason})")
        check_continuity(before, wait_heartbeat(c, GUEST, after=before))


# -- logs ---------------------------------------------------------------------------------------


def _keep_logs(run: _Run, dest: Path) -> list[str]:
    """Copy the daemons' and client's logs of a failed case to *dest*/<case>/."""
    where = dest / run.case.id.replace("/", "_")
    shutil.rmtree(where, ignore_errors=True)
    where.mkdir(parents=True)
    kept = []
    for side in ("src", "dst"):
        host = run.host(side)
        for src in [host.log, *sorted((host.state_dir / "log").glob("*.log"))]:
            if src.exists():
                target = where / f"{side}-{src.name}"
                shutil.copyfile(src, target)
                kept.append(str(target))
    for out in sorted(run.fpdir.glob("client-*.out")):
        shutil.copyfile(out, where / out.name)
        kept.append(str(where / out.name))
    return kept
