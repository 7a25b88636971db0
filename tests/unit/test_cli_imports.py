"""The CLI's fast commands import nothing heavy (issue 10: an instant CLI).

``vmferry --help``, ``list`` and ``domstate`` run in a fresh interpreter
against a stand-in daemon (canned JSON on a unix socket) and report the
modules they imported: none of :data:`HEAVY` may be among them.  An import
check, not a timed test: it fails the moment a module-level import of
pydantic, httpx, ... creeps back into the path of these commands (see
docs/cli.md, "Adding a command").
"""

from __future__ import annotations

import json
import os
import socketserver
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

#: Never imported by the fast commands: the daemon's and API's stacks, and what is slow to load.
HEAVY = (
    "httpx",
    "pydantic",
    "fastapi",
    "rich",
    "uvicorn",
    "cryptography",
    "vmferry.api",
    "vmferry.daemon",
    "vmferry.qemu",
    "vmferry.domain",
    "vmferry.migration",
    # standard library modules that cost a good part of the budget by themselves
    "asyncio",
    "dataclasses",
    "http.client",
    "socket",  # a unix socket is opened with _socket (vmferry.client.http1)
)

SRC = Path(__file__).resolve().parents[2] / "src"

# Run the CLI's main() and print the modules loaded by then (on stderr, after its output).
PROBE = (
    "import json, sys\n"
    "from vmferry.cli.main import main\n"
    "rc = main(sys.argv[1:])\n"
    "sys.stderr.write('\\nMODULES ' + json.dumps(sorted(sys.modules)) + '\\n')\n"
    "sys.exit(rc)\n"
)

DOMAINS = [
    {
        "name": "vm1",
        "uuid": "6f1c8e8e-0000-4000-8000-000000000001",
        "id": 1,
        "state": "running",
        "reason": "booted",
        "persistent": True,
        "max_memory_kib": 131072,
        "memory_kib": 131072,
        "vcpus": 1,
    }
]
ANSWERS = {
    "/v1/domains?all=false": DOMAINS,
    "/v1/domains?all=true": DOMAINS,
    "/v1/domains/vm1/state": {"state": "running", "reason": "booted"},
    # the commands of the storage, verbs and observe branches
    "/v1/pools": [
        {"name": "default", "path": "/p", "capacity": 1 << 30, "available": 1 << 29, "volumes": 1}
    ],
    "/v1/pools/default/volumes": [
        {
            "name": "a.qcow2",
            "path": "/p/a.qcow2",
            "format": "qcow2",
            "capacity": 1 << 20,
            "allocation": 4096,
            "backing": [{"name": "base.raw", "format": "raw"}],
        }
    ],
    "/v1/domstats?names=vm1&groups=": {"domains": {"vm1": {"state.state": 1}}},
    "/v1/domains/vm1/interfaces": [
        {"interface": "n0", "type": "user", "source": "-", "model": "e1000", "mac": "52:54:0:0:0:1"}
    ],
    "/v1/domains/vm1/reboot": DOMAINS[0],
    "/metrics": "vmferry_domains 1\n",
    # migrate's sessions (then Begin is refused: no-domain)
    "/v1/session": {"session": "s1", "features": ["migration-v3"]},
}


class _Handler(socketserver.StreamRequestHandler):
    def handle(self) -> None:
        request = self.rfile.readline().decode()
        while self.rfile.readline() not in (b"\r\n", b"\n", b""):
            pass
        target = request.split()[1]
        answer = ANSWERS.get(target, {"code": "no-domain", "message": target})
        text = isinstance(answer, str)
        body = (answer if text else json.dumps(answer)).encode()
        status = "200 OK" if target in ANSWERS else "404 Not Found"
        kind = "text/plain" if text else "application/json"
        self.wfile.write(
            f"HTTP/1.1 {status}\r\ncontent-type: {kind}\r\n"
            f"content-length: {len(body)}\r\nconnection: close\r\n\r\n".encode()
            + body
        )


@pytest.fixture(scope="module")
def daemon_uri(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    # Short: unix socket paths are limited to 107 bytes.
    path = Path(tmp_path_factory.mktemp("cli", numbered=True)) / "d.sock"
    if len(str(path)) > 100:
        path = Path("/tmp") / f"vf-cli-{os.getpid()}.sock"
    server = socketserver.ThreadingUnixStreamServer(str(path), _Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"unix://{path}"
    finally:
        server.shutdown()
        server.server_close()
        path.unlink(missing_ok=True)


def run_cli(*argv: str) -> tuple[int, str, list[str]]:
    """Run ``vmferry ARGV`` in a fresh interpreter: status, stdout, modules it imported."""
    env = {k: v for k, v in os.environ.items() if k != "VMFERRY_URI"}
    env["PYTHONPATH"] = os.pathsep.join([str(SRC), env.get("PYTHONPATH", "")])
    done = subprocess.run(
        [sys.executable, "-c", PROBE, *argv],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
    )
    _, _, modules = done.stderr.rpartition("\nMODULES ")
    assert modules, f"the probe did not report its modules: {done.stderr}"
    return done.returncode, done.stdout, json.loads(modules)


def heavy(modules: list[str]) -> list[str]:
    return [m for m in modules if any(m == h or m.startswith(h + ".") for h in HEAVY)]


def test_help_imports_nothing_heavy() -> None:
    status, out, modules = run_cli("--help")
    assert status == 0 and "domstate" in out
    assert heavy(modules) == []


def test_list_and_domstate_import_nothing_heavy(daemon_uri: str) -> None:
    status, out, modules = run_cli("-c", daemon_uri, "list")
    assert (status, out.splitlines()[2:]) == (0, [" 1    vm1    running"])
    assert heavy(modules) == []
    status, out, modules = run_cli("-c", daemon_uri, "domstate", "--reason", "vm1")
    assert (status, out) == (0, "running (booted)\n")
    assert heavy(modules) == []
    status, out, modules = run_cli("-c", daemon_uri, "list", "--all", "--name")
    assert (status, out) == (0, "vm1\n")
    assert heavy(modules) == []


@pytest.mark.parametrize(
    ("argv", "shows"),
    [
        (["pool-list"], "default"),
        (["vol-list", "default"], "base.raw (raw)"),
        (["domstats", "vm1"], "state.state=1"),
        (["domiflist", "vm1"], "52:54:0:0:0:1"),
        (["reboot", "vm1"], "Domain 'vm1' is being rebooted"),
        (["pool-list", "--json"], '"available"'),
        (["metrics", "--raw"], "vmferry_domains 1"),
    ],
)
def test_storage_verbs_commands_import_nothing_heavy(
    daemon_uri: str, argv: list[str], shows: str
) -> None:
    status, out, modules = run_cli("-c", daemon_uri, *argv)
    assert status == 0 and shows in out
    assert heavy(modules) == []


def test_errors_import_nothing_heavy(daemon_uri: str) -> None:
    status, out, modules = run_cli("-c", daemon_uri, "domstate", "ghost")
    assert (status, out) == (1, "")
    assert heavy(modules) == []


def test_the_check_can_fail() -> None:
    # The probe does see a heavy module when one is imported.
    done = subprocess.run(
        [sys.executable, "-c", "import pydantic\n" + PROBE, "--help"],
        capture_output=True,
        text=True,
        env={**os.environ, "PYTHONPATH": str(SRC)},
        timeout=120,
    )
    modules = json.loads(done.stderr.rpartition("\nMODULES ")[2])
    assert "pydantic" in heavy(modules)


#: ``migrate`` needs the protocol and its parameters (vmferry.migration), but no event
#: loop: the blocking client drives the protocol (vmferry.client.migrate_blocking); nor
#: ``logging`` (vmferry.logs.get_logger), ``dataclasses`` (the parameters are a plain
#: record) or ``threading`` (no progress thread without a view that shows figures).
MIGRATE_HEAVY = (
    "asyncio",
    "logging",
    "dataclasses",
    "inspect",
    "threading",
    "socket",
    "httpx",
    "pydantic",
    "fastapi",
    "rich",
    "uvicorn",
    "vmferry.api",
    "vmferry.daemon",
    "vmferry.qemu",
    "vmferry.domain",
    "http.client",
)


def test_migrate_imports_no_event_loop(daemon_uri: str) -> None:
    # The stand-in opens the sessions and refuses Begin: the protocol ran, up to its first step.
    status, _, modules = run_cli("-c", daemon_uri, "migrate", "--live", "vm1", daemon_uri)
    assert status == 1
    assert "vmferry.client.migrate_blocking" in modules  # the path under test was taken
    assert "vmferry.migration.protocol" in modules
    assert [m for m in modules if any(m == h or m.startswith(h + ".") for h in MIGRATE_HEAVY)] == []
