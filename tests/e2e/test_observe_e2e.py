"""A daemon you can watch: one migration followed by its id in both daemons' JSON logs,
its steps in ``domjobinfo --completed`` on both sides, and its figures in ``/metrics``."""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from vmferry.cli.main import main
from vmferry.testguest import check_continuity, guest_xml
from vmferry.testing import Host, hosts, wait_heartbeat


class JsonLogHost(Host):
    """A daemon that logs one JSON object per line."""

    def command(self, cfg: Path) -> list[str]:
        return [*super().command(cfg), "--log-format", "json"]


@pytest.fixture(scope="module")
def pair() -> Iterator[tuple[Host, Host]]:
    with hosts(2, host_type=JsonLogHost) as (a, b), a.client() as c:
        c.create(guest_xml("g1"))
        wait_heartbeat(c, "g1")
        yield a, b


def _log_lines(host: Host) -> list[dict[str, Any]]:
    # Every line the daemon wrote is one JSON object (json.loads fails on anything else).
    return [json.loads(text) for text in host.log.read_text().splitlines() if text.strip()]


def _metric(text: str, name: str, **labels: str) -> float:
    """The value of one sample of the exposition *text* (0 if absent)."""
    want = ",".join(f'{k}="{v}"' for k, v in sorted(labels.items()))
    for line in text.splitlines():
        if line.startswith("#"):
            continue
        key, _, value = line.rpartition(" ")
        sample, _, rest = key.partition("{")
        got = ",".join(sorted(rest.rstrip("}").split(","))) if rest else ""
        if sample == name and got == want:
            return float(value)
    return 0.0


@pytest.mark.qemu
def test_one_migration_followed_across_both_daemons(
    pair: tuple[Host, Host], capsys: pytest.CaptureFixture[str]
) -> None:
    a, b = pair
    with a.client() as c:
        before = wait_heartbeat(c, "g1")
    argv = ["-c", a.uri, "migrate", "--live", "--verbose", "g1", b.uri]
    assert main(argv) == 0
    out = capsys.readouterr().out
    mid = re.search(r"^Migration id: (\S+)$", out, re.M)
    assert mid, out
    migration_id = mid.group(1)
    # --verbose: each step's time as it ends.
    for step in ("begin", "prepare", "perform", "finish", "confirm"):
        assert re.search(rf"^Migration: {step} took \d+ ms$", out, re.M), out
    with b.client() as c:
        check_continuity(before, wait_heartbeat(c, "g1", after=before))

    # grep ID: both daemons logged the migration's steps under its id.
    src = [x for x in _log_lines(a) if x.get("migration_id") == migration_id]
    dst = [x for x in _log_lines(b) if x.get("migration_id") == migration_id]
    src_text = "\n".join(x["message"] for x in src)
    dst_text = "\n".join(x["message"] for x in dst)
    for step in ("begin", "perform", "confirm"):
        assert f"source {step} done" in src_text, src_text
    for step in ("prepare", "finish"):
        assert f"destination {step} done" in dst_text, dst_text
    assert "migration of g1 completed on the source" in src_text
    assert "migration of g1 completed on the destination" in dst_text
    assert migration_id in a.log.read_text() and migration_id in b.log.read_text()

    # domjobinfo --completed on both sides: the id and the steps as that side saw them.
    assert main(["-c", a.uri, "domjobinfo", "--completed", "g1"]) == 0
    info = capsys.readouterr().out
    # (the label column is as wide as the longest label present)
    assert re.search(rf"^Migration id: +{migration_id}$", info, re.M), info
    assert re.search(r"^Source steps: +begin \d+ ms, perform \d+ ms, confirm \d+ ms$", info, re.M)
    assert main(["-c", b.uri, "domjobinfo", "--completed", "--json", "g1"]) == 0
    job = json.loads(capsys.readouterr().out)
    assert job["stats"]["migration_id"] == migration_id
    assert set(job["stats"]["destination_phases_ms"]) == {"prepare", "finish"}

    # /metrics on each daemon counts this migration on its side.
    with a.client() as c:
        text_a = c.metrics()
    with b.client() as c:
        text_b = c.metrics()
    done = {"mode": "live", "result": "completed"}
    assert _metric(text_a, "vmferry_migrations_total", side="source", **done) == 1
    assert _metric(text_a, "vmferry_migrations_total", side="destination", **done) == 0
    assert _metric(text_b, "vmferry_migrations_total", side="destination", **done) == 1
    assert _metric(text_a, "vmferry_migration_bytes_total", side="source") > 0
    assert _metric(text_a, "vmferry_migration_phase_seconds_count", side="source", phase="perform")
    assert _metric(
        text_b, "vmferry_migration_downtime_seconds_count", side="destination", kind="qemu"
    )
    assert _metric(text_a, "vmferry_qemu_processes") == 0
    assert _metric(text_b, "vmferry_qemu_processes") == 1
    assert _metric(text_b, "vmferry_domains", state="running") == 1
    route = {"method": "POST", "route": "/v1/domains/{name}/migrate/begin", "status": "200"}
    assert _metric(text_a, "vmferry_api_request_duration_seconds_count", **route) == 1
    assert _metric(text_a, "vmferry_job_wait_seconds_count", job="migration out") >= 1

    # vmferry metrics: the summary of the same figures.
    assert main(["-c", b.uri, "metrics", "--json"]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert {"side": "destination", "mode": "live", "result": "completed", "count": 1} in summary[
        "migrations"
    ]
    assert summary["qemu_processes"] == 1
    assert main(["-c", b.uri, "metrics"]) == 0
    table = capsys.readouterr().out
    assert re.search(r"^  destination +live +completed +1$", table, re.M), table


@pytest.mark.qemu
def test_the_destination_shows_the_policy_actions_too(
    pair: tuple[Host, Host], capsys: pytest.CaptureFixture[str]
) -> None:
    a, b = pair
    src, dst = (b, a) if "g1" in _names(b) else (a, b)
    with src.client() as c:
        before = wait_heartbeat(c, "g1")
    argv = ["-c", src.uri, "migrate", "--live", "--verbose", "--downtime-target", "300"]
    assert main([*argv, "g1", dst.uri]) == 0
    out = capsys.readouterr().out
    # The policy's first action (setting QEMU's limit to the target) as it happened.
    assert re.search(r"^Migration: policy action t=\S+s it=\d+ downtime 300", out, re.M), out
    with dst.client() as c:
        check_continuity(before, wait_heartbeat(c, "g1", after=before))
    shown = {}
    for host in (src, dst):
        assert main(["-c", host.uri, "domjobinfo", "--completed", "--json", "g1"]) == 0
        shown[host.name] = json.loads(capsys.readouterr().out)["stats"]
    sent, received = shown[src.name], shown[dst.name]
    assert received["policy"] == sent["policy"] == "vmferry"
    assert received["policy_actions"] == sent["policy_actions"] and sent["policy_actions"]
    assert main(["-c", dst.uri, "domjobinfo", "--completed", "g1"]) == 0
    text = capsys.readouterr().out
    assert re.search(r"^Policy action: +t=\S+s it=\d+ downtime 300", text, re.M), text


def _names(host: Host) -> list[str]:
    with host.client() as c:
        return [d.name for d in c.list_domains()]
