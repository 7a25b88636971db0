"""A corrupt state directory or a failed write never stops or half-breaks a real vmferryd.

Issue 11, part 4: one bad ``run/NAME.json``, ``qemu/NAME.xml`` or
``host.json``, or a live QEMU whose QMP socket is gone, used to stop the
daemon from starting; a refused ``create`` rewrote a running guest's
definition; a failed status write left a "paused/starting-up" domain with no
QEMU.
"""

from __future__ import annotations

import json
import re
import signal
import time
import uuid
from pathlib import Path

import pytest

from vmferry.cli.main import main
from vmferry.daemon.config import DaemonConfig
from vmferry.daemon.host import load_or_create_host_identity
from vmferry.daemon.state import StateDir
from vmferry.domain.xml import parse_domain_xml
from vmferry.errors import ErrorCode, VmferryError
from vmferry.failpoints import ENV_VAR
from vmferry.testguest import guest_xml
from vmferry.testing import Host, hosts
from vmferry.testing.stray import stray_qemu, write_status

pytestmark = pytest.mark.qemu


def _aside(path: Path) -> list[Path]:
    return sorted(path.parent.glob(f"{path.name}.corrupt-*"))


def _states(h: Host) -> dict[str, tuple[str, str]]:
    with h.client() as c:
        return {d.name: (d.state, d.reason) for d in c.list_domains(all=True)}


def test_corrupt_state_files_do_not_stop_the_daemon(capsys: pytest.CaptureFixture[str]) -> None:
    with hosts(1) as (h,):
        with h.client() as c:
            for name in ("ok", "empty", "garbage", "badxml", "wrongshape"):
                c.define(guest_xml(name))
        h.kill(signal.SIGKILL)
        state = StateDir(h.state_dir)
        state.status_path("empty").write_text("")
        state.status_path("garbage").write_bytes(b"\xff\xfe{not json")
        state.status_path("wrongshape").write_text(json.dumps({"state": "bogus", "xml": 5}))
        state.status_path("ghost").write_text("[1, 2")  # no definition behind it
        state.definition_path("badxml").write_text("<domain type='kvm'><name>badx")
        h.start()

        seen = _states(h)
        assert seen["ok"] == ("shutoff", "unknown")
        for name in ("empty", "garbage", "wrongshape"):
            assert seen[name] == ("shutoff", "status-corrupt"), name
            assert not state.status_path(name).exists()
            assert len(_aside(state.status_path(name))) == 1
        assert "badxml" not in seen and "ghost" not in seen
        assert _aside(state.definition_path("badxml"))[0].read_text().startswith("<domain")
        assert _aside(state.status_path("ghost"))[0].read_text() == "[1, 2"
        assert not state.definition_path("badxml").exists()
        log = h.log.read_text()
        assert "status of domain garbage is corrupt" in log
        assert "definition of domain badxml is corrupt" in log

        assert main(["-c", h.uri, "list", "--all"]) == 0  # the CLI shows why
        listed = capsys.readouterr().out
        assert re.search(r"garbage\s+shut off \(status-corrupt\)", listed), listed
        # Everything else is managed normally, the reported domains included.
        with h.client() as c:
            assert c.start("empty").state == "running"
            assert c.destroy("empty").reason == "destroyed"
            c.define(guest_xml("badxml"))
            assert c.dominfo("badxml").state == "shutoff"
        # A second restart finds nothing corrupt any more.
        h.kill(signal.SIGKILL)
        h.start()
        assert _states(h)["garbage"] == ("shutoff", "unknown")


def test_corrupt_status_of_a_running_guest_reattaches_its_qemu() -> None:
    with hosts(1) as (h,):
        with h.client() as c:
            c.define(guest_xml("g"))
            c.start("g")
        (pid,) = h.qemu_pids()
        h.kill(signal.SIGKILL)
        state = StateDir(h.state_dir)
        state.status_path("g").write_text('{"name": "g", "state": "runn')  # torn write
        h.start()
        with h.client() as c:
            st = c.domstate("g")
            assert st.state in ("running", "paused") and st.reason == "status-corrupt"
            assert h.qemu_pids() == [pid]  # the same QEMU, no second one
            assert c.suspend("g").state == "paused"  # managed through its monitor again
            assert c.destroy("g").reason == "destroyed"
        assert h.qemu_pids() == []
        assert len(_aside(state.status_path("g"))) == 1


def test_live_qemu_without_qmp_socket_is_reported_and_destroyable() -> None:
    with hosts(1) as (h,):
        with h.client() as c:
            c.define(guest_xml("other"))
        h.kill(signal.SIGKILL)
        state = StateDir(h.state_dir)
        definition = parse_domain_xml(guest_xml("lost"))
        sock = state.qmp_socket("lost")
        qemu = stray_qemu(sock, "-uuid", definition.uuid, "-mon", "chardev=m,mode=control")
        try:
            deadline = time.monotonic() + 10
            while not sock.exists() and time.monotonic() < deadline:
                time.sleep(0.02)
            sock.unlink()  # the QEMU lives on, but nobody can reach its monitor
            write_status(
                state, definition, state="running", reason="booted", pid=qemu.pid, run_id=3
            )
            h.start()
            seen = _states(h)
            assert seen["lost"] == ("nostate", "monitor-lost")
            assert seen["other"] == ("shutoff", "unknown")
            assert qemu.poll() is None  # the guest was not killed behind the admin's back
            with h.client() as c:
                with pytest.raises(VmferryError) as err:
                    c.start("lost")
                assert err.value.code == ErrorCode.OPERATION_INVALID  # never a second QEMU
                c.destroy("lost")
                assert c.list_domains(all=True)[0].name == "other"
            assert qemu.wait(timeout=10) is not None
        finally:
            qemu.kill()
            qemu.wait()


def test_corrupt_host_json_keeps_a_legible_uuid(tmp: Path) -> None:
    state = StateDir(tmp / "s")
    state.ensure()
    old = str(uuid.uuid4())
    state.host_file.write_text(f'{{"hostname": "h", "uuid": "{old}"')  # cut short
    assert load_or_create_host_identity(state, DaemonConfig()).uuid == old
    assert json.loads(state.host_file.read_text())["uuid"] == old
    assert len(_aside(state.host_file)) == 1


def test_empty_host_json_gets_a_new_uuid_loudly(
    tmp: Path, caplog: pytest.LogCaptureFixture
) -> None:
    state = StateDir(tmp / "s")
    state.ensure()
    state.host_file.write_text("")
    identity = load_or_create_host_identity(state, DaemonConfig())
    assert json.loads(state.host_file.read_text())["uuid"] == identity.uuid
    assert _aside(state.host_file)[0].read_text() == ""
    assert f"NEW host UUID {identity.uuid}" in caplog.text


def test_daemon_starts_with_corrupt_host_json() -> None:
    with hosts(1) as (h,):
        state = StateDir(h.state_dir)
        old = json.loads(state.host_file.read_text())["uuid"]
        h.kill(signal.SIGKILL)
        state.host_file.write_bytes(b'\x00\x00{"uuid": "' + old.encode() + b'"')
        h.start()
        with h.client() as c:
            assert c.host().hostname == "host0"
        assert json.loads(state.host_file.read_text())["uuid"] == old
        assert re.search(r"kept its host UUID", h.log.read_text())


def test_refused_create_does_not_touch_the_running_guest() -> None:
    with hosts(1) as (h,), h.client() as c:
        c.define(guest_xml("g"))
        c.start("g")
        before = c.dumpxml("g")
        definition = parse_domain_xml(before)
        bigger = guest_xml("g", memory_mib=256, vcpus=2, uuid=definition.uuid)
        with pytest.raises(VmferryError) as err:
            c.create(bigger)
        assert err.value.code == ErrorCode.DOMAIN_EXISTS
        assert c.dumpxml("g") == before
        info = c.dominfo("g")
        assert (info.vcpus, info.state) == (1, "running")
        assert c.dumpxml("g", inactive=True) == c.dumpxml("g")
        c.destroy("g")
        assert c.dominfo("g").vcpus == 1


def test_failed_status_write_leaves_no_half_made_domain() -> None:
    with hosts(1) as (h,):
        h.kill(signal.SIGKILL)
        h.extra_env[ENV_VAR] = "status-write=error"
        h.start()
        with h.client() as c:
            c.define(guest_xml("g"))
            with pytest.raises(VmferryError) as err:
                c.start("g")
            assert err.value.code == ErrorCode.OPERATION_FAILED
            assert "No space left on device" in err.value.message
            st = c.domstate("g")
            assert (st.state, st.reason) == ("shutoff", "failed")
            with pytest.raises(VmferryError):
                c.create(guest_xml("t"))
            assert [d.name for d in c.list_domains(all=True)] == ["g"]
        assert h.qemu_pids() == []
        assert list((h.state_dir / "run").glob("*.json")) == []


def test_failed_definition_write_defines_nothing() -> None:
    with hosts(1) as (h,):
        with h.client() as c:
            c.define(guest_xml("g"))
        h.kill(signal.SIGKILL)
        h.extra_env[ENV_VAR] = "definition-write=error"
        h.start()
        with h.client() as c:
            with pytest.raises(VmferryError) as err:
                c.define(guest_xml("new"))
            assert err.value.code == ErrorCode.OPERATION_FAILED
            assert "No space left on device" in err.value.message
            with pytest.raises(VmferryError):
                c.define(guest_xml("g", vcpus=2, uuid=c.dominfo("g").uuid))
            assert [(d.name, d.vcpus) for d in c.list_domains(all=True)] == [("g", 1)]
            assert c.dumpxml("g", inactive=True) == c.dumpxml("g")
        assert sorted(p.name for p in (h.state_dir / "qemu").iterdir()) == ["g.xml"]
