"""Test hosts: real vmferryd processes, each with its own state dir and unix socket."""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from vmferry.client import Client
from vmferry.errors import VmferryError
from vmferry.testguest import Heartbeat, daemon_paths_toml, last_heartbeat


@dataclass
class Host:
    """One vmferryd under test."""

    root: Path
    name: str
    port_min: int
    extra_env: dict[str, str] = field(default_factory=dict)
    tls_port: int = 0  # also listen on tls://127.0.0.1:PORT (needs pki_dir)
    pki_dir: Path | None = None
    proc: subprocess.Popen[bytes] | None = None
    # --insecure: p2p and peer URIs may be unix:// (the tests' daemons talk over unix sockets)
    insecure: bool = True
    extra_config: str = ""  # TOML appended to the [migration] section

    @property
    def state_dir(self) -> Path:
        return self.root / "state"

    @property
    def socket(self) -> Path:
        return self.root / "d.sock"

    @property
    def uri(self) -> str:
        return f"unix://{self.socket}"

    @property
    def host_uuid(self) -> str:
        return str(uuid.uuid5(uuid.NAMESPACE_DNS, str(self.root)))

    @property
    def tls_uri(self) -> str:
        return f"tls://127.0.0.1:{self.tls_port}"

    @property
    def log(self) -> Path:
        return self.root / "vmferryd.log"

    def write_config(self) -> Path:
        cfg = self.root / "vmferryd.toml"
        cfg.write_text(
            f'[host]\nhostname = "{self.name}"\nuuid = "{self.host_uuid}"\n'
            f"[jobs]\nwait_timeout = 5.0\n"
            f"[migration]\nport_min = {self.port_min}\nport_max = {self.port_min + 14}\n"
            + self.extra_config
            + (f'[tls]\npki_dir = "{self.pki_dir}"\n' if self.pki_dir else "")
            + daemon_paths_toml()
        )
        return cfg

    def command(self, cfg: Path) -> list[str]:
        """The daemon's argv (a subclass may wrap it, e.g. in ``ip netns exec``)."""
        return [
            sys.executable,
            "-m",
            "vmferry.daemon.main",
            "--state-dir",
            str(self.state_dir),
            "--listen",
            self.uri,
            "--config",
            str(cfg),
            "--log-level",
            "debug",
            *(["--listen", self.tls_uri] if self.tls_port else []),
            *(["--insecure"] if self.insecure else []),
        ]

    def start(self, timeout: float = 20.0) -> None:
        cfg = self.write_config()
        log = self.log.open("ab")
        self.proc = subprocess.Popen(
            self.command(cfg),
            stdout=log,
            stderr=subprocess.STDOUT,
            env={**os.environ, **self.extra_env},
        )
        log.close()
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"vmferryd {self.name} exited:\n{self.log.read_text()[-3000:]}")
            if self.socket.exists():
                try:
                    with Client(self.uri) as c:
                        c.host()
                    return
                except VmferryError:
                    pass
            time.sleep(0.05)
        raise RuntimeError(f"vmferryd {self.name} did not start:\n{self.log.read_text()[-3000:]}")

    def kill(self, sig: int = signal.SIGKILL) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(sig)
            self.proc.wait(timeout=30)
        self.proc = None

    def client(self) -> Client:
        return Client(self.uri)

    def qemu_pids(self) -> list[int]:
        """QEMU processes started by this host (their command line names its state dir)."""
        pids = []
        marker = str(self.state_dir).encode()
        for entry in Path("/proc").iterdir():
            if not entry.name.isdigit():
                continue
            try:
                cmdline = (entry / "cmdline").read_bytes()
                status = (entry / "status").read_text()
            except OSError:
                continue
            if b"qemu-system" in cmdline and marker in cmdline and "State:\tZ" not in status:
                pids.append(int(entry.name))
        return pids

    def cleanup(self) -> None:
        self.kill()
        for pid in self.qemu_pids():
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)


# Spread per process, so parallel test runs rarely race for the same migration ports.
_next_port = 50000 + (os.getpid() % 900) * 16


@contextlib.contextmanager
def hosts(count: int, *, pki_dir: Path | None = None) -> Iterator[list[Host]]:
    """*count* running daemons; everything they started is killed afterwards.

    With *pki_dir* each also listens on mutual TLS on a loopback port.
    """
    global _next_port
    root = Path(tempfile.mkdtemp(prefix="vf", dir="/tmp"))
    made = []
    try:
        for i in range(count):
            host = Host(root / f"h{i}", f"host{i}", _next_port)
            if pki_dir is not None:
                host.pki_dir, host.tls_port = pki_dir, _next_port + 15
            _next_port = _next_port + 16 if _next_port < 65000 else 50000
            host.root.mkdir()
            made.append(host)
            host.start()
        yield made
    finally:
        for host in made:
            host.cleanup()
        shutil.rmtree(root, ignore_errors=True)


def wait_heartbeat(
    client: Client, name: str, *, after: Heartbeat | None = None, timeout: float = 60.0
) -> Heartbeat:
    """The guest's newest heartbeat once it is past *after* (or the first one)."""
    deadline = time.monotonic() + timeout
    text = ""
    while time.monotonic() < deadline:
        text = client.console(name).data
        hb = last_heartbeat(text)
        if hb is not None and (after is None or hb.seq > after.seq or hb.boot != after.boot):
            return hb
        time.sleep(0.2)
    raise AssertionError(f"no heartbeat from {name} within {timeout} s; console:\n{text[-2000:]}")
