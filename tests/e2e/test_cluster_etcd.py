"""VM leases in a real etcd (started here on loopback): double start, hand-over, fencing."""

from __future__ import annotations

import asyncio
import contextlib
import shutil
import socket
import threading
import uuid

import pytest

from vmferry.client import AsyncClient
from vmferry.client.migrate import migrate
from vmferry.migration.flags import MigrateFlags
from vmferry.testguest import check_continuity, guest_xml
from vmferry.testing import Host, hosts, wait_heartbeat
from vmferry.testing.cluster import etcd_server, lease_refused, poll, try_create

pytestmark = [
    pytest.mark.qemu,
    pytest.mark.skipif(shutil.which("etcd") is None, reason="etcd is not installed"),
]

TTL = 6


class Link:
    """A TCP forwarder on loopback in front of etcd: one host's link, which a test can cut."""

    def __init__(self, target: int) -> None:
        self.target = target
        self.up = True
        self._server = socket.create_server(("127.0.0.1", 0))
        self.port = int(self._server.getsockname()[1])
        self._conns: list[socket.socket] = []
        self._lock = threading.Lock()
        self._stop = False
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        self._server.settimeout(0.2)
        while not self._stop:
            try:
                conn, _ = self._server.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            if not self.up:
                conn.close()
                continue
            try:
                upstream = socket.create_connection(("127.0.0.1", self.target), timeout=2)
            except OSError:
                conn.close()
                continue
            with self._lock:
                self._conns += [conn, upstream]
            for a, b in ((conn, upstream), (upstream, conn)):
                threading.Thread(target=self._pipe, args=(a, b), daemon=True).start()

    def _pipe(self, src: socket.socket, dst: socket.socket) -> None:
        with contextlib.suppress(OSError):
            while data := src.recv(65536):
                dst.sendall(data)
        for s in (src, dst):
            with contextlib.suppress(OSError):
                s.shutdown(socket.SHUT_RDWR)

    def cut(self) -> None:
        self.up = False
        with self._lock:
            for s in self._conns:
                with contextlib.suppress(OSError):
                    s.shutdown(socket.SHUT_RDWR)
                s.close()
            self._conns.clear()

    def restore(self) -> None:
        self.up = True

    def close(self) -> None:
        self._stop = True
        self.cut()
        self._server.close()


def _config(url: str) -> str:
    return f'[cluster]\netcd = ["{url}"]\netcd_ttl = {TTL}\nheartbeat_interval = 0.5\n'


def _migrate(src: Host, dst: Host, name: str) -> None:
    async def go() -> None:
        async with AsyncClient(src.uri) as s, AsyncClient(dst.uri) as d:
            await migrate(s, d, name, MigrateFlags.LIVE)

    asyncio.run(go())


def test_etcd_leases_on_start_migration_and_cluster_list() -> None:
    with etcd_server() as url, hosts(2, extra_config=_config(url), ready_timeout=60) as (a, b):
        vm_uuid = str(uuid.uuid4())
        before = a.boot_guest("ev", uuid=vm_uuid)
        with a.client() as ca, b.client() as cb:
            xml = guest_xml("ev", uuid=vm_uuid)
            assert "host0" in lease_refused(lambda: cb.create(xml)).message
            info = poll(lambda: (i := cb.cluster()) and len(i.hosts) == 2 and i.vms and i, 30)
            assert info and info.backend == "etcd", cb.cluster()
            (vm,) = info.vms
            assert (vm.uuid, vm.host, vm.name) == (vm_uuid, "host0", "ev")
        _migrate(a, b, "ev")
        with a.client() as ca, b.client() as cb:
            after = wait_heartbeat(cb, "ev", after=before)
            check_continuity(before, after)
            assert "host1" in lease_refused(lambda: ca.create(xml)).message
            cb.destroy("ev")
            ca.create(guest_xml("ev", uuid=vm_uuid))  # free again once stopped
            ca.destroy("ev")


def test_fencing_a_host_cut_off_from_etcd() -> None:
    with etcd_server() as url:
        port = int(url.rsplit(":", 1)[1])
        link = Link(port)
        try:
            cut_host = _config(f"http://127.0.0.1:{link.port}")
            with (
                hosts(1, extra_config=cut_host, ready_timeout=60) as (a,),
                hosts(1, extra_config=_config(url), ready_timeout=60) as (b,),
            ):
                b.name = "host1"
                vm_uuid = str(uuid.uuid4())
                with a.client() as ca:  # persistent: its shut-off state stays to be seen
                    ca.define(guest_xml("fenced", uuid=vm_uuid))
                    ca.start("fenced")
                    wait_heartbeat(ca, "fenced")
                link.cut()
                with a.client() as ca:
                    state = poll(
                        lambda: (s := ca.domstate("fenced")).reason == "lease-lost" and s,
                        TTL * 3,
                    )
                    assert state and state.state == "paused", ca.domstate("fenced")
                # Once a's session expired in etcd, another host may start the guest.
                with b.client() as cb:
                    started = poll(
                        lambda: try_create(cb, guest_xml("fenced", uuid=vm_uuid)), TTL * 3
                    )
                    assert started, "b could not start the fenced guest"
                    wait_heartbeat(cb, "fenced")
                link.restore()
                with a.client() as ca:
                    gone = poll(lambda: ca.domstate("fenced").state == "shutoff", TTL * 4)
                    assert gone, ca.domstate("fenced")
                    assert ca.domstate("fenced").reason == "lease-lost"
                assert a.qemu_pids() == []
                with b.client() as cb:
                    assert cb.domstate("fenced").state == "running"
                    cb.destroy("fenced")
                with a.client() as ca:
                    ca.undefine("fenced")
        finally:
            link.close()
