"""Config file, state directory, atomic writes and host identity (vmferry.daemon.*)."""

from __future__ import annotations

import json
import os
import socket
import stat
import uuid
from pathlib import Path

import pytest

from vmferry.daemon import state as state_mod
from vmferry.daemon.config import DaemonConfig, load_config
from vmferry.daemon.host import HostIdentity, load_or_create_host_identity
from vmferry.daemon.state import UNIX_PATH_MAX, StateDir, atomic_write
from vmferry.errors import ErrorCode, VmferryError


@pytest.fixture
def sdir(tmp: Path) -> StateDir:
    state = StateDir(tmp / "s")
    state.ensure()
    return state


def write_config(tmp: Path, text: str) -> Path:
    path = tmp / "vmferryd.toml"
    path.write_text(text)
    return path


# --- config ------------------------------------------------------------------------------------


def test_config_defaults() -> None:
    config = load_config(None)
    assert config == DaemonConfig()
    assert config.jobs.wait_timeout == 30.0
    assert (config.migration.port_min, config.migration.port_max) == (49152, 49215)
    assert config.migration.listen_address == ""
    assert config.migration.bandwidth_mib_s == 0
    assert (config.keepalive.interval, config.keepalive.count) == (5.0, 5)
    assert config.tls.pki_dir is None
    assert config.qemu.emulator == "qemu-system-x86_64"
    assert config.host.hostname == config.host.uuid == ""


def test_config_full_file(tmp: Path) -> None:
    host_uuid = "0F1E2D3C-4B5A-6978-8796-A5B4C3D2E1F0"
    path = write_config(
        tmp,
        f"""
[host]
hostname = "alpha"
uuid = "{host_uuid}"
[jobs]
wait_timeout = 12          # an integer is a fine number of seconds
[migration]
port_min = 50000
port_max = 50010
listen_address = "192.0.2.5"
bandwidth_mib_s = 100
[keepalive]
interval = 0.5
count = 3
[tls]
pki_dir = "pki"
[qemu]
emulator = "/opt/qemu/bin/qemu-system-x86_64"
""",
    )
    config = load_config(path)
    assert config.host.hostname == "alpha"
    assert config.host.uuid == host_uuid.lower()
    assert config.jobs.wait_timeout == 12.0 and isinstance(config.jobs.wait_timeout, float)
    assert (config.migration.port_min, config.migration.port_max) == (50000, 50010)
    assert config.migration.listen_address == "192.0.2.5"
    assert config.migration.bandwidth_mib_s == 100
    assert (config.keepalive.interval, config.keepalive.count) == (0.5, 3)
    assert config.tls.pki_dir == tmp / "pki"  # relative to the file
    assert config.qemu.emulator == "/opt/qemu/bin/qemu-system-x86_64"


def test_config_qemu_trace_events(tmp: Path) -> None:
    text = '[qemu]\ntrace_events = ["vmstate_downtime_checkpoint", "migrate_pending_*"]\n'
    config = load_config(write_config(tmp, text))
    assert config.qemu.trace_events == ["vmstate_downtime_checkpoint", "migrate_pending_*"]
    assert load_config(None).qemu.trace_events == []


def test_config_partial_file_keeps_other_defaults(tmp: Path) -> None:
    config = load_config(write_config(tmp, '[tls]\npki_dir = "/etc/vmferry/pki"\n'))
    assert config.tls.pki_dir == Path("/etc/vmferry/pki")
    assert config.migration.port_min == 49152


@pytest.mark.parametrize(
    ("text", "words"),
    [
        ("[jobs]\nwait_timout = 3\n", "jobs.wait_timout"),
        ("[job]\nwait_timeout = 3\n", "[job]"),
        ("jobs = 3\n", "jobs"),
        ('[migration]\nport_min = "49152"\n', "migration.port_min must be an integer"),
        ("[migration]\nport_min = 1.5\n", "migration.port_min must be an integer"),
        ("[migration]\nbandwidth_mib_s = true\n", "migration.bandwidth_mib_s"),
        ('[jobs]\nwait_timeout = "30"\n', "jobs.wait_timeout must be a number"),
        ("[qemu]\nemulator = 3\n", "qemu.emulator must be a string"),
        ("[tls]\npki_dir = 3\n", "tls.pki_dir"),
        ("[migration]\nport_min = 50000\nport_max = 49999\n", "port_min"),
        ("[migration]\nport_max = 70000\n", "migration.port_max"),
        ("[migration]\ntls_channels = 17\n", "migration.tls_channels"),
        ("[migration]\ntls_channels = -1\n", "migration.tls_channels"),
        ("[jobs]\nwait_timeout = 0\n", "jobs.wait_timeout"),
        ('[host]\nuuid = "not-a-uuid"\n', "host.uuid"),
        # a trace event name, never another -trace option (QEMU would write a file)
        ('[qemu]\ntrace_events = ["x,file=/etc/passwd"]\n', "qemu.trace_events"),
        ('[qemu]\ntrace_events = ["events=/etc/shadow"]\n', "qemu.trace_events"),
        ('[qemu]\ntrace_events = [""]\n', "qemu.trace_events"),
        ("[qemu]\ntrace_events = [3]\n", "qemu.trace_events"),
        ("[qemu]\ntrace_events = [" + '"a",' * 65 + "]\n", "qemu.trace_events"),
        ("[jobs\n", "invalid TOML"),
    ],
)
def test_config_errors_name_key_and_file(tmp: Path, text: str, words: str) -> None:
    path = write_config(tmp, text)
    with pytest.raises(VmferryError) as err:
        load_config(path)
    assert err.value.code == ErrorCode.INVALID_ARG
    assert str(path) in err.value.message
    assert words in err.value.message


def test_config_missing_file(tmp: Path) -> None:
    with pytest.raises(VmferryError) as err:
        load_config(tmp / "nope.toml")
    assert err.value.code == ErrorCode.INVALID_ARG
    assert "nope.toml" in err.value.message


# --- atomic_write ------------------------------------------------------------------------------


def test_atomic_write_content_mode_no_temp_files(tmp: Path) -> None:
    path = tmp / "f.json"
    atomic_write(path, "one")
    atomic_write(path, b"two\x00bytes")
    assert path.read_bytes() == b"two\x00bytes"
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    atomic_write(tmp / "g", "x", mode=0o644)
    assert stat.S_IMODE((tmp / "g").stat().st_mode) == 0o644
    assert sorted(os.listdir(tmp)) == ["f.json", "g"]


def test_atomic_write_not_durable_swaps_in_the_new_content(
    tmp: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp / "f.json"
    atomic_write(path, "a much longer first content", durable=False)  # nothing to swap with
    assert path.read_text() == "a much longer first content"
    before = path.stat().st_ino
    atomic_write(path, "short", durable=False)
    assert path.read_text() == "short"
    assert path.stat().st_ino != before  # a new file, never the old one rewritten in place
    assert sorted(os.listdir(tmp)) == ["f.json"]  # the old content went with the temp name
    # Where the exchange cannot be done (another libc or file system): a rename, same result.
    monkeypatch.setattr(state_mod, "_RENAMEAT2", None)
    atomic_write(path, "renamed", durable=False)
    assert path.read_text() == "renamed"
    assert sorted(os.listdir(tmp)) == ["f.json"]


def test_exchange_swaps_both_names(tmp: Path) -> None:
    a, b = tmp / "a", tmp / "b"
    a.write_text("new")
    b.write_text("old")
    if not state_mod._exchange(a, b):
        pytest.skip("this file system has no RENAME_EXCHANGE")
    assert (a.read_text(), b.read_text()) == ("old", "new")
    assert not state_mod._exchange(a, tmp / "missing")  # nothing to swap with: rename instead


@pytest.mark.parametrize("failing", ["replace", "fsync"])
def test_atomic_write_failure_keeps_old_content(
    tmp: Path, monkeypatch: pytest.MonkeyPatch, failing: str
) -> None:
    path = tmp / "f.json"
    atomic_write(path, "old")
    calls: list[str] = []

    def fail(*args: object) -> None:
        calls.append(failing)
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, failing, fail)
    with pytest.raises(OSError, match="No space"):
        atomic_write(path, "new")
    monkeypatch.undo()
    assert calls == [failing]
    assert path.read_text() == "old"
    assert os.listdir(tmp) == ["f.json"]


# --- StateDir ----------------------------------------------------------------------------------


def test_state_dir_layout(tmp: Path) -> None:
    state = StateDir(tmp / "s")
    state.ensure()
    state.ensure()  # idempotent
    for sub, name in ((state.config_dir, "qemu"), (state.run_dir, "run"), (state.log_dir, "log")):
        assert sub == tmp / "s" / name
        assert stat.S_IMODE(sub.stat().st_mode) == 0o700
    assert state.host_file == tmp / "s" / "host.json"
    assert state.definition_path("vm1") == tmp / "s" / "qemu" / "vm1.xml"
    assert state.status_path("vm1") == tmp / "s" / "run" / "vm1.json"
    assert state.qmp_socket("vm1") == tmp / "s" / "run" / "vm1.qmp"
    assert state.qemu_log("vm1") == tmp / "s" / "log" / "vm1.log"
    assert state.console_log("vm1") == tmp / "s" / "log" / "vm1.console.log"


def test_state_dir_is_absolute(tmp: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp)
    assert StateDir(Path("rel")).root == tmp / "rel"


def test_state_dir_lists_and_json(sdir: StateDir) -> None:
    assert sdir.list_definitions() == [] and sdir.list_statuses() == []
    atomic_write(sdir.definition_path("b"), "<domain/>")
    atomic_write(sdir.definition_path("a"), "<domain/>")
    (sdir.config_dir / ".c.xml.abc.tmp").write_text("left by a crash")
    (sdir.config_dir / "notes.txt").write_text("")
    sdir.write_json(sdir.status_path("a"), {"pid": 42, "state": "running"})
    assert sdir.list_definitions() == ["a", "b"]
    assert sdir.list_statuses() == ["a"]
    assert sdir.read_json(sdir.status_path("a")) == {"pid": 42, "state": "running"}
    assert sdir.read_json(sdir.status_path("zz")) is None
    assert sdir.read_text(sdir.definition_path("a")) == "<domain/>"
    sdir.remove(sdir.status_path("a"))
    sdir.remove(sdir.status_path("a"))  # already gone: fine
    assert sdir.list_statuses() == []
    sdir.status_path("bad").write_text("{not json")
    with pytest.raises(VmferryError, match="corrupt state file"):
        sdir.read_json(sdir.status_path("bad"))


@pytest.mark.parametrize("name", ["", "../etc", "a/b", ".hidden", "nul\0"])
def test_state_dir_rejects_bad_names(sdir: StateDir, name: str) -> None:
    with pytest.raises(VmferryError) as err:
        sdir.definition_path(name)
    assert err.value.code == ErrorCode.INVALID_ARG


def test_qmp_socket_falls_back_to_hashed_name(sdir: StateDir) -> None:
    long_a, long_b = "a" * 120, "a" * 119 + "b"
    sock_a, sock_b = sdir.qmp_socket(long_a), sdir.qmp_socket(long_b)
    for sock in (sock_a, sock_b):
        assert sock.parent == sdir.run_dir
        assert sock.name.startswith(".") and sock.suffix == ".qmp"
        assert len(os.fsencode(sock)) <= UNIX_PATH_MAX
    assert sock_a != sock_b
    assert sdir.qmp_socket(long_a) == sock_a  # stable across calls (and restarts)
    # The status file keeps the real name.
    assert sdir.status_path(long_a).name == long_a + ".json"
    # A real socket can be bound there.
    with socket.socket(socket.AF_UNIX) as s:
        s.bind(str(sock_a))


def test_state_dir_too_long_for_sockets(tmp: Path) -> None:
    deep = tmp / ("d" * 90)
    with pytest.raises(VmferryError) as err:
        StateDir(deep).ensure()
    assert err.value.code == ErrorCode.INVALID_ARG
    assert "too long" in err.value.message
    assert not deep.exists()


# --- host identity -----------------------------------------------------------------------------


def test_host_identity_created_once(sdir: StateDir) -> None:
    first = load_or_create_host_identity(sdir, DaemonConfig())
    assert first.hostname == socket.gethostname()
    assert uuid.UUID(first.uuid).version == 4
    assert json.loads(sdir.host_file.read_text()) == {
        "hostname": first.hostname,
        "uuid": first.uuid,
    }
    assert stat.S_IMODE(sdir.host_file.stat().st_mode) == 0o600
    again = load_or_create_host_identity(sdir, DaemonConfig())
    assert again == first


def test_host_identity_overrides_win_but_are_not_saved(sdir: StateDir) -> None:
    saved = load_or_create_host_identity(sdir, DaemonConfig())
    file_before = sdir.host_file.read_text()
    config = DaemonConfig()
    config.host.hostname = "override"
    config.host.uuid = "11111111-2222-3333-4444-555555555555"
    assert load_or_create_host_identity(sdir, config) == HostIdentity(
        hostname="override", uuid="11111111-2222-3333-4444-555555555555"
    )
    assert sdir.host_file.read_text() == file_before
    assert load_or_create_host_identity(sdir, DaemonConfig()) == saved


def test_host_identity_first_start_with_override_saves_generated(sdir: StateDir) -> None:
    config = DaemonConfig()
    config.host.uuid = "11111111-2222-3333-4444-555555555555"
    assert load_or_create_host_identity(sdir, config).uuid == config.host.uuid
    saved = json.loads(sdir.host_file.read_text())
    assert saved["uuid"] != config.host.uuid
    assert uuid.UUID(saved["uuid"]).version == 4


@pytest.mark.parametrize("content", ["{broken", '["list"]', '{"hostname": "h", "uuid": "zz"}'])
def test_host_identity_corrupt_file(
    sdir: StateDir, content: str, caplog: pytest.LogCaptureFixture
) -> None:
    # Issue 11: a corrupt host.json no longer stops the daemon; it is never replaced silently.
    sdir.host_file.write_text(content)
    identity = load_or_create_host_identity(sdir, DaemonConfig())
    (aside,) = sdir.root.glob("host.json.corrupt-*")
    assert aside.read_text() == content
    assert json.loads(sdir.host_file.read_text())["uuid"] == identity.uuid
    assert str(sdir.host_file) in caplog.text and "NEW host UUID" in caplog.text
