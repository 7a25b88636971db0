"""Which migrations the drain starts next (vmferry.daemon.evacuate, no daemon, no QEMU)."""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any

from vmferry.api.models import EvacuateRequest, EvacuationInfo, EvacuationMove
from vmferry.daemon.evacuate import Evacuations


def drain(link_mib_s: int = 32, per_link: int = 3) -> Evacuations:
    ev = Evacuations(SimpleNamespace(driver=None))  # type: ignore[arg-type]
    moves = [
        EvacuationMove(name=f"{d}{i}", uuid=f"uuid-{d}{i}", dest=d, order=2 * i + (d == "c"))
        for i in range(1, 5)
        for d in ("b", "c")
    ]
    ev.info = EvacuationInfo(state="running", per_link=per_link, link_mib_s=link_mib_s, moves=moves)
    return ev


def start(ev: Evacuations, running: dict[Any, EvacuationMove], req: EvacuateRequest) -> list[str]:
    """What the drain starts now; marked running as the drain does."""
    out = ev._startable(running, req)
    for m in out:
        m.result = "running"
        running[object()] = m
    return [m.name for m in out]


def test_a_link_sets_up_its_first_migration_alone_then_queues_up_to_the_limit() -> None:
    ev, running = drain(), {}  # type: ignore[var-annotated]
    req = EvacuateRequest(max_parallel=6, per_destination=3)
    assert start(ev, running, req) == ["b1", "c1"]  # the first of each link only
    assert start(ev, running, req) == []  # both still set up, their links idle
    ev._link("b").waiting.append("uuid-b1")  # b1 is ready at b's gate
    assert start(ev, running, req) == ["b2"]
    assert start(ev, running, req) == []  # b1 is not sending yet: b2 sets up alone
    ev._link("b").waiting.remove("uuid-b1")
    ev._link("b").sending["uuid-b1"] = None  # type: ignore[assignment]
    assert start(ev, running, req) == ["b3"]  # b sends: set-ups may overlap behind it
    assert start(ev, running, req) == []  # three on b's link: its limit
    ev._link("b").sending.pop("uuid-b1")
    ev._link("b").left.add("uuid-b1")  # b1 switched over: it no longer counts
    assert start(ev, running, req) == ["b4"]


def test_without_a_link_bandwidth_set_ups_are_not_serialised() -> None:
    ev, running = drain(link_mib_s=0), {}  # type: ignore[var-annotated]
    req = EvacuateRequest(max_parallel=6, per_destination=3)
    assert start(ev, running, req) == ["b1", "c1", "b2", "c2", "b3", "c3"]


def test_a_move_carries_its_turn_on_the_link_from_the_drains_start() -> None:
    ev = drain()
    ev.info.started = 1000.0
    link, m = ev._link("b"), ev.info.moves[0]
    link.turns[m.uuid] = (1003.25, 1007.5)
    ev._note_turn(m, link)
    assert (m.turn_start_s, m.turn_end_s) == (3.25, 7.5)
    other = ev.info.moves[2]  # never had a turn (no link, or it failed before sending)
    ev._note_turn(other, link)
    assert other.turn_start_s is None and other.turn_end_s is None
