"""Real ``vmferryd`` processes, each with its own state dir, unix socket and config."""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from vmferry.client import AsyncClient, Client
from vmferry.errors import VmferryError
from vmferry.testguest import Heartbeat, daemon_paths_toml
from vmferry.testing.heartbeat import boot_guest

#: The daemon's entry point, as ``[python, -m, module]`` (NetnsHost swaps argv[2]).
DAEMON_MODULE = "vmferry.daemon.main"

#: Migration ports of the test hosts: blocks of 16 in [PORT_LO, PORT_HI), below Linux's
#: ephemeral range (32768-60999), so no client socket of the machine can hold one.
PORT_LO, PORT_HI = 20000, 32000
#: Each pytest-xdist worker (gw0, gw1, ...) gets its own window of this many ports.
_WORKER_SPAN = 2000


def _port_window() -> tuple[int, int]:
    worker = os.environ.get("PYTEST_XDIST_WORKER", "")
    if worker.startswith("gw") and worker[2:].isdigit():
        lo = PORT_LO + (int(worker[2:]) % ((PORT_HI - PORT_LO) // _WORKER_SPAN)) * _WORKER_SPAN
        return lo, lo + _WORKER_SPAN
    return PORT_LO, PORT_HI


#: How long a daemon may take to answer after its start: a deadline, not a target. Its imports
#: alone cost ~2 s of CPU: 20-30 s at load 15, over 60 s at load 27 (seen on a shared machine).
READY_TIMEOUT_S = 120.0

_window = _port_window()
# Spread per process, so parallel runs rarely race for the same ports.
_next_port = _window[0] + (os.getpid() * 16) % (_window[1] - _window[0])


def allocate_ports() -> int:
    """The first of 16 migration ports no other host of this process (or xdist worker) uses."""
    global _next_port
    port = _next_port
    _next_port = port + 16 if port + 32 <= _window[1] else _window[0]
    return port


@dataclass
class Host:
    """One ``vmferryd`` under test: it lives in *root* (config, log, pid file)."""

    root: Path
    name: str
    port_min: int
    extra_env: dict[str, str] = field(default_factory=dict)
    tls_port: int = 0  # also listen on tls://127.0.0.1:PORT (needs pki_dir)
    pki_dir: Path | None = None
    proc: subprocess.Popen[bytes] | None = None
    # --insecure: p2p and peer URIs may be unix:// (the daemons talk over unix sockets)
    insecure: bool = True
    extra_config: str = ""  # TOML appended to the [migration] section
    #: Migration ports port_min..port_min+port_span (tests keep +15 for tls_port).
    port_span: int = 14
    #: [jobs] wait_timeout (None: the daemon's default).
    wait_timeout: float | None = 5.0
    log_level: str | None = "debug"
    #: Where the state dir and socket live, when not under root (short sun_path).
    state_at: Path | None = None
    socket_at: Path | None = None
    uuid_value: str | None = None  # default: derived from root
    #: Own session: a Ctrl-C meant for the caller does not reach the daemon.
    new_session: bool = False
    #: argv before the daemon's options (default: python -m vmferry.daemon.main).
    launcher: list[str] | None = None
    #: More [paths] roots besides the test guest's (e.g. a dir of disk images).
    image_roots: list[Path] = field(default_factory=list)

    @property
    def state_dir(self) -> Path:
        return self.state_at or self.root / "state"

    @property
    def socket(self) -> Path:
        return self.socket_at or self.root / "d.sock"

    @property
    def uri(self) -> str:
        return f"unix://{self.socket}"

    @property
    def host_uuid(self) -> str:
        return self.uuid_value or str(uuid.uuid5(uuid.NAMESPACE_DNS, str(self.root)))

    @property
    def tls_uri(self) -> str:
        return f"tls://127.0.0.1:{self.tls_port}"

    @property
    def log(self) -> Path:
        return self.root / "vmferryd.log"

    @property
    def pid_file(self) -> Path:
        return self.root / "vmferryd.pid"

    def config_text(self) -> str:
        """The daemon's TOML config."""
        jobs = f"[jobs]\nwait_timeout = {self.wait_timeout}\n" if self.wait_timeout else ""
        return (
            f'[host]\nhostname = "{self.name}"\nuuid = "{self.host_uuid}"\n'
            + jobs
            + f"[migration]\nport_min = {self.port_min}\n"
            + f"port_max = {self.port_min + self.port_span}\n"
            + self.extra_config  # may go on with [migration] keys
            + daemon_paths_toml(extra_roots=self.image_roots)  # the guest's dir, images
            + (f'[tls]\npki_dir = "{self.pki_dir}"\n' if self.pki_dir else "")
        )

    def write_config(self) -> Path:
        cfg = self.root / "vmferryd.toml"
        cfg.write_text(self.config_text())
        return cfg

    def command(self, cfg: Path) -> list[str]:
        """The daemon's argv (a subclass may wrap it, e.g. in ``ip netns exec``)."""
        return [
            *(self.launcher or [sys.executable, "-m", DAEMON_MODULE]),
            "--state-dir",
            str(self.state_dir),
            "--listen",
            self.uri,
            "--config",
            str(cfg),
            *(["--log-level", self.log_level] if self.log_level else []),
            *(["--listen", self.tls_uri] if self.tls_port else []),
            *(["--insecure"] if self.insecure else []),
        ]

    def spawn(self) -> None:
        """Start the daemon and return at once (see :meth:`wait_ready`)."""
        self.root.mkdir(parents=True, exist_ok=True)
        cfg = self.write_config()
        with self.log.open("ab") as log:
            self.proc = subprocess.Popen(
                self.command(cfg),
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                env={**os.environ, **self.extra_env},
                start_new_session=self.new_session,
            )
        self.pid_file.write_text(f"{self.proc.pid}\n")

    def _not_running(self) -> str | None:
        if self.proc is None or self.proc.poll() is not None:
            return f"vmferryd {self.name} exited:\n{self.log_tail()}"
        return None

    def wait_ready(self, timeout: float = READY_TIMEOUT_S) -> None:
        """Wait until the daemon answers on its socket (RuntimeError if it does not)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if (gone := self._not_running()) is not None:
                raise RuntimeError(gone)
            if self.socket.exists():
                try:
                    with Client(self.uri) as c:
                        c.host()
                    return
                except VmferryError:
                    pass
            time.sleep(0.05)
        raise RuntimeError(f"vmferryd {self.name} did not start:\n{self.log_tail()}")

    async def wait_ready_async(self, timeout: float = READY_TIMEOUT_S) -> None:
        """:meth:`wait_ready`, without blocking the event loop."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if (gone := self._not_running()) is not None:
                raise RuntimeError(gone)
            if self.socket.exists():
                with contextlib.suppress(VmferryError):
                    async with AsyncClient(self.uri, timeout=2.0) as client:
                        await client.host()
                        return
            await asyncio.sleep(0.05)
        raise RuntimeError(f"vmferryd {self.name} did not start:\n{self.log_tail()}")

    def start(self, timeout: float = READY_TIMEOUT_S) -> None:
        """Start the daemon and wait until it answers."""
        self.spawn()
        self.wait_ready(timeout)

    def kill(self, sig: int = signal.SIGKILL, timeout: float = 30.0) -> None:
        """Send *sig* and reap the daemon (SIGKILL if it outlives *timeout*)."""
        proc, self.proc = self.proc, None
        if proc is None:
            return
        if proc.poll() is None:
            proc.send_signal(sig)
            try:
                proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        self.pid_file.unlink(missing_ok=True)

    def client(self) -> Client:
        return Client(self.uri)

    def boot_guest(self, name: str, **xml: Any) -> Heartbeat:
        """Create the (transient) test guest *name* here; its first heartbeat.

        *xml* goes to :func:`vmferry.testguest.guest_xml` (memory_mib, hb_ms, ...).
        """
        with self.client() as c:
            return boot_guest(c, name, **xml)

    def qemu_pids(self) -> list[int]:
        """QEMU processes started by this host (their command line names its state dir)."""
        return qemu_pids(self.state_dir)

    def cleanup(self) -> None:
        """Kill the daemon and every QEMU it started (a daemon leaves its guests running)."""
        self.kill()
        kill_qemu(self.state_dir)

    def log_tail(self, chars: int = 3000) -> str:
        try:
            return self.log.read_text(errors="replace")[-chars:]
        except OSError:
            return "(no log)"


def qemu_pids(marker_dir: Path) -> list[int]:
    """Live QEMU processes whose command line names *marker_dir* (their sockets live there)."""
    marker = str(marker_dir).encode()
    pids = []
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


def kill_qemu(marker_dir: Path) -> None:
    """SIGKILL every QEMU whose command line names *marker_dir*."""
    for pid in qemu_pids(marker_dir):
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)


@contextlib.contextmanager
def hosts(
    count: int,
    *,
    pki_dir: Path | None = None,
    host_type: type[Host] = Host,
    envs: list[dict[str, str]] | None = None,
    setup: Callable[[list[Host]], None] | None = None,
    image_roots: list[Path] | None = None,
    extra_config: str = "",
    ready_timeout: float = READY_TIMEOUT_S,
) -> Iterator[list[Host]]:
    """*count* running daemons in a fresh /tmp dir; everything they started is killed afterwards.

    With *pki_dir* each also listens on mutual TLS on a loopback port; *envs*
    gives daemon i extra environment (e.g. failpoints); *image_roots* are
    further [paths] roots of every daemon (see
    :func:`vmferry.testing.disk.make_image_dir`); *setup* may change the hosts
    (their config) before they start; *extra_config* (TOML, e.g. a ``[cluster]``
    section) goes into every host's config. The daemons start in parallel.
    """
    # Short: unix socket paths are limited to 107 bytes.
    root = Path(tempfile.mkdtemp(prefix="vf", dir="/tmp"))
    made: list[Host] = []
    try:
        for i in range(count):
            port = allocate_ports()
            env = envs[i] if envs else {}
            host = host_type(root / f"h{i}", f"host{i}", port, extra_env=dict(env))
            host.image_roots = list(image_roots or [])
            host.extra_config = extra_config
            if pki_dir is not None:
                host.pki_dir, host.tls_port = pki_dir, port + 15
            host.root.mkdir()
            made.append(host)
        if setup is not None:
            setup(made)
        for host in made:
            host.spawn()
        for host in made:
            # started together on a machine shared with other QEMU tests: a slow start is
            # not a failure (one daemon alone takes ~5 s to import and listen under load 15)
            host.wait_ready(ready_timeout)
        yield made
    finally:
        for host in made:
            host.cleanup()
        shutil.rmtree(root, ignore_errors=True)
