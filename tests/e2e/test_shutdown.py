"""``shutdown`` on real QEMU: the test guest honours (or, when told, ignores) the power button."""

from __future__ import annotations

import queue
import threading
import time

import pytest

from vmferry.api.models import Event
from vmferry.client import Client
from vmferry.client.sync import EventStream
from vmferry.errors import ErrorCode, VmferryError
from vmferry.testguest import check_continuity, guest_xml
from vmferry.testing import hosts, wait_heartbeat

pytestmark = pytest.mark.qemu


def _pump(events: EventStream) -> queue.Queue[Event]:
    """Move *events* into a queue from a thread: a missing event then fails instead of hanging."""
    q: queue.Queue[Event] = queue.Queue()

    def run() -> None:
        try:
            for ev in events:
                q.put(ev)
        except VmferryError:
            pass  # the daemon went away at the end of the test

    threading.Thread(target=run, daemon=True).start()
    return q


def _collect_until(
    q: queue.Queue[Event], name: str, last: str, timeout: float
) -> list[tuple[str, str]]:
    seen: list[tuple[str, str]] = []
    deadline = time.monotonic() + timeout
    while True:
        try:
            ev = q.get(timeout=max(0.0, deadline - time.monotonic()))
        except queue.Empty:
            raise AssertionError(
                f"no '{last}' event for {name} within {timeout} s; saw {seen}"
            ) from None
        if ev.domain != name:
            continue
        seen.append((ev.type, ev.reason))
        if ev.type == last:
            return seen


def _wait_console(c: Client, name: str, text: str, timeout: float = 30.0) -> str:
    deadline = time.monotonic() + timeout
    data = c.console(name).data
    while text not in data and time.monotonic() < deadline:
        time.sleep(0.1)
        data = c.console(name).data
    return data


def test_shutdown_powers_the_guest_off() -> None:
    with hosts(1) as (h,), h.client() as c:
        c.define(guest_xml("g1"))
        with c.events() as events:
            q = _pump(events)
            c.start("g1")
            hb = wait_heartbeat(c, "g1")
            info = c.shutdown("g1", timeout=30)
            assert (info.state, info.reason) == ("shutoff", "shutdown")
            seen = _collect_until(q, "g1", "stopped", timeout=10)
        assert seen == [("started", "booted"), ("shutdown", "guest"), ("stopped", "shutdown")]
        st = c.domstate("g1")
        assert (st.state, st.reason) == ("shutoff", "shutdown")
        assert h.qemu_pids() == []
        # The guest itself powered off (not a kill), and it was the run we saw beating.
        assert f"VMFERRY-POWEROFF boot={hb.boot}" in c.console("g1").data
        assert [d.name for d in c.list_domains()] == []
        assert [d.name for d in c.list_domains(all=True)] == ["g1"]


def test_shutdown_times_out_when_the_guest_ignores_the_button() -> None:
    with hosts(1) as (h,), h.client() as c:
        c.define(guest_xml("g1", extra_cmdline="vmferry.ignore_power=1"))
        c.start("g1")
        before = wait_heartbeat(c, "g1")
        t0 = time.monotonic()
        with pytest.raises(VmferryError) as err:
            c.shutdown("g1", timeout=1.0)
        assert err.value.code == ErrorCode.OPERATION_TIMEOUT
        # It gave up at its 1 s: ignoring it would wait out the default 60 s (the guest never
        # powers off). Not tighter: a loaded machine may take seconds to answer.
        assert time.monotonic() - t0 < 30
        # The press reached the guest, which chose to carry on.
        console = _wait_console(c, "g1", "VMFERRY-POWER-IGNORED")
        assert f"VMFERRY-POWER-IGNORED boot={before.boot}" in console
        assert "VMFERRY-POWEROFF" not in console
        st = c.domstate("g1")
        assert (st.state, st.reason) == ("running", "booted")
        assert len(h.qemu_pids()) == 1
        check_continuity(before, wait_heartbeat(c, "g1", after=before))
        assert c.destroy("g1").reason == "destroyed"
        assert h.qemu_pids() == []
