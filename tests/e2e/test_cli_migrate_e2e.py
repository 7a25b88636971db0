"""The migration commands of ``vmferry`` against two real vmferryd with the test guest."""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from typing import Any

import pytest

from vmferry.cli.main import main
from vmferry.testguest import check_continuity, guest_xml
from vmferry.testing import Host, hosts, wait_heartbeat


@pytest.fixture(scope="module")
def pair() -> Iterator[tuple[Host, Host]]:
    """Two hosts, the test guest g1 running on the first."""
    with hosts(2) as (a, b), a.client() as c:
        c.create(guest_xml("g1"))
        wait_heartbeat(c, "g1")
        yield a, b


def _hb(host: Host) -> Any:
    with host.client() as c:
        return wait_heartbeat(c, "g1")


def _continues(host: Host, before: Any) -> None:
    with host.client() as c:
        assert c.domstate("g1").state == "running"
        check_continuity(before, wait_heartbeat(c, "g1", after=before))


@pytest.mark.qemu
def test_migrate_live_then_p2p_back(
    pair: tuple[Host, Host], capsys: pytest.CaptureFixture[str]
) -> None:
    a, b = pair
    before = _hb(a)
    # The bandwidth cap makes Perform last ~1 s, long enough for progress polls.
    argv = ["-c", a.uri, "migrate", "--live", "--verbose", "--bandwidth", "100", "g1", b.uri]
    assert main(argv) == 0
    out = capsys.readouterr().out.splitlines()
    steps = [line.split()[1] for line in out if re.fullmatch(r"Migration: [a-z]+", line)]
    assert steps == ["begin", "prepare", "perform", "finish", "confirm"]
    polled = [line for line in out if line.startswith("Migration: [") and "perform:" in line]
    assert polled, out
    assert re.search(r"MiB/s, iteration \d+, ETA ", polled[-1])
    summary = out[out.index("Migration: [100 %]") :]
    assert any(re.fullmatch(r"Downtime: +\d+ ms", line) for line in summary), summary
    assert any(line.startswith("Migration id: ") for line in out)
    assert any(re.fullmatch(r"Guest downtime: +\d+ ms", line) for line in summary), summary
    _continues(b, before)

    # The source keeps the completed job's statistics.
    assert main(["-c", a.uri, "domjobinfo", "--completed", "g1"]) == 0
    info = capsys.readouterr().out
    assert re.match(r"Job type: +Completed\n", info)  # aligned to the longest label
    assert re.search(r"^Downtime: +\d+ +ms$", info, re.M)
    assert re.search(r"^Guest downtime: +\d+ +ms$", info, re.M)
    assert re.search(r"^Contract: +default$", info, re.M)  # a plain --live: the daemon's

    before = _hb(b)
    assert main(["-c", b.uri, "migrate", "--live", "--p2p", "--json", "g1", a.uri]) == 0
    report = json.loads(capsys.readouterr().out)  # exactly one JSON document, no progress
    assert (report["p2p"], report["destination"]) == (True, a.uri)
    assert set(report["steps"]) == {"begin", "prepare", "perform", "finish", "confirm"}
    assert report["stats"]["status"] == "completed" and report["stats"]["downtime_ms"] >= 0
    _continues(a, before)
    with b.client() as c:
        assert "g1" not in [d.name for d in c.list_domains(all=True)]


@pytest.mark.qemu
def test_tuning_round_trip_on_a_running_domain(
    pair: tuple[Host, Host], capsys: pytest.CaptureFixture[str]
) -> None:
    a, _ = pair
    base = ["-c", a.uri]
    for setter, getter, value in (
        ("migrate-setmaxdowntime", "migrate-getmaxdowntime", "123"),
        ("migrate-setspeed", "migrate-getspeed", "42"),
    ):
        assert main([*base, setter, "g1", value]) == 0
        assert main([*base, getter, "g1"]) == 0
        assert capsys.readouterr().out == f"{value}\n"
    assert main([*base, "migrate-setspeed", "g1", "0"]) == 0  # unlimited again
    assert main([*base, "migrate-getspeed", "g1", "--json"]) == 0
    assert json.loads(capsys.readouterr().out) == {"bandwidth_mib_s": 0}
    # No migration runs: nothing to abort, and no running job to show.
    assert main([*base, "domjobabort", "g1"]) == 1
    assert "no job is active" in capsys.readouterr().err
    assert main([*base, "domjobinfo", "g1"]) == 0
    assert capsys.readouterr().out == "Job type: None\n"


@pytest.mark.qemu
def test_domjobinfo_completed_on_destination(
    pair: tuple[Host, Host], capsys: pytest.CaptureFixture[str]
) -> None:
    a, b = pair
    try:
        for src, dst in ((a, b), (b, a)):
            assert main(["-c", src.uri, "migrate", "--live", "--json", "g1", dst.uri]) == 0
            report = json.loads(capsys.readouterr().out)
            assert main(["-c", dst.uri, "domjobinfo", "--completed", "--json", "g1"]) == 0
            job = json.loads(capsys.readouterr().out)
            assert job["type"] == "completed"
            assert job["stats"]["downtime_ms"] >= 0
            # This hop's figures, not an earlier one's.
            assert job["stats"]["data_processed"] == report["stats"]["data_processed"]
    finally:
        _home(a, b)


def _home(a: Host, b: Host) -> None:
    """Bring g1 back to *a* if a failed assertion left it on *b*."""
    with b.client() as c:
        if "g1" in [d.name for d in c.list_domains()]:
            main(["-c", b.uri, "migrate", "--live", "g1", a.uri])
