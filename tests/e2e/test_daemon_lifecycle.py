"""End-to-end lifecycle on real QEMU through a real vmferryd."""

from __future__ import annotations

import os
import signal
import time

import pytest

from vmferry.errors import ErrorCode, VmferryError
from vmferry.testguest import check_continuity, guest_xml
from vmferry.testing import Host, hosts, wait_heartbeat

pytestmark = pytest.mark.qemu


def test_define_start_suspend_resume_destroy() -> None:
    with hosts(1) as (h,), h.client() as c:
        c.define(guest_xml("g1"))
        assert [d.name for d in c.list_domains()] == []
        assert [d.state for d in c.list_domains(all=True)] == ["shutoff"]
        info = c.start("g1")
        assert (info.state, info.reason) == ("running", "booted")
        first = wait_heartbeat(c, "g1")
        assert c.suspend("g1").reason == "user"
        st = c.domstate("g1")
        assert (st.state, st.reason) == ("paused", "user")
        assert c.resume("g1").reason == "unpaused"
        later = wait_heartbeat(c, "g1", after=first)
        check_continuity(first, later)
        assert c.destroy("g1").reason == "destroyed"
        assert h.qemu_pids() == []
        # persistent: still defined, and can start again with a new boot
        assert c.start("g1").state == "running"
        again = wait_heartbeat(c, "g1")
        assert again.boot != first.boot
        c.destroy("g1")
        c.undefine("g1")
        with pytest.raises(VmferryError) as err:
            c.dominfo("g1")
        assert err.value.code == ErrorCode.NO_DOMAIN


def test_transient_domain_disappears_when_destroyed() -> None:
    with hosts(1) as (h,), h.client() as c:
        info = c.create(guest_xml("t1"))
        assert info.persistent is False and info.state == "running"
        c.destroy("t1")
        assert c.list_domains(all=True) == []


def test_errors_are_clear() -> None:
    with hosts(1) as (h,), h.client() as c:
        c.define(guest_xml("g1"))
        with pytest.raises(VmferryError) as err:
            c.suspend("g1")
        assert err.value.code == ErrorCode.OPERATION_INVALID
        assert "not running" in err.value.message
        with pytest.raises(VmferryError) as err:
            c.define(guest_xml("g1").replace("<vcpu>", "<hostdev/><vcpu>"))
        assert err.value.code == ErrorCode.CONFIG_UNSUPPORTED
        assert "hostdev" in err.value.message
        with pytest.raises(VmferryError) as err:
            c.define(guest_xml("g2", uuid=c.dominfo("g1").uuid))
        assert err.value.code == ErrorCode.DOMAIN_EXISTS


def test_qemu_crash_marks_domain_crashed() -> None:
    with hosts(1) as (h,), h.client() as c:
        c.define(guest_xml("g1"))
        c.start("g1")
        (pid,) = h.qemu_pids()
        os.kill(pid, signal.SIGKILL)
        deadline = time.monotonic() + 30  # a deadline only: the monitor's EOF comes at once
        while c.domstate("g1").state != "shutoff" and time.monotonic() < deadline:
            time.sleep(0.05)
        st = c.domstate("g1")
        assert (st.state, st.reason) == ("shutoff", "crashed")
        assert not (h.state_dir / "run" / "g1.json").exists()
        assert c.start("g1").state == "running"


def test_daemon_sigkill_and_restart_keeps_guest() -> None:
    with hosts(1) as (h,):
        with h.client() as c:
            c.define(guest_xml("g1"))
            c.create(guest_xml("t1"))
            c.start("g1")
            before = wait_heartbeat(c, "g1")
        pids = sorted(h.qemu_pids())
        h.kill(signal.SIGKILL)
        h.start()
        with h.client() as c:
            assert sorted(h.qemu_pids()) == pids
            names = {d.name: d for d in c.list_domains()}
            assert set(names) == {"g1", "t1"}
            assert names["t1"].persistent is False
            after = wait_heartbeat(c, "g1", after=before)
            check_continuity(before, after)
            assert c.suspend("g1").state == "paused"
            assert c.resume("g1").state == "running"
            c.destroy("t1")


def test_qemu_dies_while_daemon_is_down() -> None:
    with hosts(1) as (h,):
        with h.client() as c:
            c.define(guest_xml("g1"))
            c.start("g1")
        (pid,) = h.qemu_pids()
        h.kill(signal.SIGKILL)
        os.kill(pid, signal.SIGKILL)
        h.start()
        with h.client() as c:
            st = c.domstate("g1")
            assert (st.state, st.reason) == ("shutoff", "crashed")
            assert c.start("g1").state == "running"


def test_event_stream_reports_lifecycle() -> None:
    with hosts(1) as (h,), h.client() as c:
        c.define(guest_xml("g1"))
        with c.events() as events:
            c.start("g1")
            c.suspend("g1")
            c.resume("g1")
            c.destroy("g1")
            seen = []
            for ev in events:
                seen.append((ev.type, ev.reason))
                if ev.type == "stopped":
                    break
        assert seen == [
            ("started", "booted"),
            ("suspended", "user"),
            ("resumed", "unpaused"),
            ("stopped", "destroyed"),
        ]


def test_host_identity_is_distinct(tmp_path: object) -> None:
    with hosts(2) as (a, b), a.client() as ca, b.client() as cb:
        assert ca.host().uuid != cb.host().uuid
        assert isinstance(a, Host)


def test_qemu_left_by_an_unfinished_start_is_killed() -> None:
    """The daemon died between spawning QEMU and recording its pid: restart kills that QEMU."""
    from vmferry.daemon.state import StateDir
    from vmferry.domain.xml import parse_domain_xml
    from vmferry.qemu.command import qmp_marker
    from vmferry.testing.stray import stray_qemu, write_status

    with hosts(1) as (h,):
        h.kill(signal.SIGKILL)
        state = StateDir(h.state_dir)
        definition = parse_domain_xml(guest_xml("orphan"))
        sock = state.qmp_socket("orphan")
        qemu = stray_qemu(sock, "-mon", "chardev=m", "-chardev", f"null,id={qmp_marker(sock)}")
        try:
            write_status(
                state,
                definition,
                state="paused",
                reason="starting-up",
                pid=None,
                run_id=1,
                bound_session="",
            )
            h.start()
            assert qemu.wait(timeout=10) != 0
            with h.client() as c:
                assert c.list_domains(all=True) == []
        finally:
            qemu.kill()
            qemu.wait()
