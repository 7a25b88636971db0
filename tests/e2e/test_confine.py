"""QEMU contained: path roots, the console directory, the emulator list, QEMU's user and seccomp."""

from __future__ import annotations

import asyncio
import os
import pwd
import shutil
import signal
import stat
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

from vmferry.daemon.config import load_config
from vmferry.domain.xml import parse_domain_xml
from vmferry.errors import ErrorCode, VmferryError
from vmferry.migration.flags import MigrateFlags
from vmferry.migration.params import MigrationParams
from vmferry.qemu.confine import Confinement, QemuUser, grant_userfaultfd, resolve_user
from vmferry.testguest import guest_xml
from vmferry.testing import Host, hosts, wait_heartbeat
from vmferry.testing.steps import migration_steps

QEMU_USER = "vmferry-qemu"


def _xml(name: str = "d", *, kernel: str = "", devices: str = "") -> str:
    kernel_el = f"<kernel>{kernel}</kernel>" if kernel else ""
    return (
        f"<domain type='qemu'><name>{name}</name><memory unit='MiB'>64</memory>"
        f"<os><type>hvm</type>{kernel_el}</os><devices>{devices}</devices></domain>"
    )


@pytest.fixture
def tree(tmp_path: Path) -> dict[str, Path]:
    """A root with an image, a state dir beside it and an allowed emulator."""
    root = tmp_path / "images"
    root.mkdir()
    (root / "vmlinuz").write_bytes(b"k")
    (root / "disk.img").write_bytes(b"d")
    state = tmp_path / "state"
    (state / "qemu").mkdir(parents=True)
    (state / "qemu" / "other.xml").write_text("<domain/>")
    emu = tmp_path / "bin" / "qemu"
    emu.parent.mkdir()
    emu.write_text("#!/bin/sh\n")
    return {"root": root, "state": state, "emu": emu, "tmp": tmp_path}


def _confine(t: dict[str, Path], **kw: object) -> Confinement:
    return Confinement(
        roots=[t["root"]],
        state_root=t["state"],
        protected=[t["tmp"] / "vmferryd.toml"],
        emulators=[str(t["emu"])],
        **kw,  # type: ignore[arg-type]
    )


def _refused(c: Confinement, xml: str) -> str:
    with pytest.raises(VmferryError) as err:
        c.check(parse_domain_xml(xml))
    assert err.value.code == ErrorCode.ACCESS_DENIED
    return err.value.message


def test_paths_below_a_root_are_accepted(tree: dict[str, Path]) -> None:
    c = _confine(tree)
    disk = f"<disk type='file'><source file='{tree['root']}/disk.img'/><target dev='vda'/></disk>"
    c.check(parse_domain_xml(_xml(kernel=f"{tree['root']}/vmlinuz", devices=disk)))


@pytest.mark.parametrize("kernel", ["/etc/shadow", "{root}/../../../../etc/shadow", "{root}x/k"])
def test_paths_outside_the_roots_are_refused(tree: dict[str, Path], kernel: str) -> None:
    msg = _refused(_confine(tree), _xml(kernel=kernel.format(root=tree["root"])))
    assert "not below an allowed directory" in msg and "[paths] roots" in msg


def test_symlink_out_of_a_root_is_refused(tree: dict[str, Path]) -> None:
    (tree["root"] / "evil").symlink_to("/etc/shadow")
    (tree["root"] / "sub").symlink_to("/etc")
    c = _confine(tree)
    _refused(c, _xml(kernel=f"{tree['root']}/evil"))
    disk = f"<disk type='file'><source file='{tree['root']}/sub/shadow'/><target dev='vda'/></disk>"
    _refused(c, _xml(devices=disk))


def test_daemon_files_are_refused_even_below_a_root(tree: dict[str, Path]) -> None:
    # An admin who makes the whole tree a root still does not hand out the daemon's files.
    c = Confinement(
        roots=[tree["tmp"]],
        state_root=tree["state"],
        protected=[tree["tmp"] / "vmferryd.toml"],
        emulators=[],
    )
    assert "daemon's own files" in _refused(c, _xml(kernel=f"{tree['state']}/qemu/other.xml"))
    assert "daemon's own files" in _refused(c, _xml(kernel=f"{tree['tmp']}/vmferryd.toml"))
    c.check(parse_domain_xml(_xml(kernel=f"{tree['root']}/vmlinuz")))


def _serial(kind: str, path: str, mode: str = "") -> str:
    mode_attr = f" mode='{mode}'" if mode else ""
    return f"<serial type='{kind}'><source{mode_attr} path='{path}'/><target port='1'/></serial>"


def test_serial_files_and_bound_sockets_only_in_the_domains_console_dir(
    tree: dict[str, Path],
) -> None:
    c = _confine(tree)
    home = tree["state"] / "console" / "d"
    c.check(parse_domain_xml(_xml(devices=_serial("file", f"{home}/s1.log"))))
    c.check(parse_domain_xml(_xml(devices=_serial("unix", f"{home}/s1.sock", "bind"))))
    for path in (
        f"{tree['state']}/qemu/other.xml",  # another domain's definition
        f"{tree['state']}/console/other/s1.log",  # another domain's console dir
        f"{home}/../other/s1.log",
        f"{tree['root']}/disk.img",  # below a root, but not the domain's to truncate
        "/etc/passwd",
    ):
        assert "console directory" in _refused(c, _xml(devices=_serial("file", path)))
        assert "console directory" in _refused(c, _xml(devices=_serial("unix", path, "bind")))
    home.mkdir(parents=True)
    (home / "link.log").symlink_to(tree["root"] / "disk.img")
    assert "symbolic link" in _refused(c, _xml(devices=_serial("file", f"{home}/link.log")))


def test_unix_connect_below_a_root_only(tree: dict[str, Path]) -> None:
    c = _confine(tree)
    c.check(parse_domain_xml(_xml(devices=_serial("unix", f"{tree['root']}/s.sock", "connect"))))
    _refused(c, _xml(devices=_serial("unix", "/run/other-daemon.sock", "connect")))


def test_emulator_must_be_listed(tree: dict[str, Path]) -> None:
    c = _confine(tree)
    c.check(parse_domain_xml(_xml(devices=f"<emulator>{tree['emu']}</emulator>")))
    link = tree["tmp"] / "alias"
    link.symlink_to(tree["emu"])  # the same binary under another name
    c.check(parse_domain_xml(_xml(devices=f"<emulator>{link}</emulator>")))
    msg = _refused(c, _xml(devices="<emulator>/bin/sh</emulator>"))
    assert "[qemu] emulators" in msg and str(tree["emu"]) in msg


def test_inputs_must_be_readable_by_the_qemu_user() -> None:
    nobody = pwd.getpwnam("nobody")
    user = QemuUser("nobody", nobody.pw_uid, nobody.pw_gid)
    top = Path(tempfile.mkdtemp(prefix="vfconf", dir="/tmp"))  # pytest's tmp dirs are 0700
    try:
        os.chmod(top, 0o755)
        root = top / "images"
        root.mkdir(mode=0o755)
        kernel, disk_img = root / "vmlinuz", root / "disk.img"
        kernel.write_bytes(b"k")
        disk_img.write_bytes(b"d")
        c = Confinement(roots=[root], state_root=top / "state", user=user)
        os.chmod(kernel, 0o644)
        c.check(parse_domain_xml(_xml(kernel=str(kernel))))
        os.chmod(kernel, 0o600)
        assert "not readable by the QEMU user 'nobody'" in _refused(c, _xml(kernel=str(kernel)))
        disk = f"<disk type='file'><source file='{disk_img}'/><target dev='vda'/></disk>"
        os.chmod(disk_img, 0o644)
        assert "not writable" in _refused(c, _xml(devices=disk))
        os.chmod(root, 0o700)
        os.chmod(kernel, 0o644)
        assert "not searchable" in _refused(c, _xml(kernel=str(kernel)))
    finally:
        shutil.rmtree(top)


def test_open_files_truncates_only_what_the_domain_owns(tree: dict[str, Path]) -> None:
    c = _confine(tree)
    home = tree["state"] / "console" / "d"
    home.mkdir(parents=True)
    (home / "s1.log").write_text("old")
    (home / "s2.log").write_text("kept")
    serials = (
        _serial("file", f"{home}/s1.log")
        + f"<serial type='file'><source path='{home}/s2.log' append='on'/><target port='2'/>"
        + "</serial>"
        + f"<serial type='unix'><source mode='bind' path='{home}/s3.sock'/><target port='3'/>"
        + "</serial>"
    )
    qmp = tree["state"] / "q.sock"
    files = c.open_files(parse_domain_xml(_xml(devices=serials)), qmp_socket=qmp, console_log=None)
    try:
        assert (home / "s1.log").read_text() == ""
        assert (home / "s2.log").read_text() == "kept"
        assert stat.S_ISSOCK(os.stat(qmp).st_mode) and stat.S_ISSOCK(
            os.stat(home / "s3.sock").st_mode
        )
        assert set(files.serial_files) == {1, 2} and set(files.serial_sockets) == {3}
        assert len(files.fds) == 4
    finally:
        files.close()


def test_config_keys(tmp_path: Path) -> None:
    cfg = tmp_path / "c.toml"
    cfg.write_text(
        '[qemu]\nuser = ""\nsandbox = false\nemulators = ["/usr/bin/qemu-system-x86_64"]\n'
        '[paths]\nroots = ["/srv/images"]\n'
    )
    config = load_config(cfg)
    assert (config.qemu.user, config.qemu.sandbox) == ("", False)
    assert config.paths.roots == ["/srv/images"]
    for bad in ('[paths]\nroots = ["images"]\n', "[qemu]\nsandbox = 1\n"):
        cfg.write_text(bad)
        with pytest.raises(VmferryError):
            load_config(cfg)
    defaults = load_config(None)
    assert (defaults.qemu.user, defaults.qemu.sandbox) == (QEMU_USER, True)


def test_missing_qemu_user_is_a_clear_error() -> None:
    with pytest.raises(VmferryError) as err:
        resolve_user("vmferry-no-such-user", "")
    assert "does not exist" in err.value.message and "useradd" in err.value.message
    assert resolve_user("root", "") is None and resolve_user("", "") is None


# -- through a real daemon -------------------------------------------------------------------


def _expect_denied(call: object) -> VmferryError:
    assert callable(call)
    with pytest.raises(VmferryError) as err:
        call()
    assert err.value.code == ErrorCode.ACCESS_DENIED, err.value
    return err.value


def _with_devices(xml: str, extra: str) -> str:
    return xml.replace("<devices>", f"<devices>{extra}", 1)


@pytest.mark.qemu
def test_daemon_refuses_host_files_and_foreign_emulators() -> None:
    with hosts(2) as (h, other), h.client() as c:
        base = guest_xml("g")
        kernel = parse_domain_xml(base).os.kernel
        assert kernel
        shadow_kernel = base.replace(f"<kernel>{kernel}</kernel>", "<kernel>/etc/shadow</kernel>")
        shadow_disk = _with_devices(
            base, "<disk type='file'><source file='/etc/shadow'/><target dev='vda'/></disk>"
        )
        sh = _with_devices(base, "<emulator>/bin/sh</emulator>")
        for xml in (shadow_kernel, shadow_disk, sh):
            _expect_denied(lambda xml=xml: c.define(xml))
            _expect_denied(lambda xml=xml: c.create(xml))
        assert c.list_domains(all=True) == []

        # A serial file aimed at another domain's definition: refused, that file untouched.
        c.define(guest_xml("victim"))
        victim = h.state_dir / "qemu" / "victim.xml"
        before = victim.read_bytes()
        bad_serial = (
            guest_xml("g")
            .replace(
                "<serial type='pty'><target port='0'/></serial>",
                f"<serial type='file'><source path='{victim}'/><target port='0'/></serial>",
            )
            .replace("<console type='pty'><target type='serial' port='0'/></console>", "")
        )
        assert str(victim) in bad_serial
        _expect_denied(lambda: c.create(bad_serial))
        _expect_denied(lambda: c.define(bad_serial))
        assert victim.read_bytes() == before

        # A bound serial socket over another daemon's API socket: refused, that daemon unharmed.
        grab = _with_devices(
            base,
            f"<serial type='unix'><source mode='bind' path='{other.socket}'/>"
            "<target port='1'/></serial>",
        )
        _expect_denied(lambda: c.create(grab))
        with other.client() as oc:
            assert oc.host().hostname == other.name
        assert h.qemu_pids() == []


@pytest.mark.qemu
def test_destination_prepare_refuses_a_tampered_emulator() -> None:
    flags = MigrateFlags.LIVE

    async def tampered(a: Host, b: Host) -> None:
        async with migration_steps(a, b) as (_, _, src, dst):
            xml, cookie = await src.begin("m", flags, MigrationParams())
            evil = _with_devices(xml, "<emulator>/bin/sh</emulator>")
            with pytest.raises(VmferryError) as err:
                await dst.prepare(evil, cookie, flags, MigrationParams())
            assert err.value.code == ErrorCode.ACCESS_DENIED
            await src.confirm("m", cookie, cancelled=True)

    with hosts(2) as (a, b), a.client() as c:
        c.create(guest_xml("m"))
        asyncio.run(tampered(a, b))
        assert b.qemu_pids() == []
        with b.client() as bc:
            assert bc.list_domains(all=True) == []
        assert c.domstate("m").state == "running"


def _status(pid: int) -> dict[str, str]:
    text = Path(f"/proc/{pid}/status").read_text()
    return dict(line.split(":\t", 1) for line in text.splitlines() if ":\t" in line)


@pytest.mark.qemu
def test_qemu_runs_unprivileged_in_seccomp_and_survives_a_daemon_restart() -> None:
    if os.geteuid() != 0:
        pytest.skip("QEMU can only be started as another user by a daemon running as root")
    try:
        qemu = pwd.getpwnam(QEMU_USER)
    except KeyError:
        pytest.skip(f"user {QEMU_USER} missing: run scripts/install-deps.sh as root")
    with hosts(1) as (h,):
        with h.client() as c:
            c.create(guest_xml("u"))
            first = wait_heartbeat(c, "u")
        (pid,) = h.qemu_pids()
        st = _status(pid)
        assert st["Uid"].split()[:2] == [str(qemu.pw_uid)] * 2
        assert st["Gid"].split()[0] == str(qemu.pw_gid) and st["Groups"].strip() == ""
        assert st["Seccomp"].strip() == "2"
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
        assert any(a.startswith(b"socket,id=charmonitor,fd=") for a in cmdline)
        # The QMP socket the daemon bound and handed over still takes the next daemon.
        h.kill(signal.SIGKILL)
        h.start()
        with h.client() as c:
            assert c.domstate("u").state == "running"
            assert c.suspend("u").state == "paused"
            assert c.resume("u").state == "running"
            later = wait_heartbeat(c, "u", after=first)
            assert later.seq > first.seq
            c.destroy("u")
        assert h.qemu_pids() == []


@pytest.mark.qemu
def test_serial_file_in_the_console_dir_gets_the_guest_output() -> None:
    with hosts(1) as (h,), h.client() as c:
        out = h.state_dir / "console" / "s" / "ttyS0.log"
        xml = (
            guest_xml("s")
            .replace(
                "<serial type='pty'><target port='0'/></serial>",
                f"<serial type='file'><source path='{out}'/><target port='0'/></serial>",
            )
            .replace("<console type='pty'><target type='serial' port='0'/></console>", "")
        )
        assert str(out) in xml
        c.create(xml)
        wait_heartbeat(c, "s")  # the console log, an fdset of its own
        assert "VMFERRY-HB" in out.read_text(errors="replace")
        c.destroy("s")


def test_grant_userfaultfd_gives_the_qemu_group_the_device(tmp_path: Path) -> None:
    device = tmp_path / "userfaultfd"
    device.write_bytes(b"")
    os.chmod(device, 0o600)
    nobody = pwd.getpwnam("nobody")
    assert grant_userfaultfd(QemuUser("nobody", nobody.pw_uid, nobody.pw_gid), str(device))
    st = os.stat(device)
    assert (st.st_gid, stat.S_IMODE(st.st_mode)) == (nobody.pw_gid, 0o660)
    assert not grant_userfaultfd(QemuUser("nobody", 1, 1), str(tmp_path / "absent"))


def test_daemon_refuses_to_start_without_its_qemu_user(tmp_path: Path) -> None:
    cfg = tmp_path / "vmferryd.toml"
    cfg.write_text('[qemu]\nuser = "vmferry-no-such-user"\n')
    argv = [sys.executable, "-m", "vmferry.daemon.main", "--state-dir", str(tmp_path / "s")]
    argv += ["--listen", f"unix://{tmp_path}/d.sock", "--config", str(cfg)]
    done = subprocess.run(argv, capture_output=True, text=True, timeout=60)
    assert done.returncode == 1
    assert "QEMU user 'vmferry-no-such-user' does not exist" in done.stderr
    assert not (tmp_path / "d.sock").exists()
