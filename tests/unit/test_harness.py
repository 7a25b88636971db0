"""vmferry.testing: daemon settings as the tests, the demo and the benches need them."""

from __future__ import annotations

import sys
import tomllib
from pathlib import Path

import pytest

import vmferry.testing.daemons as daemons
from vmferry.testing import Host


def test_test_host_config_and_argv(tmp_path: Path) -> None:
    host = Host(tmp_path, "host0", 50016, pki_dir=tmp_path / "pki", tls_port=50031)
    cfg = tomllib.loads(host.config_text())
    assert cfg["host"] == {"hostname": "host0", "uuid": host.host_uuid}
    assert cfg["jobs"] == {"wait_timeout": 5.0}
    assert (cfg["migration"]["port_min"], cfg["migration"]["port_max"]) == (50016, 50030)
    assert cfg["tls"] == {"pki_dir": str(tmp_path / "pki")}
    argv = host.command(tmp_path / "vmferryd.toml")
    assert argv[:3] == [sys.executable, "-m", "vmferry.daemon.main"]
    assert argv[argv.index("--state-dir") + 1] == str(tmp_path / "state")
    assert [argv[i + 1] for i, a in enumerate(argv) if a == "--listen"] == [
        f"unix://{tmp_path / 'd.sock'}",
        "tls://127.0.0.1:50031",
    ]
    assert "--insecure" in argv and argv[argv.index("--log-level") + 1] == "debug"


def test_demo_and_bench_settings(tmp_path: Path) -> None:
    host = Host(
        tmp_path,
        "demo-host1",
        49516,
        port_span=15,
        wait_timeout=None,
        log_level=None,
        state_at=Path("/tmp/vfdemoX/h1"),
        socket_at=Path("/tmp/vfdemoX/h1.sock"),
        uuid_value="u-1",
        launcher=["python", "bench.py", "--as-traced-daemon", "t.json", "--"],
        extra_config='allowed_networks = ["127.0.0.0/8"]\n',
    )
    cfg = tomllib.loads(host.config_text())
    assert "jobs" not in cfg and cfg["host"]["uuid"] == "u-1"
    assert cfg["migration"] == {
        "port_min": 49516,
        "port_max": 49531,
        "allowed_networks": ["127.0.0.0/8"],
    }
    argv = host.command(tmp_path / "c.toml")
    assert argv[:5] == ["python", "bench.py", "--as-traced-daemon", "t.json", "--"]
    assert "--log-level" not in argv and host.uri == "unix:///tmp/vfdemoX/h1.sock"
    assert argv[argv.index("--state-dir") + 1] == "/tmp/vfdemoX/h1"


@pytest.mark.parametrize("worker", ["gw0", "gw1", ""])
def test_ports_do_not_overlap_between_xdist_workers(
    worker: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("PYTEST_XDIST_WORKER", worker)
    lo, hi = daemons._port_window()
    if worker:
        assert (lo, hi) == (
            daemons.PORT_LO + int(worker[2:]) * 2000,
            daemons.PORT_LO + (int(worker[2:]) + 1) * 2000,
        )
    else:
        assert (lo, hi) == (daemons.PORT_LO, daemons.PORT_HI)
    monkeypatch.setattr(daemons, "_window", (lo, hi))
    monkeypatch.setattr(daemons, "_next_port", hi - 48)
    ports = [daemons.allocate_ports() for _ in range(300)]
    assert ports[:5] == [hi - 48, hi - 32, hi - 16, lo, lo + 16]  # wraps inside the window
    assert all(lo <= p and p + 16 <= hi and p % 16 == 0 for p in ports)


def test_lease_refused_passes_only_a_lease_refusal() -> None:
    from vmferry.errors import ErrorCode, VmferryError
    from vmferry.testing.cluster import lease_refused

    def fail(code: ErrorCode) -> None:
        raise VmferryError(code, "held by host1")

    assert lease_refused(lambda: fail(ErrorCode.LEASE_HELD)).message == "held by host1"
    with pytest.raises(AssertionError):
        lease_refused(lambda: fail(ErrorCode.OPERATION_FAILED))
    with pytest.raises(AssertionError, match="not refused"):
        lease_refused(lambda: None)
