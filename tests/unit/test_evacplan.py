"""The evacuation planner: placement, limits, ordering, memory exhaustion, a failed host."""

from __future__ import annotations

import itertools
import math

import pytest

from vmferry.migration.evacplan import MIB, Guest, Limits, Target, migration_time, place, plan

LINK = 100 * MIB  # bytes/s


def guest(name: str, mib: int = 128, dirty_mib_s: float = 0.0, target_ms: int = 300) -> Guest:
    return Guest(name, f"uuid-{name}", mib * MIB, dirty_mib_s * MIB, math.inf, target_ms)


def host(name: str, free_mib: int = 4096, link: float = LINK) -> Target:
    return Target(name, f"tls://{name}:16514", free_mib * MIB, link)


def concurrency(p, at: float, dest: str | None = None) -> int:  # type: ignore[no-untyped-def]
    return sum(1 for m in p.moves if m.start_s <= at < m.end_s and (dest is None or m.dest == dest))


def peak(p, dest: str | None = None) -> int:  # type: ignore[no-untyped-def]
    return max((concurrency(p, m.start_s, dest) for m in p.moves), default=0)


def test_every_guest_is_placed_where_memory_allows() -> None:
    guests = [guest("big", 3000), guest("mid", 1500), guest("small", 1000)]
    p = plan(guests, [host("b", 3500), host("c", 2600)], Limits())
    dest = {m.name: m.dest for m in p.moves}
    assert dest["big"] == "b"
    assert dest["mid"] == "c" and dest["small"] == "c"
    assert not p.unplaced


def test_memory_exhaustion_leaves_guests_unplaced_with_a_reason() -> None:
    guests = [guest("a", 1000), guest("b", 1000), guest("c", 1000)]
    p = plan(guests, [host("x", 2100)], Limits())
    assert len(p.moves) == 2
    ((name, why),) = p.unplaced.items()
    assert "needs 1000 MiB" in why and "100 MiB" in why
    assert name not in {m.name for m in p.moves}


def test_reserve_is_kept_free() -> None:
    where, unplaced = place([guest("a", 1000)], [host("x", 1100)], Limits(reserve_bytes=200 * MIB))
    assert not where and "a" in unplaced


def test_idle_guests_are_balanced_over_the_links() -> None:
    guests = [guest(f"g{i}") for i in range(6)]
    p = plan(guests, [host("b"), host("c")], Limits())
    per_dest = {d: sum(1 for m in p.moves if m.dest == d) for d in ("b", "c")}
    assert per_dest == {"b": 3, "c": 3}


@pytest.mark.parametrize("max_parallel,per_dest", [(1, 2), (2, 1), (3, 2), (4, 4)])
def test_limits_per_source_and_destination_hold(max_parallel: int, per_dest: int) -> None:
    guests = [guest(f"g{i}", 64) for i in range(8)]
    limits = Limits(max_parallel=max_parallel, per_destination=per_dest, per_link=4)
    p = plan(guests, [host("b"), host("c")], limits)
    assert len(p.moves) == 8
    assert peak(p) <= max_parallel
    assert peak(p, "b") <= per_dest and peak(p, "c") <= per_dest


def test_parallel_links_drain_faster_than_one_at_a_time() -> None:
    guests = [guest(f"g{i}", 128, dirty_mib_s=5) for i in range(4)]
    targets = [host("b"), host("c")]
    serial = plan(guests, targets, Limits(max_parallel=1))
    spread = plan(guests, targets, Limits(max_parallel=2))
    assert spread.total_s < serial.total_s * 0.7


def test_a_hot_guest_never_shares_a_link_it_would_not_converge_on() -> None:
    # 60 MiB/s of dirtying converges at 100 MiB/s alone, not at 50 MiB/s.
    assert migration_time(guest("hot", 256, 60), LINK)[2]
    assert not migration_time(guest("hot", 256, 60), LINK / 2)[2]
    guests = [guest("hot", 256, 60), guest("q1", 128), guest("q2", 128)]
    p = plan(guests, [host("b")], Limits(max_parallel=4, per_destination=4, per_link=4))
    hot = next(m for m in p.moves if m.name == "hot")
    assert hot.converges
    overlapping = [
        m for m in p.moves if m.name != "hot" and m.start_s < hot.end_s and hot.start_s < m.end_s
    ]
    # Others may overlap only during set-up times, never share the link with it: its share is all.
    assert hot.bandwidth_bps == pytest.approx(LINK)
    assert all(m.converges for m in p.moves), overlapping


def test_longest_guests_start_first_on_each_link() -> None:
    guests = [guest("s", 64), guest("l", 1024), guest("m", 256)]
    p = plan(guests, [host("b")], Limits(max_parallel=1))
    assert [m.name for m in p.in_order()] == ["l", "m", "s"]
    starts = [m.start_s for m in p.in_order()]
    assert starts == sorted(starts)


def test_every_downtime_is_within_target_when_possible() -> None:
    guests = [
        guest(f"d{i}", 128, dirty_mib_s=d) for i, d in enumerate([0, 10, 30, 50, 70, 5, 20, 40])
    ]
    p = plan(guests, [host("b"), host("c")], Limits(max_parallel=4, per_destination=2, per_link=2))
    for m in p.moves:
        assert m.converges, m
        assert m.downtime_ms <= 300
    assert p.total_s == pytest.approx(max(m.end_s for m in p.moves))


def test_a_guest_that_cannot_converge_is_flagged_not_dropped() -> None:
    p = plan([guest("wild", 128, dirty_mib_s=500)], [host("b")], Limits())
    (m,) = p.moves
    assert not m.converges and math.isinf(m.downtime_ms)
    assert math.isfinite(p.total_s)


def test_a_host_failing_mid_drain_replans_the_rest_onto_the_others() -> None:
    guests = [guest(f"g{i}", 512) for i in range(6)]
    first = plan(guests, [host("b", 2048), host("c", 2048)], Limits())
    assert {m.dest for m in first.moves} == {"b", "c"}
    # c fails after the first two moves: what is left goes to b, as far as memory allows.
    done = [m for m in first.in_order()[:2]]
    used_b = sum(m.memory_bytes for m in done if m.dest == "b")
    left = [g for g in guests if g.name not in {m.name for m in done}]
    again = plan(left, [host("b", 2048 - used_b // MIB)], Limits())
    assert all(m.dest == "b" for m in again.moves)
    assert len(again.moves) + len(again.unplaced) == len(left)
    assert sum(m.memory_bytes for m in again.moves) + used_b <= 2048 * MIB


def test_no_destinations_places_nothing() -> None:
    p = plan([guest("a")], [], Limits())
    assert not p.moves and "a" in p.unplaced and p.total_s == 0


def test_duplicate_names_are_refused() -> None:
    with pytest.raises(ValueError):
        plan([guest("a"), guest("a")], [host("b")], Limits())


def _sending(m) -> tuple[float, float]:  # type: ignore[no-untyped-def]
    """When a planned move sends: its last seconds, after its set-up and any wait for the link."""
    send = migration_time(guest(m.name, m.memory_bytes // MIB), LINK)[0]
    return m.end_s - send, m.end_s


def test_set_up_hides_behind_the_previous_migration_on_a_link() -> None:
    # Idle guests: sending is bandwidth alone; two per link overlap set-up, never sending.
    guests = [guest(f"g{i}", 256) for i in range(4)]
    one = plan(guests, [host("b")], Limits(max_parallel=1, per_destination=1, per_link=1))
    two = plan(guests, [host("b")], Limits(max_parallel=2, per_destination=2, per_link=2))
    send = migration_time(guests[0], LINK)[0]
    assert one.total_s == pytest.approx(4 * (1.0 + send))
    assert two.per_link == 2
    assert two.total_s == pytest.approx(1.0 + 4 * send)  # the link never idles after the first
    spans = sorted(_sending(m) for m in two.moves)
    for (_, end), (start, _) in itertools.pairwise(spans):
        assert start >= end - 1e-6  # one sends at a time, at the whole link
    assert all(m.bandwidth_bps == LINK for m in two.moves)


def test_links_are_balanced_by_predicted_work_not_count() -> None:
    # One big guest weighs as much as four small ones: 1 + 4, not 3 + 2.
    guests = [guest("big", 1024)] + [guest(f"s{i}", 256) for i in range(4)]
    p = plan(guests, [host("b"), host("c")], Limits(max_parallel=4, per_destination=2, per_link=2))
    big = next(m.dest for m in p.moves if m.name == "big")
    assert sum(1 for m in p.moves if m.dest == big) == 1


def test_a_tie_goes_to_the_deeper_queue_of_ready_migrations() -> None:
    # Two or three per link drain alike in the model (set-up hides behind one send either
    # way); the third one sets up ahead, which keeps the link busy when set-ups run slower.
    guests = [guest(f"g{i}", 256) for i in range(6)]
    p = plan(guests, [host("b")], Limits(max_parallel=3, per_destination=3, per_link=3))
    two = plan(guests, [host("b")], Limits(max_parallel=2, per_destination=2, per_link=2))
    assert p.total_s == pytest.approx(two.total_s)
    assert p.per_link == 3


def test_a_guest_dirtying_nearly_the_link_counts_no_more_than_a_non_converging_one() -> None:
    # 97 % of the link converges in the model only after three copies; placement must not
    # take that at its word (one noisy reading would leave a link with the others' work).
    near = guest("near", 128, dirty_mib_s=0.97 * LINK / MIB)
    over = guest("over", 128, dirty_mib_s=2 * LINK / MIB)
    seconds, _, converges = migration_time(near, LINK)
    never, _, converges_over = migration_time(over, LINK)
    assert converges and not converges_over
    assert seconds == pytest.approx(never)  # two copies of its memory at the link, no more
    assert migration_time(guest("idle", 128), LINK)[0] < seconds
