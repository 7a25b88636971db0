"""Cluster helpers for tests: a real etcd on loopback, polling, starting a leased domain."""

from __future__ import annotations

import contextlib
import shutil
import socket
import subprocess
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TypeVar

from vmferry.client import Client
from vmferry.errors import ErrorCode, VmferryError

T = TypeVar("T")


def poll(check: Callable[[], T], timeout: float, interval: float = 0.2) -> T:
    """*check*'s first truthy value, or its last value once *timeout* seconds passed."""
    deadline = time.monotonic() + timeout
    while True:
        value = check()
        if value or time.monotonic() > deadline:
            return value
        time.sleep(interval)


def try_create(client: Client, xml: str) -> bool:
    """Create the domain; False while another host holds its lease (or etcd cannot tell)."""
    try:
        client.create(xml)
    except VmferryError as err:
        if err.code not in (ErrorCode.LEASE_HELD, ErrorCode.OPERATION_FAILED):
            raise
        return False
    return True


def lease_refused(action: Callable[[], object]) -> VmferryError:
    """Run *action*, which another host's lease must refuse (``LEASE_HELD``): its error."""
    try:
        action()
    except VmferryError as err:
        assert err.code == ErrorCode.LEASE_HELD, err
        return err
    raise AssertionError("not refused: no other host holds the lease")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@contextlib.contextmanager
def etcd_server() -> Iterator[str]:
    """A one-member etcd on loopback ports; its client URL. Stopped and removed afterwards."""
    data = Path(tempfile.mkdtemp(prefix="vfetcd", dir="/tmp"))
    client, peer = free_port(), free_port()
    url, peer_url = f"http://127.0.0.1:{client}", f"http://127.0.0.1:{peer}"
    argv = ["etcd", "--name", "t", "--data-dir", str(data / "d")]
    argv += ["--listen-client-urls", url, "--advertise-client-urls", url]
    argv += ["--listen-peer-urls", peer_url, "--initial-advertise-peer-urls", peer_url]
    argv += ["--initial-cluster", f"t={peer_url}"]
    with (data / "etcd.log").open("wb") as log:
        proc = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                with socket.create_connection(("127.0.0.1", client), timeout=1):
                    break
            except OSError:
                if time.monotonic() > deadline or proc.poll() is not None:
                    raise RuntimeError((data / "etcd.log").read_text()[-2000:]) from None
                time.sleep(0.1)
        yield url
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        shutil.rmtree(data, ignore_errors=True)
