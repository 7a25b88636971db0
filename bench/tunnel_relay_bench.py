"""
``bench/tunnel_relay_bench.py``: the tunnel's relay alone, on the event loop vs in threads.

No QEMU and no daemon: two processes (the source and the destination side) joined by a
mutual-TLS TCP connection made as the daemons make theirs (``vmferry.pki`` contexts,
asyncio). Each side hands its connection and one end of a socket pair to
``vmferry.migration.tunnel`` as a daemon does after the ``Upgrade``; a thread stands for
each QEMU: it writes MIB MiB into the source's pair (1 MiB blocks of random bytes) and
reads them out of the destination's. The arms alternate, run after run:

* **loop**: ``tunnel._splice_on_loop``, the asyncio relay (sslproto) of before;
* **thread**: ``tunnel.splice``, the connection detached and relayed by threads.

Printed per run: MiB/s (wall, at the source side, until the destination closed) and the CPU
seconds per GiB of each process, the stand-in QEMU thread included (it is the same in both
arms: a socket read or write per MiB).

Usage::

    .venv/bin/python bench/tunnel_relay_bench.py [--rounds 3] [--mib 512]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import resource
import socket
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

from vmferry.migration import tunnel
from vmferry.pki import client_ssl_context, init_pki, server_ssl_context

ARMS = ("loop", "thread")


def _cpu() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


async def _relay(arm: str, mine: socket.socket, peer: asyncio.Transport) -> None:
    if arm == "thread":
        await tunnel.splice(mine, peer)
    else:
        await tunnel._splice_on_loop(mine, peer)


class _Held(asyncio.Protocol):
    def __init__(self, got: asyncio.Queue[asyncio.Transport]) -> None:
        self.got = got

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        transport.pause_reading()  # as a hijacked request comes
        self.got.put_nowait(transport)


def _qemu_pair() -> tuple[socket.socket, socket.socket]:
    qemu, mine = socket.socketpair()
    for s in (qemu, mine):
        tunnel.widen(s)
    return qemu, mine


def _produce(sock: socket.socket, mib: int) -> None:
    block = os.urandom(1 << 20)
    for _ in range(mib):
        sock.sendall(block)
    sock.shutdown(socket.SHUT_WR)
    while sock.recv(1 << 16):
        pass


def _consume(sock: socket.socket, got: list[int]) -> None:
    buf = bytearray(1 << 20)
    total = 0
    while n := sock.recv_into(buf):
        total += n
    got.append(total)


async def _destination(arm: str, pki: Path, port_w: int, result_w: int) -> None:
    loop = asyncio.get_running_loop()
    accepted: asyncio.Queue[asyncio.Transport] = asyncio.Queue()
    server = await loop.create_server(
        lambda: _Held(accepted), "127.0.0.1", 0, ssl=server_ssl_context(pki)
    )
    os.write(port_w, str(server.sockets[0].getsockname()[1]).encode())
    os.close(port_w)
    peer = await accepted.get()
    qemu, mine = _qemu_pair()
    got: list[int] = []
    reader = threading.Thread(target=_consume, args=(qemu, got))
    reader.start()
    started = _cpu()
    await _relay(arm, mine, peer)
    reader.join()
    qemu.close()
    server.close()
    os.write(result_w, f"{got[0]} {_cpu() - started}".encode())
    os.close(result_w)


async def _source(arm: str, pki: Path, port: int, mib: int) -> tuple[float, float]:
    loop = asyncio.get_running_loop()
    made: asyncio.Queue[asyncio.Transport] = asyncio.Queue()
    await loop.create_connection(
        lambda: _Held(made),
        "127.0.0.1",
        port,
        ssl=client_ssl_context(pki),
        server_hostname="127.0.0.1",
    )
    peer = await made.get()
    qemu, mine = _qemu_pair()
    writer = threading.Thread(target=_produce, args=(qemu, mib))
    started, wall = _cpu(), time.perf_counter()
    writer.start()
    await _relay(arm, mine, peer)
    wall = time.perf_counter() - wall
    writer.join()
    qemu.close()
    return wall, _cpu() - started


def run_once(arm: str, pki: Path, mib: int) -> dict[str, float]:
    """One relay of *mib* MiB with *arm*: MiB/s and CPU s/GiB of each side."""
    port_r, port_w = os.pipe()
    result_r, result_w = os.pipe()
    pid = os.fork()
    if pid == 0:  # the destination side
        os.close(port_r)
        os.close(result_r)
        code = 0
        try:
            asyncio.run(_destination(arm, pki, port_w, result_w))
        except BaseException:
            code = 1
        os._exit(code)
    os.close(port_w)
    os.close(result_w)
    port = int(os.read(port_r, 64))
    os.close(port_r)
    wall, src_cpu = asyncio.run(_source(arm, pki, port, mib))
    received, dst_cpu = os.read(result_r, 128).split()
    os.close(result_r)
    _, status = os.waitpid(pid, 0)
    if status != 0 or int(received) != mib << 20:
        raise RuntimeError(f"{arm}: the destination got {int(received)} bytes of {mib << 20}")
    gib = mib / 1024
    return {
        "mib_s": mib / wall,
        "src_cpu_per_gib": src_cpu / gib,
        "dst_cpu_per_gib": float(dst_cpu) / gib,
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--mib", type=int, default=512, help="MiB per relay")
    args = ap.parse_args(argv)
    pki = Path(tempfile.mkdtemp(prefix="vfpki", dir="/tmp"))
    init_pki(pki)
    runs: dict[str, list[dict[str, float]]] = {arm: [] for arm in ARMS}
    for i in range(args.rounds):
        for arm in ARMS if i % 2 == 0 else tuple(reversed(ARMS)):
            fig = run_once(arm, pki, args.mib)
            runs[arm].append(fig)
            src, dst = fig["src_cpu_per_gib"], fig["dst_cpu_per_gib"]
            print(
                f"  {arm:6} {fig['mib_s']:7.1f} MiB/s  CPU s/GiB: source {src:.2f}"
                f"  destination {dst:.2f}",
                flush=True,
            )
    print("\narm     median MiB/s  source CPU s/GiB  destination CPU s/GiB")
    med: dict[str, Any] = {}
    for arm in ARMS:
        med[arm] = {k: statistics.median(r[k] for r in runs[arm]) for k in runs[arm][0]}
        m = med[arm]
        src, dst = m["src_cpu_per_gib"], m["dst_cpu_per_gib"]
        print(f"  {arm:6} {m['mib_s']:10.1f} {src:14.2f} {dst:18.2f}")
    print(f"thread/loop throughput {med['thread']['mib_s'] / med['loop']['mib_s']:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
