"""The verbs beyond the life cycle without QEMU: sizes, the CLI's parsing and output, the
access table, the job rules (modify refused during a migration, queries pass), domstats'
mapping of QEMU's answers, and the autostart flags."""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from types import SimpleNamespace
from typing import Any, cast

import pytest

from vmferry.api.models import DomainInfo
from vmferry.api.verbs import MemoryRequest
from vmferry.cli import context
from vmferry.cli import verbs as cli_verbs
from vmferry.cli.main import main
from vmferry.client import Client
from vmferry.client.calls import Call
from vmferry.daemon import autostart
from vmferry.daemon.access import READ_ONLY_DEFAULT, route_permission
from vmferry.daemon.autostart import Autostart
from vmferry.daemon.config import DaemonConfig
from vmferry.daemon.driver import Driver
from vmferry.daemon.host import HostIdentity
from vmferry.daemon.state import StateDir
from vmferry.daemon.verbs import DomainVerbs
from vmferry.domain.model import DiskDef, DomainDef, InterfaceDef
from vmferry.domain.state import DomainState
from vmferry.domain.units import scaled_kib
from vmferry.errors import ErrorCode, VmferryError
from vmferry.jobs import AsyncJob, DomainJob
from vmferry.migration.phase import MigrationPhase
from vmferry.qemu.domain import QemuDomain
from vmferry.testing.fakemonitor import FakeMonitor

# -- sizes -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "kib"),
    [
        ("4096", 4096),
        ("512M", 512 * 1024),
        ("512MiB", 512 * 1024),
        ("1G", 1024 * 1024),
        ("1gib", 1024 * 1024),
        ("1000KB", 977),  # 1,000,000 bytes, rounded up
        ("1025b", 2),
        (" 2 k ", 2),
    ],
)
def test_scaled_sizes_follow_virsh(text: str, kib: int) -> None:
    assert scaled_kib(text) == kib
    assert cli_verbs.size_kib(text) == kib


@pytest.mark.parametrize("text", ["", "-1", "1.5G", "12X", "M", "1 GiBs", "0"])
def test_bad_sizes_are_refused(text: str) -> None:
    with pytest.raises(argparse.ArgumentTypeError):
        cli_verbs.size_kib(text)


def test_size_beyond_a_pebibyte_is_refused() -> None:
    with pytest.raises(argparse.ArgumentTypeError, match="1 PiB"):
        cli_verbs.size_kib("2P")


# -- the CLI -----------------------------------------------------------------------------------

DOM = DomainInfo(
    name="vm1",
    uuid="6f1c8e8e-0000-4000-8000-000000000001",
    state="running",
    reason="booted",
    persistent=True,
    max_memory_kib=262144,
    memory_kib=131072,
    vcpus=1,
)


class FakeClient(Client):
    """Answers every call from :attr:`answers` by (method, path) and records it."""

    sent: list[Call[Any]] = []
    answers: dict[tuple[str, str], Any] = {}

    def fetch(self, call: Call[Any], *, request_timeout: float | None = None) -> Any:
        # The answer's JSON: commands read it as is (fetch) or parsed (run, via fetch).
        FakeClient.sent.append(call)
        return FakeClient.answers.get((call.method, call.path), DOM.model_dump(mode="json"))


@pytest.fixture
def cli(monkeypatch: pytest.MonkeyPatch) -> type[FakeClient]:
    FakeClient.sent, FakeClient.answers = [], {}
    monkeypatch.setattr(context, "Client", FakeClient)
    return FakeClient


def vmferry(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    status = main(["-c", "unix:///fake.sock", *argv])
    out, err = capsys.readouterr()
    return status, out, err


def test_cli_reboot_reset_autostart(cli: type[FakeClient], capsys: Any) -> None:
    assert vmferry(capsys, "reboot", "vm1")[1] == "Domain 'vm1' is being rebooted\n"
    assert vmferry(capsys, "reset", "vm1")[1] == "Domain 'vm1' was reset\n"
    assert vmferry(capsys, "autostart", "vm1")[1] == "Domain 'vm1' marked as autostarted\n"
    out = vmferry(capsys, "autostart", "vm1", "--disable")[1]
    assert out == "Domain 'vm1' unmarked as autostarted\n"
    sent = [(c.method, c.path, c.json_body()) for c in cli.sent]
    assert sent == [
        ("POST", "/v1/domains/vm1/reboot", None),
        ("POST", "/v1/domains/vm1/reset", None),
        ("PUT", "/v1/domains/vm1/autostart", {"enabled": True}),
        ("PUT", "/v1/domains/vm1/autostart", {"enabled": False}),
    ]


def test_cli_setmem_scopes(cli: type[FakeClient], capsys: Any) -> None:
    assert vmferry(capsys, "setmem", "vm1", "100M") == (0, "", "")
    assert vmferry(capsys, "setmem", "vm1", "64MiB", "--config", "--live")[0] == 0
    assert vmferry(capsys, "setmaxmem", "vm1", "1G", "--config")[0] == 0
    bodies = [(c.path, c.json_body()) for c in cli.sent]
    assert bodies == [
        ("/v1/domains/vm1/memory", {"size_kib": 102400, "live": False, "config": False}),
        ("/v1/domains/vm1/memory", {"size_kib": 65536, "live": True, "config": True}),
        ("/v1/domains/vm1/maxmemory", {"size_kib": 1048576, "live": False, "config": True}),
    ]
    status, _, err = vmferry(capsys, "setmem", "vm1", "1M", "--current", "--live")
    assert status == 1 and "--current cannot be combined" in err
    status, _, err = vmferry(capsys, "setmem", "vm1", "lots")
    assert status == 2 and "invalid size 'lots'" in err
    assert len(cli.sent) == 3  # nothing sent for the refused ones


def test_cli_domstats(cli: type[FakeClient], capsys: Any) -> None:
    stats = {"vm1": {"state.state": "running", "cpu.time": 12}, "vm2": {"state.state": "shutoff"}}
    cli.answers[("GET", "/v1/domstats")] = {"domains": stats}
    status, out, _ = vmferry(capsys, "domstats")
    assert status == 0
    assert out == (
        "Domain: 'vm1'\n  state.state=running\n  cpu.time=12\n\n"
        "Domain: 'vm2'\n  state.state=shutoff\n"
    )
    vmferry(capsys, "domstats", "vm1", "vm2", "--cpu-total", "--block")
    assert cli.sent[-1].params == {"names": "vm1,vm2", "groups": "cpu-total,block"}
    status, out, _ = vmferry(capsys, "domstats", "--json")
    assert json.loads(out) == stats


def test_cli_domiflist_and_vncdisplay(cli: type[FakeClient], capsys: Any) -> None:
    nic = {"interface": "hostnet0", "type": "user", "source": "-", "model": "virtio",
           "mac": "52:54:00:aa:bb:01"}  # fmt: skip
    cli.answers[("GET", "/v1/domains/vm1/interfaces")] = [nic]
    out = vmferry(capsys, "domiflist", "vm1")[1].splitlines()
    assert out[0].split() == ["Interface", "Type", "Source", "Model", "MAC"]
    assert out[2].split() == ["hostnet0", "user", "-", "virtio", "52:54:00:aa:bb:01"]
    vnc = "/v1/domains/vm1/vncdisplay"
    cli.answers[("GET", vnc)] = {"listen": "127.0.0.1", "port": 5901, "display": 1}
    assert vmferry(capsys, "vncdisplay", "vm1")[1] == "127.0.0.1:1\n"
    cli.answers[("GET", vnc)] = {"listen": "::1", "port": 5900, "display": 0}
    assert vmferry(capsys, "vncdisplay", "vm1")[1] == "[::1]:0\n"


def test_dominfo_shows_autostart(cli: type[FakeClient], capsys: Any) -> None:
    assert "Autostart:      disable" in vmferry(capsys, "dominfo", "vm1")[1]
    cli.answers[("GET", "/v1/domains/vm1")] = DOM.model_dump() | {"autostart": True}
    assert "Autostart:      enable" in vmferry(capsys, "dominfo", "vm1")[1]


# -- access ------------------------------------------------------------------------------------


def test_reads_are_read_only_and_changes_have_their_permission() -> None:
    reads = [("GET", "/v1/domstats"), ("GET", "/v1/domains/vm1/interfaces"),
             ("GET", "/v1/domains/vm1/vncdisplay")]  # fmt: skip
    for method, path in reads:
        perm, _ = route_permission(method, path)
        assert perm in READ_ONLY_DEFAULT, path
    changes = {
        ("POST", "/v1/domains/vm1/reboot"): "domain.reboot",
        ("POST", "/v1/domains/vm1/reset"): "domain.reset",
        ("PUT", "/v1/domains/vm1/autostart"): "domain.autostart",
        ("PUT", "/v1/domains/vm1/memory"): "domain.memory",
        ("PUT", "/v1/domains/vm1/maxmemory"): "domain.memory",
    }
    for (method, path), want in changes.items():
        assert route_permission(method, path) == (want, "vm1")
        assert want not in READ_ONLY_DEFAULT


# -- the daemon's rules, QEMU faked ------------------------------------------------------------


def _domain(tmp: Path, *, balloon: str = "virtio") -> tuple[DomainVerbs, QemuDomain, FakeMonitor]:
    d = DomainDef(name="vm1", uuid="6f1c8e8e-0000-4000-8000-000000000001", memory_kib=262144)
    d.devices.memballoon = balloon
    d.devices.interfaces.append(InterfaceDef(mac="52:54:00:00:00:01"))
    d.devices.disks.append(DiskDef(target_dev="vda", source_file="/img/a.raw"))
    d.devices.disks.append(DiskDef(target_dev="sdb", source_file="/img/b.raw", target_bus="sata"))
    mon = FakeMonitor()
    dom = QemuDomain(definition=d, persistent=d, job=DomainJob("vm1", wait_timeout=0.2))
    dom.state, dom.monitor = DomainState.RUNNING, mon.as_monitor()
    written: list[DomainDef] = []
    driver = SimpleNamespace(
        lookup=lambda name: dom,
        domains=lambda: iter([dom]),
        autostart=Autostart(StateDir(tmp)),
        persist_definition=written.append,
    )
    return DomainVerbs(cast(Driver, driver)), dom, mon


async def test_changes_are_refused_during_a_migration_and_queries_pass(tmp: Path) -> None:
    verbs, dom, mon = _domain(tmp)
    await dom.job.start_async(AsyncJob.MIGRATION_OUT, "migrate-begin", MigrationPhase.BEGIN3)
    dom.job.continue_()
    changes = [
        verbs.reboot(dom),
        verbs.reset(dom),
        verbs.set_autostart(dom, True),
        verbs.set_memory(dom, MemoryRequest(size_kib=1024)),
        verbs.set_max_memory(dom, MemoryRequest(size_kib=1024, config=True)),
    ]
    for change in changes:
        with pytest.raises(VmferryError) as err:
            await change
        assert err.value.code == ErrorCode.OPERATION_TIMEOUT
        assert "cannot acquire state change lock" in err.value.message
    assert mon.commands() == []
    mon.always("query-migrate", {"status": "active", "ram": {"total": 100, "remaining": 40}})
    stats = (await verbs.stats([], ["migration", "state"]))["vm1"]
    assert stats["migration.status"] == "active" and stats["migration.data_remaining"] == 40
    assert stats["state.state"] == "running"


async def test_an_incoming_domain_answers_no_qemu_figures(tmp: Path) -> None:
    verbs, dom, mon = _domain(tmp)
    await dom.job.start_async(AsyncJob.MIGRATION_IN, "migrate-prepare", MigrationPhase.PREPARE)
    stats = (await verbs.stats(["vm1"], []))["vm1"]
    assert stats["state.state"] == "running" and "block.0.rd.bytes" not in stats
    assert mon.commands() == []


async def test_domstats_maps_qemu_answers(tmp: Path) -> None:
    verbs, _, mon = _domain(tmp)
    mon.always("query-balloon", {"actual": 200 * 1024 * 1024})
    mon.always(
        "query-blockstats",
        [
            {"qdev": "/machine/peripheral/virtio-disk0/virtio-backend",
             "stats": {"rd_bytes": 512, "rd_operations": 1, "wr_bytes": 0, "wr_operations": 0,
                       "flush_operations": 3}},
            {"qdev": "sata0-0-1", "stats": {"rd_bytes": 4096, "rd_operations": 8}},
        ],
    )  # fmt: skip
    stats = (await verbs.stats(["vm1"], ["balloon", "block"]))["vm1"]
    assert stats["balloon.current"] == 200 * 1024 and stats["balloon.maximum"] == 262144
    assert (stats["block.0.name"], stats["block.0.rd.bytes"], stats["block.0.fl.reqs"]) == (
        "vda", 512, 3)  # fmt: skip
    assert (stats["block.1.name"], stats["block.1.rd.reqs"]) == ("sdb", 8)
    assert "state.state" not in stats
    with pytest.raises(VmferryError) as err:
        await verbs.stats([], ["cpu", "state"])
    assert err.value.code == ErrorCode.INVALID_ARG and "cpu" in err.value.message


async def test_setmem_sets_the_balloon_and_the_live_definition(tmp: Path) -> None:
    verbs, dom, mon = _domain(tmp)
    persistent = dom.persistent
    await verbs.set_memory(dom, MemoryRequest(size_kib=131072))
    assert mon.calls == [("balloon", {"value": 131072 * 1024})]
    assert dom.definition.current_memory_kib == 131072
    assert dom.persistent is persistent and persistent.current_memory_kib == 262144
    with pytest.raises(VmferryError) as err:
        await verbs.set_memory(dom, MemoryRequest(size_kib=262145))
    assert err.value.code == ErrorCode.INVALID_ARG
    with pytest.raises(VmferryError) as err:
        await verbs.set_max_memory(dom, MemoryRequest(size_kib=524288))
    assert err.value.code == ErrorCode.OPERATION_INVALID
    # --config lowers <currentMemory> with the new maximum, leaves the running guest
    await verbs.set_max_memory(dom, MemoryRequest(size_kib=65536, config=True))
    assert dom.persistent is not None and dom.persistent.memory_kib == 65536
    assert dom.persistent.current_memory_kib == 65536
    assert dom.definition.memory_kib == 262144
    assert len(mon.calls) == 1


async def test_setmem_without_balloon_and_reboot_without_acpi(tmp: Path) -> None:
    verbs, dom, mon = _domain(tmp, balloon="none")
    with pytest.raises(VmferryError) as err:
        await verbs.set_memory(dom, MemoryRequest(size_kib=1024))
    assert "balloon" in err.value.message
    with pytest.raises(VmferryError) as err:
        await verbs.reboot(dom)
    assert err.value.code == ErrorCode.OPERATION_INVALID and "ACPI" in err.value.message
    dom.definition.features.acpi = True
    await verbs.reboot(dom)
    assert dom.fake_reboot and mon.commands() == ["system_powerdown"]


# -- autostart flags ---------------------------------------------------------------------------


def test_autostart_flags_persist_and_run_once_per_boot(
    tmp: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    state = StateDir(tmp / "s")
    state.ensure()
    flags = Autostart(state)
    flags.set("a", True)
    flags.set("b", True)
    flags.note("b", migrated=True)
    flags.note("c", migrated=True)  # not flagged: nothing to note
    again = Autostart(state)
    again.load()
    assert (again.enabled("a"), again.enabled("b"), again.enabled("c")) == (True, True, False)
    assert (again.migrated_away("a"), again.migrated_away("b")) == (False, True)
    again.note("b", migrated=False)
    again.set("a", False)
    third = Autostart(state)
    third.load()
    assert not third.enabled("a") and third.enabled("b") and not third.migrated_away("b")

    boot = tmp / "boot_id"
    boot.write_text("one\n")
    monkeypatch.setattr(autostart, "BOOT_ID", boot)
    assert third.first_start_this_boot() is True
    assert third.first_start_this_boot() is False  # a daemon restart
    boot.write_text("two\n")  # a host reboot
    assert third.first_start_this_boot() is True


async def test_a_requested_reboot_survives_a_daemon_restart(tmp: Path) -> None:
    state = StateDir(tmp / "s")
    state.ensure()
    driver = Driver(state, DaemonConfig(), HostIdentity("h", "u"))
    verbs, dom, mon = _domain(tmp)
    dom.definition.features.acpi = True
    dom.save_status = driver._save_status
    await verbs.reboot(dom)
    assert driver.status_of(dom)["fake_reboot"] is True
    assert state.read_json(state.status_path("vm1"))["fake_reboot"] is True
    # QEMU refusing the power button: no reboot left pending
    mon.fail("system_powerdown")
    with pytest.raises(VmferryError):
        await verbs.reboot(dom)
    assert dom.fake_reboot is False
    assert state.read_json(state.status_path("vm1"))["fake_reboot"] is False
