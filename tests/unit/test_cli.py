"""The ``vmferry`` command: parsing, output (tables and --json), errors and exit codes.

The daemon is faked one layer below the client's methods: :class:`FakeClient`
is a real :class:`Client` whose ``fetch`` answers the described request's JSON
from a table, so the CLI, the client's methods and the answer parsing are all real.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from errno import ENOENT
from pathlib import Path
from typing import Any

import pytest

from vmferry.api.models import DomainInfo, Event, HostInfo, JobInfo
from vmferry.cli import commands, context
from vmferry.cli.main import main
from vmferry.client import Client
from vmferry.client.calls import Call
from vmferry.errors import ErrorCode, VmferryError

VM1 = DomainInfo(
    name="vm1",
    uuid="6f1c8e8e-0000-4000-8000-000000000001",
    id=3,
    state="running",
    reason="booted",
    persistent=True,
    max_memory_kib=262144,
    memory_kib=131072,
    vcpus=2,
)
VM2 = DomainInfo(
    name="my vm",
    uuid="6f1c8e8e-0000-4000-8000-000000000002",
    state="shutoff",
    reason="shutdown",
    persistent=False,
    max_memory_kib=131072,
    memory_kib=131072,
    vcpus=1,
    job=JobInfo(async_job="migration-out", phase="perform3", async_owner_api="migrate"),
)
HOST = HostInfo(hostname="node1", uuid="h-1", version="0.1.0", qemu_version="10.0.0")


def _event(type: str, domain: str, reason: str = "", **detail: Any) -> Event:
    return Event(
        type=type, domain=domain, uuid=f"uuid-{domain}", reason=reason, timestamp=0.5, detail=detail
    )


class FakeEvents:
    def __init__(self, events: list[Event]) -> None:
        self.events = events
        self.closed = False

    def __enter__(self) -> Iterator[Event]:
        return iter(self.events)

    def __exit__(self, *exc: object) -> None:
        self.closed = True


class FakeClient(Client):
    """A :class:`Client` whose daemon is a table of answers keyed by (method, path)."""

    instances: list[FakeClient] = []  # reset by the fixture
    events_to_send: list[Event] = []

    def __init__(self, uri: str, **kwargs: Any) -> None:
        super().__init__(uri, **kwargs)
        self.sent: list[Call[Any]] = []
        self.answers: dict[tuple[str, str], Any] = {
            ("GET", "/v1/host"): HOST.model_dump(),
            ("GET", "/v1/domains"): [VM1.model_dump()],
            ("GET", "/v1/domains/vm1"): VM1.model_dump(),
            ("GET", "/v1/domains/my%20vm"): VM2.model_dump(),
            ("GET", "/v1/domains/vm1/state"): {"state": "running", "reason": "booted"},
            ("GET", "/v1/domains/vm1/xml"): {"xml": "<domain><name>vm1</name></domain>"},
            ("POST", "/v1/domains"): VM1.model_dump(),
            ("POST", "/v1/domains/vm1/shutdown"): VM1.model_dump() | {"state": "shutoff"},
            ("POST", "/v1/domains/6f1c8e8e-0000-4000-8000-000000000001/start"): VM1.model_dump(),
            ("GET", "/v1/domains/ghost"): VmferryError(
                ErrorCode.NO_DOMAIN, "no domain with matching name 'ghost'"
            ),
        }
        self.console_chunks = ["boot\n", "", "login: "]
        FakeClient.instances.append(self)

    def fetch(self, call: Call[Any], *, request_timeout: float | None = None) -> Any:
        self.sent.append(call)
        if call.path.endswith("/console"):
            return self._console(int((call.params or {})["offset"]))
        answer = self.answers[(call.method, call.path)]
        if isinstance(answer, BaseException):
            raise answer
        if call.path == "/v1/domains" and call.method == "GET" and call.params == {"all": "true"}:
            answer = [VM1.model_dump(), VM2.model_dump()]
        return answer

    def _console(self, offset: int) -> dict[str, Any]:
        polls = sum(c.path.endswith("/console") for c in self.sent)
        if polls > len(self.console_chunks):
            raise KeyboardInterrupt
        data = self.console_chunks[polls - 1]
        return {"offset": offset, "next_offset": offset + len(data), "data": data}

    def events(self) -> Any:
        self.stream = FakeEvents(self.events_to_send)
        return self.stream


@pytest.fixture(autouse=True)
def fake(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    FakeClient.instances = []
    monkeypatch.setattr(context, "Client", FakeClient)
    monkeypatch.delenv("VMFERRY_URI", raising=False)
    yield


def client() -> FakeClient:
    (only,) = FakeClient.instances
    return only


def run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    status = main(["-c", "unix:///fake.sock", *argv])
    out, err = capsys.readouterr()
    return status, out, err


# -- parsing ---------------------------------------------------------------------------------


def test_usage_errors(capsys: pytest.CaptureFixture[str]) -> None:
    assert main([]) == 2
    assert main(["-c", "unix:///x.sock", "frobnicate"]) == 2
    assert main(["-c", "unix:///x.sock", "start"]) == 2  # NAME missing
    assert main(["-c", "unix:///x.sock", "shutdown", "vm1", "--timeout", "-3"]) == 2
    assert main(["-c", "unix:///x.sock", "event", "--count", "0"]) == 2
    assert "usage: vmferry" in capsys.readouterr().err
    assert FakeClient.instances == []  # nothing was sent
    assert main(["--help"]) == 0
    out = capsys.readouterr().out
    assert all(name in out for name in ("hostinfo", "list", "domstate", "dumpxml", "event", "pki"))
    assert main(["pki", "--help"]) == 0
    assert "init" in capsys.readouterr().out


def test_uri_is_required(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["list"]) == 2
    err = capsys.readouterr().err
    assert "-c URI" in err and "VMFERRY_URI" in err


def test_uri_from_env_and_option(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("VMFERRY_URI", "unix:///from-env.sock")
    assert main(["list"]) == 0
    assert client().uri == "unix:///from-env.sock"
    FakeClient.instances.clear()
    assert main(["--connect", "tcp://127.0.0.1:9", "list"]) == 0
    assert client().uri == "tcp://127.0.0.1:9"


def test_bad_uri(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["-c", "unix://relative.sock", "list"]) == 1
    out, err = capsys.readouterr()
    assert out == ""
    assert err.startswith("error: invalid vmferryd URI 'unix://relative.sock'")
    assert err.endswith("[invalid-arg]\n")


# -- output ----------------------------------------------------------------------------------


def test_list_table(capsys: pytest.CaptureFixture[str]) -> None:
    status, out, _ = run(capsys, "list", "--all")
    assert status == 0
    assert out == (
        " Id   Name    State\n"
        "-----------------------\n"
        " 3    vm1     running\n"
        " -    my vm   shut off\n"
    )
    assert client().sent[0].params == {"all": "true"}
    status, out, _ = run(capsys, "list")
    assert out.splitlines()[2:] == [" 3    vm1    running"]


def test_list_json(capsys: pytest.CaptureFixture[str]) -> None:
    status, out, _ = run(capsys, "list", "--all", "--json")
    assert status == 0
    assert json.loads(out) == [VM1.model_dump(mode="json"), VM2.model_dump(mode="json")]


def test_hostinfo(capsys: pytest.CaptureFixture[str]) -> None:
    status, out, _ = run(capsys, "hostinfo")
    assert status == 0
    assert "Hostname:       node1\n" in out
    assert "QEMU version:   10.0.0\n" in out
    assert "Features:       -\n" in out
    status, out, _ = run(capsys, "hostinfo", "--json")
    assert HostInfo.model_validate_json(out) == HOST


def test_dominfo(capsys: pytest.CaptureFixture[str]) -> None:
    status, out, _ = run(capsys, "dominfo", "vm1")
    assert status == 0
    lines = out.splitlines()
    assert lines[:3] == ["Id:             3", "Name:           vm1", f"UUID:           {VM1.uuid}"]
    assert "State:          running" in lines
    assert "Max memory:     262144 KiB" in lines
    assert "Persistent:     yes" in lines
    assert not any(line.startswith("Async job") for line in lines)

    status, out, _ = run(capsys, "dominfo", "my vm")
    assert "Id:             -" in out
    assert "Async job:      migration-out (phase perform3, migrate)" in out
    status, out, _ = run(capsys, "dominfo", "my vm", "--json")
    assert DomainInfo.model_validate_json(out) == VM2


def test_domstate(capsys: pytest.CaptureFixture[str]) -> None:
    assert run(capsys, "domstate", "vm1") == (0, "running\n", "")
    assert run(capsys, "domstate", "vm1", "--reason") == (0, "running (booted)\n", "")
    _, out, _ = run(capsys, "domstate", "vm1", "--json")
    assert json.loads(out) == {"state": "running", "reason": "booted"}


def test_dumpxml(capsys: pytest.CaptureFixture[str]) -> None:
    status, out, _ = run(capsys, "dumpxml", "vm1", "--migratable")
    assert (status, out) == (0, "<domain><name>vm1</name></domain>\n")
    assert client().sent[0].params == {"migratable": "true", "inactive": "false"}
    status, out, _ = run(capsys, "dumpxml", "vm1", "--inactive", "--json")
    assert json.loads(out) == {"xml": "<domain><name>vm1</name></domain>"}


def test_lifecycle_commands(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    xml = tmp_path / "vm1.xml"
    xml.write_text("<domain><name>vm1</name></domain>")
    assert run(capsys, "define", str(xml)) == (0, f"Domain 'vm1' defined from {xml}\n", "")
    body = client().sent[0].json_body()
    assert body == {"xml": "<domain><name>vm1</name></domain>"}

    # by UUID: the message names the domain
    assert run(capsys, "start", VM1.uuid) == (0, "Domain 'vm1' started\n", "")

    assert run(capsys, "shutdown", "vm1", "--timeout", "5") == (
        0,
        "Domain 'vm1' has been shut down\n",
        "",
    )
    call = FakeClient.instances[-1].sent[0]
    assert call.json_body() == {"timeout": 5.0}


# -- errors ----------------------------------------------------------------------------------


def test_daemon_error(capsys: pytest.CaptureFixture[str]) -> None:
    assert run(capsys, "dominfo", "ghost") == (
        1,
        "",
        "error: no domain with matching name 'ghost' [no-domain]\n",
    )


def test_unreadable_file(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    status, out, err = run(capsys, "define", str(tmp_path / "nope.xml"))
    assert (status, out) == (1, "")
    assert (
        err == f"error: cannot read {tmp_path / 'nope.xml'}: {os.strerror(ENOENT)} [invalid-arg]\n"
    )
    assert client().sent == []


def test_ctrl_c(capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> None:
    def interrupted(self: Client, call: Call[Any], **kwargs: Any) -> Any:
        raise KeyboardInterrupt

    monkeypatch.setattr(FakeClient, "fetch", interrupted)
    assert run(capsys, "hostinfo") == (130, "", "")


def test_connect_failure_with_real_client(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(context, "Client", Client)
    tmp = tempfile.mkdtemp(prefix="vf", dir="/tmp")
    try:
        uri = f"unix://{tmp}/missing.sock"
        assert main(["-c", uri, "list"]) == 1
        out, err = capsys.readouterr()
        assert out == ""
        assert err == (
            f"error: cannot connect to vmferryd at {uri}: {os.strerror(ENOENT)} [connect-failed]\n"
        )
    finally:
        shutil.rmtree(tmp)


# -- console and events ----------------------------------------------------------------------


def test_console(capsys: pytest.CaptureFixture[str]) -> None:
    assert run(capsys, "console", "vm1") == (0, "boot\n", "")


def test_console_follow(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(commands, "CONSOLE_POLL", 0)
    # the fake raises KeyboardInterrupt (Ctrl-C) once its chunks are used up
    assert run(capsys, "console", "vm1", "--follow") == (130, "boot\nlogin: ", "")
    offsets = [call.params["offset"] for call in client().sent if call.params]
    assert offsets == ["0", "5", "5", "12"]


def test_event_lines(capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> None:
    events = [
        _event("started", "vm1", "booted"),
        _event("suspended", "other", "user"),
        _event("migration-iteration", "vm1", iteration=2),
        _event("stopped", "vm1", "migration-canceled"),
        _event("job-completed", "vm1"),
    ]
    monkeypatch.setattr(FakeClient, "events_to_send", events)
    status, out, _ = run(capsys, "event", "--loop", "--domain", "vm1", "--count", "3")
    assert status == 0
    assert out.splitlines() == [
        "event 'lifecycle' for domain 'vm1': Started Booted",
        "event 'migration-iteration' for domain 'vm1': iteration: '2'",
        "event 'lifecycle' for domain 'vm1': Stopped Migration canceled",
    ]
    assert client().stream.closed

    # without --loop: one event, like virsh; --timestamp prefixes the time (UTC)
    FakeClient.instances.clear()
    status, out, _ = run(capsys, "event", "--timestamp", "--domain", "uuid-other")
    assert out == (
        "1970-01-01 00:00:00.500+0000: event 'lifecycle' for domain 'other': Suspended User\n"
    )

    FakeClient.instances.clear()
    status, out, _ = run(capsys, "event", "--loop", "--count", "2", "--json")
    assert [Event.model_validate_json(line) for line in out.splitlines()] == events[:2]

    # the stream ends before --count is reached
    FakeClient.instances.clear()
    status, out, err = run(capsys, "event", "--loop", "--count", "9")
    assert status == 1
    assert len(out.splitlines()) == 5
    assert err == "error: vmferryd at unix:///fake.sock ended the event stream [connect-failed]\n"


# -- pki -------------------------------------------------------------------------------------


def test_pki_init(capsys: pytest.CaptureFixture[str]) -> None:
    tmp = Path(tempfile.mkdtemp(prefix="vf", dir="/tmp"))
    try:
        # needs no daemon, hence no URI
        assert main(["pki", "init", str(tmp / "pki"), "--san", "node2", "--san", "10.0.0.2"]) == 0
        assert {p.name for p in (tmp / "pki").iterdir()} >= {"ca.pem", "client.pem", "server.pem"}
        assert b"node2" in _server_sans(tmp / "pki")
        assert str(tmp / "pki") in capsys.readouterr().out
        # a second time would replace the CA: refused unless --force
        assert main(["pki", "init", str(tmp / "pki")]) == 1
        assert "[invalid-arg]" in capsys.readouterr().err
        assert main(["pki", "init", "--force", str(tmp / "pki")]) == 0
        assert b"node2" not in _server_sans(tmp / "pki")
    finally:
        shutil.rmtree(tmp)


def _server_sans(pki_dir: Path) -> bytes:
    from cryptography import x509

    cert = x509.load_pem_x509_certificate((pki_dir / "server.pem").read_bytes())
    names = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    return repr(list(names)).encode()
