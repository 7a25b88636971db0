"""``vmferry cluster list``: the table and --json, against a faked daemon (see test_cli)."""

from __future__ import annotations

import json
from typing import Any

import pytest

from tests.unit.test_cli import FakeClient, fake, run  # noqa: F401 (fake: autouse fixture)
from vmferry.api.models import ClusterHost, ClusterInfo, ClusterVm

VM = ClusterVm(name="web", uuid="6f1c8e8e-0000-4000-8000-0000000000aa", state="running")
INFO = ClusterInfo(
    backend="lockspace",
    hosts=[
        ClusterHost(
            name="node1", uuid="u1", uri="tls://node1:16514", state="up", self=True,
            memory_free_kib=3 * 1024 * 1024, cpus=8, vms=[VM],
        ),
        ClusterHost(name="node2", uuid="u2", uri="tls://node2:16514", state="down", cpus=4),
        ClusterHost(name="node4", uuid="u4", uri="tls://node4:16514", state="up", maintenance=True),
        ClusterHost(uri="tls://node3:16514"),
    ],
    vms=[VM.model_copy(update={"host": "node1", "host_uuid": "u1"})],
)  # fmt: skip


@pytest.fixture(autouse=True)
def cluster_answer(monkeypatch: pytest.MonkeyPatch) -> None:
    original = FakeClient.__init__

    def init(self: FakeClient, uri: str, **kwargs: Any) -> None:
        original(self, uri, **kwargs)
        self.answers[("GET", "/v1/cluster")] = INFO.model_dump()

    monkeypatch.setattr(FakeClient, "__init__", init)


def test_cluster_list_table(capsys: pytest.CaptureFixture[str]) -> None:
    status, out, _ = run(capsys, "cluster", "list")
    assert status == 0, out
    lines = out.splitlines()
    assert lines[0].split() == ["Host", "State", "URI", "Free", "GiB", "CPUs", "Seen", "VMs"]
    assert lines[2].split() == ["node1", "*", "up", "tls://node1:16514", "3.0", "8", "now", "1"]
    assert lines[3].split()[:2] == ["node2", "down"]
    assert lines[4].split()[:4] == ["node4", "up", "(maintenance)", "tls://node4:16514"]
    assert lines[5].split()[:3] == ["?", "unknown", "tls://node3:16514"]
    assert "Leases: lockspace" in out
    assert any(line.split() == ["web", VM.uuid, "running", "node1"] for line in lines)


def test_cluster_list_json(capsys: pytest.CaptureFixture[str]) -> None:
    status, out, _ = run(capsys, "cluster", "list", "--json")
    assert status == 0
    assert ClusterInfo.model_validate(json.loads(out)) == INFO
