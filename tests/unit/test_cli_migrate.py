"""The migration commands of ``vmferry``: option mapping and output.

These fake the daemon one layer below the client's methods (as
tests/unit/test_cli.py does); tests/e2e/test_cli_migrate_e2e.py runs the CLI
against two real vmferryd with the test guest.
"""

from __future__ import annotations

import io
import json
from pathlib import Path
from typing import Any

import pytest

from vmferry.api.models import JobStats
from vmferry.cli import context, migrate_cmds, progress
from vmferry.cli.main import build_parser, main
from vmferry.client import Client
from vmferry.client.calls import Call
from vmferry.client.migrate import MigrationReport
from vmferry.errors import ErrorCode, VmferryError
from vmferry.migration.flags import MigrateFlags as F
from vmferry.migration.params import MigrationParams

MIB = 1 << 20


def request(*argv: str) -> tuple[F, MigrationParams]:
    args = build_parser().parse_args(["migrate", *argv, "g1", "unix:///dst.sock"])
    return migrate_cmds.migration_request(args)


# -- options -> flags and parameters ---------------------------------------------------------


def test_default_is_virsh_non_live_migration() -> None:
    flags, params = request()
    assert flags == F(0)
    assert params == MigrationParams()


def test_switches_and_values_map_to_flags_and_params(tmp_path: Path) -> None:
    xml = tmp_path / "dest.xml"
    xml.write_text("<domain><name>g2</name></domain>\n")
    flags, params = request(
        "--live",
        "--p2p",
        "--persistent",
        "--undefinesource",
        "--suspend",
        "--auto-converge",
        "--compressed",
        "--dname",
        "g2",
        "--xml",
        str(xml),
        "--migrateuri",
        "tcp:10.0.0.2:49152",
        "--listen-address",
        "10.0.0.2",
        "--bandwidth",
        "300",
        "--timeout",
        "7",
    )
    assert flags == (
        F.LIVE
        | F.PEER2PEER
        | F.PERSIST_DEST
        | F.UNDEFINE_SOURCE
        | F.PAUSED
        | F.AUTO_CONVERGE
        | F.COMPRESSED
    )
    assert params == MigrationParams(
        bandwidth_mib_s=300,
        timeout_suspend_s=7.0,
        migrate_uri="tcp:10.0.0.2:49152",
        listen_address="10.0.0.2",
        dname="g2",
        dest_xml="<domain><name>g2</name></domain>\n",
    )


def test_parallel_and_offline() -> None:
    flags, params = request("--live", "--parallel", "4")
    assert flags == F.LIVE | F.PARALLEL
    assert params.parallel_connections == 4
    flags, _ = request("--offline", "--persistent")
    assert flags == F.OFFLINE | F.PERSIST_DEST


@pytest.mark.parametrize(
    ("argv", "words"),
    [
        (["--offline"], "requires --persistent"),
        (["--live", "--offline", "--persistent"], "mutually exclusive"),
        (["--timeout", "5"], "--timeout requires --live"),
        (["--live", "--p2p", "--v2"], "--v2 cannot be used with --p2p"),
        (["--live", "--parallel", "2", "--comp-methods", "xbzrle"], "cannot be used with parallel"),
        (["--live", "--comp-methods", "zstd"], "zstd compression needs parallel"),
        (["--live", "--tunnelled"], "--tunnelled requires --p2p"),
        (["--live", "--p2p", "--tunnelled", "--tls"], "do not go together"),
        (["--live", "--p2p", "--tunnelled", "--parallel", "2"], "cannot be parallel"),
        (["--xml", "/nonexistent/dest.xml"], "cannot read /nonexistent/dest.xml"),
    ],
)
def test_conflicting_options_are_refused(argv: list[str], words: str) -> None:
    with pytest.raises(VmferryError) as err:
        request(*argv)
    assert err.value.code == ErrorCode.INVALID_ARG
    assert words in err.value.message


def test_cli_errors_before_connecting(capsys: pytest.CaptureFixture[str]) -> None:
    base = ["-c", "unix:///nonexistent/src.sock", "migrate"]
    assert main([*base, "--offline", "g1", "unix:///nonexistent/dst.sock"]) == 1
    assert capsys.readouterr().err == (
        "error: offline migration requires --persistent [invalid-arg]\n"
    )
    for bad in (["--bandwidth", "0"], ["--parallel", "x"], ["--timeout", "-1"]):
        assert main([*base, *bad, "g1", "unix:///nonexistent/dst.sock"]) == 2
    assert main([*base, "g1"]) == 2  # DESTURI missing
    capsys.readouterr()
    # Real clients: the source is contacted first, and is not there.
    assert main([*base, "--live", "g1", "unix:///nonexistent/dst.sock"]) == 1
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.endswith("[connect-failed]\n")
    assert "/nonexistent/dst.sock" in err or "/nonexistent/src.sock" in err


@pytest.mark.parametrize(
    "argv",
    [
        ["migrate", "--bogus", "g1", "unix:///dst.sock"],
        ["migrate", "--live", "g1", "--bogus", "unix:///dst.sock"],
        ["migrate", "g1", "unix:///dst.sock", "--bogus"],
    ],
)
def test_unknown_migrate_option_is_named(
    argv: list[str], capsys: pytest.CaptureFixture[str]
) -> None:
    """argparse's own message for an unknown option, wherever it stands: not missing arguments."""
    assert main(["-c", "unix:///nonexistent/src.sock", *argv]) == 2
    err = capsys.readouterr().err
    assert err.rstrip().endswith("vmferry migrate: error: unrecognized arguments: --bogus"), err
    assert "required" not in err


# -- output ---------------------------------------------------------------------------------


def test_summary() -> None:
    report = MigrationReport(
        wall_s=0.3149,
        steps={"begin": 0.005, "prepare": 0.0504, "perform": 0.2, "finish": 0.02, "confirm": 0.01},
        stats={"total_time_ms": 245, "downtime_ms": 18, "data_processed": 108_585_138},
    )
    assert migrate_cmds.summary(report) == (
        "Migration: [100 %]\n"
        "Wall time:      0.31 s\n"
        "QEMU time:      245 ms\n"
        "Downtime:       18 ms\n"
        "Data moved:     103.555 MiB\n"
        "Steps:          begin 5 ms, prepare 50 ms, perform 200 ms, finish 20 ms, confirm 10 ms"
    )
    guest = migrate_cmds.summary(
        MigrationReport(wall_s=0.3, stats={"downtime_ms": 18, "guest_downtime_ms": 25})
    )
    assert guest.splitlines()[3:5] == ["Downtime:       18 ms", "Guest downtime: 25 ms"]
    bare = migrate_cmds.summary(MigrationReport(wall_s=2.0))
    assert bare.splitlines()[1:4] == [
        "Wall time:      2.00 s",
        "QEMU time:      -",
        "Downtime:       -",
    ]
    assert "Steps" not in bare


def test_pretty_bytes() -> None:
    assert migrate_cmds.pretty_bytes(0) == "0 B"
    assert migrate_cmds.pretty_bytes(1023) == "1023 B"
    assert migrate_cmds.pretty_bytes(4096) == "4.000 KiB"
    assert migrate_cmds.pretty_bytes(134_750_208) == "128.508 MiB"
    assert migrate_cmds.pretty_bytes(3 << 30) == "3.000 GiB"


RUNNING = JobStats(
    type="unbounded",
    operation="outgoing migration",
    phase="perform3",
    stats={
        "status": "active",
        "time_elapsed_ms": 812,
        "data_total": 134_750_208,
        "data_processed": 52_428_800,
        "data_remaining": 80 * MIB,
        "memory_bps": 100 * MIB,
        "memory_dirty_rate": 1024,
        "memory_page_size": 4096,
        "memory_iteration": 1,
        "setup_time_ms": 2,
        "expected_downtime_ms": 300,
    },
)


def test_domjobinfo_running_job() -> None:
    assert migrate_cmds.job_info(RUNNING.model_dump()) == (
        "Job type:          Unbounded\n"
        "Operation:         Outgoing migration\n"
        "Phase:             perform3\n"
        "Time elapsed:      812          ms\n"
        "Data processed:    50.000 MiB\n"
        "Data remaining:    80.000 MiB\n"
        "Data total:        128.508 MiB\n"
        "Memory bandwidth:  100.000 MiB/s\n"
        "Dirty rate:        1024         pages/s\n"
        "Page size:         4.000 KiB\n"
        "Iteration:         1\n"
        "Setup time:        2            ms\n"
        "Expected downtime: 300          ms"
    )


def test_layouts_take_models_too() -> None:
    # Commands that hold a model (ctx.client.jobinfo(...)) lay it out the same.
    assert migrate_cmds.job_info(RUNNING) == migrate_cmds.job_info(RUNNING.model_dump())


def test_domjobinfo_completed_and_none() -> None:
    done = JobStats(
        type="completed",
        stats={"data_processed": 2048, "downtime_ms": 18, "total_time_ms": 72, "error": None},
    )
    assert migrate_cmds.job_info(done.model_dump()).splitlines() == [
        "Job type:       Completed",
        "Data processed: 2.000 KiB",
        "Downtime:       18           ms",
        "Total time:     72           ms",
    ]
    assert migrate_cmds.job_info(JobStats().model_dump()) == "Job type: None"
    failed = JobStats(type="failed", stats={"error": "Unable to write to socket"})
    assert migrate_cmds.job_info(failed.model_dump()).splitlines()[-1] == (
        "Error message: Unable to write to socket"
    )


def test_progress_figures() -> None:
    stats = RUNNING.stats
    assert progress.percent(stats) == 37  # (128.508 - 80) / 128.508
    assert progress.eta_s(stats) == pytest.approx(0.8)
    assert progress.eta_s({"data_remaining": 5}) is None
    assert progress.percent({}) == 0
    assert progress.line("perform", stats) == (
        "Migration: [ 37 %] perform: 50.0 MiB / 128.5 MiB, remaining 80.0 MiB, "
        "100.0 MiB/s, iteration 1, ETA 0.8 s"
    )
    assert progress.line("prepare", None) == "Migration: prepare"


def test_progress_view_choice_and_bar() -> None:
    out = io.StringIO()
    assert type(progress.open_view(out, verbose=False)) is progress.NoProgress
    assert type(progress.open_view(out, verbose=True)) is progress.LineProgress
    with progress.open_view(out, verbose=False, terminal=True) as view:
        assert isinstance(view, progress.BarProgress)
        for step in ("begin", "prepare", "perform"):
            view(step, None)
        view("perform", RUNNING.stats)
        view.finish({**RUNNING.stats, "memory_iteration": 3})
    text = out.getvalue()
    assert "\x1b[" in text  # drawn as a live terminal bar
    assert " 37 %" in text and "ETA 0.8 s" in text and "iteration 1" in text
    last = text[text.rindex("done") :]
    assert "100 %" in last and "remaining 0.0 MiB" in last and "iteration 3" in last


# -- the other commands, against a faked daemon ----------------------------------------------


class FakeClient(Client):
    """A :class:`Client` whose daemon answers the migration requests from a table."""

    last: FakeClient

    def __init__(self, uri: str, **kwargs: Any) -> None:
        super().__init__(uri, **kwargs)
        self.sent: list[Call[Any]] = []
        base = "/v1/domains/g1"
        self.answers: dict[tuple[str, str], Any] = {
            ("GET", f"{base}/jobinfo"): RUNNING.model_dump(),
            ("POST", f"{base}/jobabort"): {"cookie": ""},
            ("GET", f"{base}/migrate/maxdowntime"): {"downtime_ms": 300},
            ("PUT", f"{base}/migrate/maxdowntime"): {"downtime_ms": 50},
            ("GET", f"{base}/migrate/speed"): {"bandwidth_mib_s": 0},
            ("PUT", f"{base}/migrate/speed"): {"bandwidth_mib_s": 80},
            ("POST", "/v1/domains/ghost/jobabort"): VmferryError(
                ErrorCode.OPERATION_INVALID, "no job is active on the domain"
            ),
        }
        FakeClient.last = self

    def fetch(self, call: Call[Any], *, request_timeout: float | None = None) -> Any:
        self.sent.append(call)
        answer = self.answers[(call.method, call.path)]
        if isinstance(answer, BaseException):
            raise answer
        return answer


@pytest.fixture
def fake(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(context, "Client", FakeClient)


def cli(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    status = main(["-c", "unix:///fake.sock", *argv])
    out, err = capsys.readouterr()
    return status, out, err


def test_job_and_tuning_commands(fake: None, capsys: pytest.CaptureFixture[str]) -> None:
    status, out, _ = cli(capsys, "domjobinfo", "g1")
    assert status == 0 and out == migrate_cmds.job_info(RUNNING.model_dump()) + "\n"
    assert FakeClient.last.sent[0].params == {"completed": "false"}
    status, out, _ = cli(capsys, "domjobinfo", "g1", "--completed", "--json")
    assert json.loads(out)["stats"]["expected_downtime_ms"] == 300
    assert FakeClient.last.sent[0].params == {"completed": "true"}

    assert cli(capsys, "domjobabort", "g1") == (0, "", "")
    assert cli(capsys, "domjobabort", "ghost") == (
        1,
        "",
        "error: no job is active on the domain [operation-invalid]\n",
    )

    assert cli(capsys, "migrate-setmaxdowntime", "g1", "50") == (0, "", "")
    assert FakeClient.last.sent[0].json_body() == {"downtime_ms": 50}
    assert cli(capsys, "migrate-getmaxdowntime", "g1") == (0, "300\n", "")
    assert cli(capsys, "migrate-setspeed", "g1", "80") == (0, "", "")
    assert FakeClient.last.sent[0].json_body() == {"bandwidth_mib_s": 80}
    status, out, _ = cli(capsys, "migrate-getspeed", "g1", "--json")
    assert json.loads(out) == {"bandwidth_mib_s": 0}
    assert cli(capsys, "migrate-setmaxdowntime", "g1", "0")[0] == 2
    assert cli(capsys, "migrate-setspeed", "g1", "-1")[0] == 2


def test_storage_options() -> None:
    flags, params = request("--live", "--copy-storage-all", "--migrate-disks", "vda,vdb")
    assert flags == F.LIVE | F.NON_SHARED_DISK and params.migrate_disks == "vda,vdb"
    flags, _ = request("--live", "--copy-storage-inc", "--copy-storage-synchronous-writes")
    assert flags == F.LIVE | F.NON_SHARED_INC | F.NON_SHARED_SYNCHRONOUS_WRITES
    with pytest.raises(VmferryError, match="mutually exclusive"):
        request("--copy-storage-all", "--copy-storage-inc")
    with pytest.raises(VmferryError, match="require --copy-storage"):
        request("--migrate-disks", "vda")


def test_domjobinfo_shows_the_disks_part() -> None:
    job = JobStats(
        type="unbounded",
        stats={"disk_total": 16 * MIB, "disk_processed": 4 * MIB, "disk_remaining": 12 * MIB},
    )
    text = migrate_cmds.job_info(job)
    assert "File total:" in text and "16.000 MiB" in text and "File remaining:" in text
