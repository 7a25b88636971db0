"""Fencing with 3 hosts and a 3-member etcd cluster in network namespaces (issue 9 §2).

Each host runs one etcd member and one vmferryd (talking to its own member) in
its namespace. Cutting a host's link leaves its member without quorum: its
session cannot be kept alive, so it pauses its guest (``lease-lost``) before the
session expires; another host then starts the guest; when the link is back the
first host stops its copy. Needs root; long (about a minute), so not in ``make test``.
"""

from __future__ import annotations

import contextlib
import shutil
import subprocess
import tempfile
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.netns import PORT_MIN, TLS_PORT, NetnsCluster, NetnsHost, available, netns_cluster
from vmferry.errors import ErrorCode, VmferryError
from vmferry.pki import init_pki
from vmferry.testguest import guest_xml
from vmferry.testing import wait_heartbeat
from vmferry.testing.cluster import poll, try_create

pytestmark = [
    pytest.mark.qemu,
    pytest.mark.skipif(bool(available()), reason=available() or "namespaces available"),
    pytest.mark.skipif(shutil.which("etcd") is None, reason="etcd is not installed"),
]

TTL = 6


@contextlib.contextmanager
def etcd_members(net: NetnsCluster, root: Path) -> Iterator[list[str]]:
    """One etcd member per namespace, one cluster; their client URLs."""
    peers = ",".join(f"m{i}=http://{a}:2380" for i, a in enumerate(net.addr))
    procs = []
    try:
        for i, addr in enumerate(net.addr):
            log = (root / f"etcd{i}.log").open("wb")
            procs.append(
                subprocess.Popen(
                    [
                        *net.prefix(i),
                        "etcd",
                        "--name",
                        f"m{i}",
                        "--data-dir",
                        str(root / f"etcd{i}"),
                        "--listen-client-urls",
                        f"http://{addr}:2379",
                        "--advertise-client-urls",
                        f"http://{addr}:2379",
                        "--listen-peer-urls",
                        f"http://{addr}:2380",
                        "--initial-advertise-peer-urls",
                        f"http://{addr}:2380",
                        "--initial-cluster",
                        peers,
                        "--initial-cluster-state",
                        "new",
                    ],
                    stdout=log,
                    stderr=subprocess.STDOUT,
                )
            )
        urls = [f"http://{a}:2379" for a in net.addr]
        deadline = time.monotonic() + 60
        while True:
            check = subprocess.run(
                [*net.prefix(0), "etcdctl", "--endpoints", ",".join(urls), "endpoint", "health"],
                capture_output=True, text=True, timeout=30,
            )  # fmt: skip
            if check.returncode == 0:
                break
            if time.monotonic() > deadline:
                raise RuntimeError(f"etcd cluster not healthy: {check.stdout}{check.stderr}")
            time.sleep(0.5)
        yield urls
    finally:
        for proc in procs:
            proc.terminate()
        for proc in procs:
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


@contextlib.contextmanager
def cluster_hosts(net: NetnsCluster, root: Path, urls: list[str]) -> Iterator[list[NetnsHost]]:
    pki = root / "pki"
    init_pki(pki, server_names=list(net.addr))
    made: list[NetnsHost] = []
    try:
        for i, addr in enumerate(net.addr):
            host = NetnsHost(
                root / f"h{i}",
                f"host{i}",
                PORT_MIN,
                tls_port=TLS_PORT,
                pki_dir=pki,
                netns=net.ns[i],
                address=addr,
            )
            host.extra_config = (
                f'[cluster]\netcd = ["{urls[i]}"]\netcd_ttl = {TTL}\nheartbeat_interval = 1.0\n'
            )
            host.root.mkdir()
            made.append(host)
        for host in made:
            host.start(timeout=60)
        yield made
    finally:
        for host in made:
            host.cleanup()


def test_a_cut_off_host_pauses_its_guest_and_stops_it_once_another_host_took_it() -> None:
    root = Path(tempfile.mkdtemp(prefix="vffence", dir="/tmp"))
    try:
        with netns_cluster(3) as net, etcd_members(net, root) as urls:
            with cluster_hosts(net, root, urls) as (a, b, c):
                vm_uuid = str(uuid.uuid4())
                xml = guest_xml("fenced", uuid=vm_uuid)
                with a.client() as ca:
                    ca.define(xml)
                    ca.start("fenced")
                    wait_heartbeat(ca, "fenced")
                with b.client() as cb:
                    listed = poll(lambda: len(cb.cluster().hosts) == 3, 30)
                    assert listed, cb.cluster()
                    with pytest.raises(VmferryError) as refused:
                        cb.create(xml)
                    assert refused.value.code == ErrorCode.LEASE_HELD
                    assert "host0" in refused.value.message
                net.link_down(0)
                with a.client() as ca:
                    paused = poll(lambda: ca.domstate("fenced").reason == "lease-lost", 30)
                    assert paused, ca.domstate("fenced")
                    assert ca.domstate("fenced").state == "paused"
                with b.client() as cb:
                    started = poll(lambda: try_create(cb, xml), 60)
                    assert started, "host1 could not start the guest host0 was fenced from"
                    wait_heartbeat(cb, "fenced")
                net.link_up(0)
                with a.client() as ca:
                    stopped = poll(lambda: ca.domstate("fenced").state == "shutoff", 60)
                    assert stopped, ca.domstate("fenced")
                    assert ca.domstate("fenced").reason == "lease-lost"
                assert a.qemu_pids() == []
                with b.client() as cb:
                    assert cb.domstate("fenced").state == "running"
                with c.client() as cc:
                    info = cc.cluster()
                    assert {v.host for v in info.vms if v.uuid == vm_uuid} == {"host1"}
    finally:
        shutil.rmtree(root, ignore_errors=True)
