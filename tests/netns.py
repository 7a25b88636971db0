"""Two test hosts in network namespaces, joined by a veth pair whose link can be cut.

Each namespace runs one vmferryd. The test client in the root namespace reaches
it over its unix socket (a path in the shared filesystem); the daemons reach
each other over mutual TLS on their veth addresses, and the migration stream
goes there too (``[migration] listen_address``), so ``link_down()`` cuts every
path between the hosts and nothing else::

    with netns_pair() as net, netns_hosts(net) as (a, b):
        net.link_down()
        ...
        net.link_up()

Needs root and ``ip`` (iproute2). Namespaces, veths, daemons and QEMUs are
removed on the way out, also on failure.
"""

from __future__ import annotations

import contextlib
import ipaddress
import os
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from itertools import count
from pathlib import Path

from vmferry.pki import init_pki
from vmferry.testguest import daemon_paths_toml
from vmferry.testing import Host

#: Where the migration ports of every namespaced daemon lie (namespaces do not share ports).
PORT_MIN, PORT_MAX = 49152, 49167
#: The TLS port each daemon listens on at its veth address.
TLS_PORT = 16514

_serial = count()


def available() -> str:
    """Why namespaced hosts cannot run here ("" when they can)."""
    if os.geteuid() != 0:
        return "network namespaces need root"
    if shutil.which("ip") is None:
        return "iproute2 (ip) is not installed"
    return ""


def _ip(*args: str) -> None:
    subprocess.run(["ip", *args], check=True, capture_output=True, timeout=30)


@dataclass
class NetnsPair:
    """Namespaces ``a`` and ``b`` with veth ends ``veth_a``/``veth_b`` at ``addr_a``/``addr_b``."""

    ns_a: str
    ns_b: str
    veth_a: str
    veth_b: str
    addr_a: str
    addr_b: str

    def ns(self, side: str) -> str:
        return self.ns_a if side == "a" else self.ns_b

    def addr(self, side: str) -> str:
        return self.addr_a if side == "a" else self.addr_b

    def prefix(self, side: str) -> list[str]:
        """Run a command inside namespace *side*."""
        return ["ip", "netns", "exec", self.ns(side)]

    def link_down(self) -> None:
        """Cut the link (either end down takes the carrier away from both)."""
        _ip("-n", self.ns_a, "link", "set", self.veth_a, "down")

    def link_up(self) -> None:
        _ip("-n", self.ns_a, "link", "set", self.veth_a, "up")

    def listening_ports(self, side: str) -> set[int]:
        """TCP ports something listens on inside namespace *side*."""
        out = subprocess.run(
            [*self.prefix(side), "cat", "/proc/net/tcp", "/proc/net/tcp6"],
            check=True,
            capture_output=True,
            text=True,
            timeout=30,
        ).stdout
        ports = set()
        for line in out.splitlines():
            fields = line.split()
            # sl local_address rem_address st ...; st 0A is LISTEN
            if len(fields) > 3 and fields[3] == "0A" and ":" in fields[1]:
                ports.add(int(fields[1].rsplit(":", 1)[1], 16))
        return ports


def remove_stale() -> list[str]:
    """Delete the namespaces of test runs whose process is gone (killed before cleaning up)."""
    out = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True, timeout=30)
    removed = []
    for line in out.stdout.splitlines():
        name = line.split()[0] if line.split() else ""
        parts = name.split("-")
        if len(parts) == 4 and parts[0] == "vf" and parts[1].isdigit():
            if not Path(f"/proc/{parts[1]}").exists():
                subprocess.run(["ip", "netns", "del", name], capture_output=True, timeout=30)
                removed.append(name)
    return removed


@contextlib.contextmanager
def netns_pair() -> Iterator[NetnsPair]:
    """Two fresh namespaces joined by a veth pair on a private /30, loopback up in each."""
    why = available()
    if why:
        raise RuntimeError(why)
    remove_stale()
    n = next(_serial)
    tag = f"{os.getpid()}-{n}"
    # 10.254.X.Y/30: X and the /30 inside it spread by pid, so concurrent runs look distinct in logs
    third, quad = (os.getpid() // 64) % 250 + 2, ((os.getpid() + n) % 64) * 4
    pair = NetnsPair(
        ns_a=f"vf-{tag}-a",
        ns_b=f"vf-{tag}-b",
        # interface names are limited to 15 bytes
        veth_a=f"vf{os.getpid() % 10**7}{n % 10}a"[:15],
        veth_b=f"vf{os.getpid() % 10**7}{n % 10}b"[:15],
        addr_a=f"10.254.{third}.{quad + 1}",
        addr_b=f"10.254.{third}.{quad + 2}",
    )
    made: list[str] = []
    try:
        for ns in (pair.ns_a, pair.ns_b):
            _ip("netns", "add", ns)
            made.append(ns)
        _ip("link", "add", pair.veth_a, "type", "veth", "peer", "name", pair.veth_b)
        for ns, veth, addr in (
            (pair.ns_a, pair.veth_a, pair.addr_a),
            (pair.ns_b, pair.veth_b, pair.addr_b),
        ):
            _ip("link", "set", veth, "netns", ns)
            _ip("-n", ns, "addr", "add", f"{addr}/30", "dev", veth)
            _ip("-n", ns, "link", "set", veth, "up")
            _ip("-n", ns, "link", "set", "lo", "up")
        yield pair
    finally:
        with contextlib.suppress(subprocess.SubprocessError):
            # deleting a namespace destroys its veth end, and so the pair
            subprocess.run(["ip", "link", "del", pair.veth_a], capture_output=True, timeout=30)
        for ns in made:
            subprocess.run(["ip", "netns", "del", ns], capture_output=True, timeout=30)


@dataclass
class NetnsHost(Host):
    """A vmferryd inside a namespace, listening on unix and on ``tls://<veth address>``."""

    netns: str = ""
    address: str = ""
    module: str = "vmferry.daemon.main"  # the daemon's entry point (tests may wrap it)

    @property
    def tls_uri(self) -> str:
        return f"tls://{self.address}:{self.tls_port}"

    @property
    def subnet(self) -> str:
        return str(ipaddress.ip_network(f"{self.address}/30", strict=False))

    def write_config(self) -> Path:
        cfg = self.root / "vmferryd.toml"
        cfg.write_text(
            f'[host]\nhostname = "{self.name}"\nuuid = "{self.host_uuid}"\n'
            "[jobs]\nwait_timeout = 5.0\n"
            f"[migration]\nport_min = {PORT_MIN}\nport_max = {PORT_MAX}\n"
            f'listen_address = "{self.address}"\n'
            # the stream and the p2p calls go to the peer on the veth /30
            f'allowed_networks = ["127.0.0.0/8", "::1/128", "{self.subnet}"]\n'
            # the p2p source gives up on a silent destination after ~3 s
            "[keepalive]\ninterval = 1.0\ncount = 3\n"
            f'[tls]\npki_dir = "{self.pki_dir}"\n'
            + daemon_paths_toml()
            + self.extra_config  # e.g. a [cluster] section
        )
        return cfg

    def command(self, cfg: Path) -> list[str]:
        argv = super().command(cfg)
        argv[2] = self.module  # [python, -m, module, ...]
        return ["ip", "netns", "exec", self.netns, *argv]


@contextlib.contextmanager
def netns_hosts(
    net: NetnsPair, *, root: Path | None = None, module: str = "vmferry.daemon.main"
) -> Iterator[tuple[NetnsHost, NetnsHost]]:
    """One daemon per namespace of *net* (not started), sharing a PKI for their veth addresses.

    Everything they started is killed on the way out; *root* (made if None) is removed.
    """
    root = root or Path(tempfile.mkdtemp(prefix="vfn", dir="/tmp"))
    pki = root / "pki"
    init_pki(pki, server_names=[net.addr_a, net.addr_b])
    made: list[NetnsHost] = []
    try:
        for side, name in (("a", "hostA"), ("b", "hostB")):
            host = NetnsHost(
                root / side,
                name,
                PORT_MIN,
                tls_port=TLS_PORT,
                pki_dir=pki,
                netns=net.ns(side),
                address=net.addr(side),
                module=module,
            )
            host.root.mkdir()
            made.append(host)
        yield made[0], made[1]
    finally:
        for host in made:
            host.cleanup()
        shutil.rmtree(root, ignore_errors=True)


@dataclass
class NetnsCluster:
    """Namespaces ``ns[i]`` on one bridged /24 (``addr[i]``); each host's link can be cut."""

    switch: str
    bridge: str
    ns: list[str]
    veth_host: list[str]
    veth_switch: list[str]
    addr: list[str]

    def prefix(self, i: int) -> list[str]:
        return ["ip", "netns", "exec", self.ns[i]]

    def link_down(self, i: int) -> None:
        """Cut host *i* off from every other (its port on the switch goes down)."""
        _ip("-n", self.switch, "link", "set", self.veth_switch[i], "down")

    def link_up(self, i: int) -> None:
        _ip("-n", self.switch, "link", "set", self.veth_switch[i], "up")


@contextlib.contextmanager
def netns_cluster(count: int) -> Iterator[NetnsCluster]:
    """*count* namespaces joined by a bridge in a switch namespace; removed on the way out."""
    why = available()
    if why:
        raise RuntimeError(why)
    remove_stale()
    n = next(_serial)
    tag = f"{os.getpid()}-{n}"
    third = (os.getpid() // 64) % 250 + 2
    short = f"vf{os.getpid() % 10**6}{n % 10}"
    net = NetnsCluster(
        switch=f"vf-{tag}-s",
        bridge="br0",
        ns=[f"vf-{tag}-{i}" for i in range(count)],
        veth_host=[f"{short}h{i}"[:15] for i in range(count)],
        veth_switch=[f"{short}s{i}"[:15] for i in range(count)],
        addr=[f"10.253.{third}.{10 + i}" for i in range(count)],
    )
    made: list[str] = []
    try:
        for ns in (net.switch, *net.ns):
            _ip("netns", "add", ns)
            made.append(ns)
            _ip("-n", ns, "link", "set", "lo", "up")
        _ip("-n", net.switch, "link", "add", net.bridge, "type", "bridge")
        _ip("-n", net.switch, "link", "set", net.bridge, "up")
        for i in range(count):
            _ip("link", "add", net.veth_host[i], "type", "veth", "peer", "name", net.veth_switch[i])
            _ip("link", "set", net.veth_host[i], "netns", net.ns[i])
            _ip("link", "set", net.veth_switch[i], "netns", net.switch)
            _ip("-n", net.switch, "link", "set", net.veth_switch[i], "master", net.bridge)
            _ip("-n", net.switch, "link", "set", net.veth_switch[i], "up")
            _ip("-n", net.ns[i], "addr", "add", f"{net.addr[i]}/24", "dev", net.veth_host[i])
            _ip("-n", net.ns[i], "link", "set", net.veth_host[i], "up")
        yield net
    finally:
        for ns in made:  # deleting a namespace destroys its veth ends, and so the pairs
            subprocess.run(["ip", "netns", "del", ns], capture_output=True, timeout=30)
