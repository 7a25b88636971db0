"""Maintenance mode (persisted, refusing) and the evacuate CLI's tables."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from vmferry.api.models import EvacuationInfo, EvacuationMove
from vmferry.cli.cluster_evac_cmds import plan_table, progress_line, result_table
from vmferry.daemon.maintenance import Maintenance
from vmferry.errors import ErrorCode, VmferryError


def test_maintenance_is_persisted_and_refuses(tmp_path: Path) -> None:
    m = Maintenance(tmp_path, "hostA")
    m.check("incoming migration")  # off: nothing refused
    m.set(True, "kernel update")
    with pytest.raises(VmferryError) as refused:
        m.check("incoming migration")
    assert refused.value.code == ErrorCode.HOST_MAINTENANCE
    assert refused.value.http_status == 409
    assert "hostA" in refused.value.message and "kernel update" in refused.value.message
    assert "vmferry maintenance hostA off" in refused.value.message
    again = Maintenance(tmp_path, "hostA")  # a restarted daemon
    assert again.on and again.info.reason == "kernel update" and again.info.since > 0
    again.set(False)
    assert not Maintenance(tmp_path, "hostA").on


def test_a_corrupt_record_is_ignored(tmp_path: Path) -> None:
    (tmp_path / "maintenance.json").write_text('{"on": "maybe"}')
    assert not Maintenance(tmp_path, "h").on


@pytest.mark.parametrize("reason", ["x" * 201, "line\nforged"])
def test_a_hostile_reason_is_refused(tmp_path: Path, reason: str) -> None:
    m = Maintenance(tmp_path, "h")
    with pytest.raises(VmferryError) as refused:
        m.set(True, reason)
    assert refused.value.code == ErrorCode.INVALID_ARG
    assert not m.on and not (tmp_path / "maintenance.json").exists()


def _info() -> EvacuationInfo:
    return EvacuationInfo(
        host="a",
        state="done",
        started=100.0,
        finished=112.5,
        per_link=1,
        planned_s=10.0,
        moves=[
            EvacuationMove(
                name="g1",
                uuid="u1",
                dest="b",
                memory_mib=128,
                order=1,
                bandwidth_mib_s=100,
                planned_s=2.0,
                predicted_downtime_ms=12.0,
                result="done",
                wall_s=3.2,
                downtime_ms=40.0,
            ),
            EvacuationMove(
                name="g2",
                uuid="u2",
                dest="c",
                memory_mib=128,
                order=2,
                planned_s=2.0,
                predicted_downtime_ms=None,
                result="failed",
                error="c is unreachable",
            ),
            EvacuationMove(name="g3", uuid="u3", result="skipped", error="needs 4096 MiB"),
        ],
    )


def test_tables() -> None:
    info = _info()
    plan = plan_table(info)
    assert "g1" in plan and "12 ms" in plan and "over" in plan
    assert "Not placed (they stay):\n  g3: needs 4096 MiB" in plan
    assert "Over the downtime target even alone on a link: g2" in plan
    table = result_table(info)
    assert "12.5 s" in table
    row = next(line for line in table.splitlines() if line.split()[:1] == ["g2"])
    assert "failed: c is unreachable" in row
    assert "40 ms" in next(line for line in table.splitlines() if line.split()[:1] == ["g1"])


def test_progress_line() -> None:
    m = EvacuationMove(name="g", uuid="u", dest="b", result="running", progress=0.5)
    assert "[##########..........]  50 %" in progress_line(m)
    m.result = "done"
    assert progress_line(m).endswith("done")


def test_evacuate_options_become_the_request() -> None:
    from vmferry.cli.cluster_evac_cmds import _request
    from vmferry.cli.main import build_parser

    parser = build_parser()
    argv = ["evacuate", "host0", "--to", "host1, host2,", "--max-parallel", "3"]
    args = parser.parse_args([*argv, "--bandwidth", "64", "--dry-run"])
    req = _request(args)
    assert req.to == ["host1", "host2"] and req.max_parallel == 3
    assert req.bandwidth_mib_s == 64 and req.dry_run and req.per_destination == 2
    bad = parser.parse_args(["evacuate", "host0", "--max-parallel", "0"])
    with pytest.raises(VmferryError) as refused:
        _request(bad)
    assert refused.value.code == ErrorCode.INVALID_ARG
    on = parser.parse_args(["maintenance", "host0", "on", "--reason", "kernel"])
    assert (on.host, on.state, on.reason) == ("host0", "on", "kernel")
    assert parser.parse_args(["maintenance", "host0"]).state is None


def test_the_heartbeat_carries_maintenance_for_cluster_list(tmp_path: Path) -> None:
    from vmferry.daemon.cluster import Membership
    from vmferry.daemon.config import ClusterConfig
    from vmferry.daemon.host import HostIdentity

    state = {"on": False}

    def member(name: str, **kw: Any) -> Membership:
        return Membership(
            ClusterConfig(lockspace=str(tmp_path), heartbeat_interval=1.0),
            HostIdentity(name, f"uuid-{name}"),
            uri=f"tls://{name}:16514",
            migration_address="",
            vms=list,
            backend="lockspace",
            **kw,
        )

    peer, other = member("node1", maintenance=lambda: state["on"]), member("node2")
    peer.beat()
    assert not {h.name: h for h in other.snapshot_now().hosts}["node1"].maintenance
    state["on"] = True
    peer.beat()
    assert {h.name: h for h in other.snapshot_now().hosts}["node1"].maintenance
    assert peer.local().maintenance and not other.local().maintenance
