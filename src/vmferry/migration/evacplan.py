"""The plan of a host evacuation: where each guest goes, in which order, with what bandwidth.

Pure logic on plain numbers (issue 9 §3), so it is tested with synthetic guests.

*Placement*: largest guest first, each onto the destination with room for it
whose link finishes its share of the work soonest (longest-processing-time
first, which balances the links), so memory decides where a guest may go and
the links' load decides where it does go.

*Schedule*: a simulation of the drain. On one link, migrations set up
together (Prepare, the destination's QEMU: no memory moves) but send one at
a time at the full link, the next one ready when the previous stops
(:mod:`vmferry.migration.linkshare`): set-up hides behind the previous
migration's pass, and no pre-copy runs at half a link (it would re-send more
of what its guest dirties, and a hot guest might not converge at all). The
planner tries every per-link concurrency (1: no overlap) up to the limits and
keeps the one whose drain ends soonest (ties: the deepest queue of ready
migrations); the convergence model
(:mod:`.policy.model`) tells how long each guest sends and its downtime.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field

from vmferry.migration.policy.model import DirtyModel, predict

MIB = 1 << 20
#: Seconds a migration costs besides moving memory: Prepare, the destination's QEMU, Finish.
SETUP_S = 1.0
# A guest that does not converge is planned at this many full copies of its memory
# (the policy's throttling or post-copy ends it): an estimate, flagged in the plan.
_NON_CONVERGING_COPIES = 2.0
_MAX_EVENTS = 100_000


@dataclass(frozen=True)
class Guest:
    """A domain to move off the host, and how it dirties memory."""

    name: str
    uuid: str
    memory_bytes: int
    dirty_rate_bps: float = 0.0
    working_set_bytes: float = math.inf
    downtime_target_ms: int = 300

    def model(self) -> DirtyModel:
        return DirtyModel(self.dirty_rate_bps, min(self.working_set_bytes, self.memory_bytes))


@dataclass(frozen=True)
class Target:
    """A destination host: its memory free and the bandwidth of the link to it."""

    name: str
    uri: str
    free_bytes: int
    link_bps: float


@dataclass(frozen=True)
class Limits:
    """How many migrations may run at once: from the source, into a destination, on a link."""

    max_parallel: int = 2
    per_destination: int = 2
    per_link: int = 2
    setup_s: float = SETUP_S
    #: Memory each destination keeps free beyond the guests it takes.
    reserve_bytes: int = 0


@dataclass
class Move:
    """One guest's migration in the plan."""

    name: str
    uuid: str
    dest: str
    dest_uri: str
    memory_bytes: int
    order: int = 0  # 1 = starts first
    start_s: float = 0.0
    end_s: float = 0.0
    bandwidth_bps: float = 0.0  # what it sends at (the link: one sends at a time)
    downtime_ms: float = 0.0  # predicted
    converges: bool = True

    @property
    def duration_s(self) -> float:
        return self.end_s - self.start_s


@dataclass
class Plan:
    moves: list[Move] = field(default_factory=list)
    #: Guests no destination has room for: name -> why.
    unplaced: dict[str, str] = field(default_factory=dict)
    per_link: int = 1  # the concurrency per link the schedule uses
    total_s: float = 0.0  # predicted end of the whole drain

    def in_order(self) -> list[Move]:
        return sorted(self.moves, key=lambda m: m.order)


def migration_time(guest: Guest, bandwidth_bps: float) -> tuple[float, float, bool]:
    """(seconds to move *guest* at *bandwidth_bps*, predicted downtime s, converges)."""
    pred = predict(
        guest.memory_bytes, bandwidth_bps, guest.model(), guest.downtime_target_ms / 1000.0
    )
    if bandwidth_bps <= 0:
        return math.inf, math.inf, False
    most = _NON_CONVERGING_COPIES * guest.memory_bytes / bandwidth_bps
    if pred.converges:
        # A guest dirtying nearly the link converges, in the model, only after many copies;
        # its policy throttles it long before (and a 300 ms sample of a dirty rate is noisy:
        # on the loaded bench 33 MiB/s was read for a guest writing 14): no plan counts it
        # for more than a non-converging one, or one such reading unbalances the links.
        return min(pred.eta_s, most), pred.downtime_s, True
    return most, math.inf, False


def place(
    guests: Sequence[Guest], targets: Sequence[Target], limits: Limits
) -> tuple[dict[str, Target], dict[str, str]]:
    """Where each guest goes (by name), and the guests that fit nowhere with the reason."""
    free = {t.name: t.free_bytes - limits.reserve_bytes for t in targets}
    load = {t.name: 0.0 for t in targets}
    where: dict[str, Target] = {}
    unplaced: dict[str, str] = {}
    for g in sorted(guests, key=lambda g: (-g.memory_bytes, g.name)):
        fits = [t for t in targets if free[t.name] >= g.memory_bytes and t.link_bps > 0]
        if not fits:
            most = max(free.values(), default=0)
            unplaced[g.name] = (
                f"needs {g.memory_bytes // MIB} MiB; the most any destination has left "
                f"is {max(most, 0) // MIB} MiB"
            )
            continue
        best = min(
            fits,
            key=lambda t: (load[t.name] + migration_time(g, t.link_bps)[0], -free[t.name], t.name),
        )
        where[g.name] = best
        free[best.name] -= g.memory_bytes
        # Set-up overlaps the previous migration's sending: only sending loads the link.
        load[best.name] += migration_time(g, best.link_bps)[0]
    return where, unplaced


@dataclass
class _Run:
    guest: Guest
    target: Target
    setup_left: float
    send_left: float  # seconds of sending at the full link
    start: float = 0.0
    sending: bool = False


def schedule(
    where: dict[str, Target], guests: Sequence[Guest], limits: Limits, per_link: int
) -> tuple[list[Move], float]:
    """Simulate the drain with at most *per_link* migrations per link; the moves and the end.

    On a link, migrations set up together but send one at a time at the full
    link, in the order they started (:mod:`vmferry.migration.linkshare`).
    """
    by_name = {g.name: g for g in guests}
    queues: dict[str, list[Guest]] = {}
    targets: dict[str, Target] = {}
    for name, t in where.items():
        queues.setdefault(t.name, []).append(by_name[name])
        targets[t.name] = t
    for tname, q in queues.items():
        # Longest first: the tail of each link is a short migration.
        q.sort(key=lambda g: (-migration_time(g, targets[tname].link_bps)[0], g.name))
    running: dict[str, list[_Run]] = {t: [] for t in queues}
    moves: list[Move] = []
    now = 0.0
    order = 0
    cap = min(per_link, limits.per_destination, limits.per_link)
    for _ in range(_MAX_EVENTS):
        # Start what the limits allow: the link with the most work left first.
        while sum(len(r) for r in running.values()) < limits.max_parallel:
            free = [n for n in queues if queues[n] and len(running[n]) < cap]
            if not free:
                break
            tname = max(free, key=lambda n: (_work_left(queues[n], targets[n]), n))
            g = queues[tname].pop(0)
            seconds = migration_time(g, targets[tname].link_bps)[0]
            running[tname].append(_Run(g, targets[tname], limits.setup_s, seconds, start=now))
            order += 1
            moves.append(_move(running[tname][-1], order))
        # The gate: the first set-up migration of an idle link sends.
        for runs in running.values():
            if not any(r.sending for r in runs):
                ready = [r for r in runs if r.setup_left <= 0]
                if ready:
                    ready[0].sending = True
        active = [r for runs in running.values() for r in runs]
        if not active:
            break
        # The next event: a set-up ends or a migration stops sending.
        step = min(
            (r.send_left if r.sending else r.setup_left)
            for r in active
            if r.sending or r.setup_left > 0
        )
        step = max(step, 0.0)
        for r in active:
            if r.sending:
                r.send_left -= step
            elif r.setup_left > 0:
                r.setup_left = max(0.0, r.setup_left - step)
        now += step
        for runs in running.values():
            for r in [r for r in runs if r.sending and r.send_left <= 1e-9]:
                runs.remove(r)
                _finish(moves, r, now)
    return moves, now


def _work_left(queue: list[Guest], target: Target) -> float:
    return sum(migration_time(g, target.link_bps)[0] for g in queue)


def _move(run: _Run, order: int) -> Move:
    return Move(
        name=run.guest.name,
        uuid=run.guest.uuid,
        dest=run.target.name,
        dest_uri=run.target.uri,
        memory_bytes=run.guest.memory_bytes,
        order=order,
        start_s=run.start,
    )


def _finish(moves: list[Move], run: _Run, now: float) -> None:
    move = next(m for m in moves if m.name == run.guest.name)
    move.end_s = now
    move.bandwidth_bps = run.target.link_bps
    _, downtime, converges = migration_time(run.guest, run.target.link_bps)
    move.downtime_ms = downtime * 1000.0
    move.converges = converges


def plan(guests: Sequence[Guest], targets: Sequence[Target], limits: Limits) -> Plan:
    """
    The evacuation plan of *guests* onto *targets*.

    Tries each per-link concurrency from 1 up to the limits and keeps the
    soonest drain in which every guest that can converge does (ties: more
    at once, see :func:`_better`).
    """
    names = [g.name for g in guests]
    if len(set(names)) != len(names):
        raise ValueError("two guests with the same name")
    where, unplaced = place(guests, targets, limits)
    cap = max(1, min(limits.per_link, limits.per_destination, limits.max_parallel))
    best: Plan | None = None
    for per_link in range(1, cap + 1):
        moves, end = schedule(where, guests, limits, per_link)
        candidate = Plan(moves, dict(unplaced), per_link, end)
        if best is None or _better(candidate, best):
            best = candidate
    assert best is not None
    return best


def _better(a: Plan, b: Plan) -> bool:
    """Whether *a* (more at once per link than *b*) is the better plan."""
    bad_a = sum(1 for m in a.moves if not m.converges)
    bad_b = sum(1 for m in b.moves if not m.converges)
    if bad_a != bad_b:
        return bad_a < bad_b
    # Ties go to more at once: the extra ones only set up ahead (one sends per link), which
    # costs no link, and real set-ups vary far more than SETUP_S (0.3 s on a quiet host,
    # 4-6 s measured with the destinations' CPUs loaded): a deeper queue keeps the link busy.
    return a.total_s <= b.total_s + 1e-9
