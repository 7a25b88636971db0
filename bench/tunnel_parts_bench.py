"""
``bench/tunnel_parts_bench.py``: what each part of the tunnel's relay costs, in CPU ms per MiB.

A tunnelled hop's relay (``vmferry.migration.tunnel``) does, for every byte, on the source
daemon: read QEMU's socket pair, encrypt (the TLS session taken from asyncio: an
``ssl.SSLObject`` over two memory BIOs, ``vmferry.migration.wire``), send on TCP; on the
destination daemon: receive from TCP, decrypt, write QEMU's socket pair. This bench measures
each of those parts alone, in one process, one thread's CPU time (``RUSAGE_THREAD``) per MiB,
with the relay's own sizes (:data:`~vmferry.migration.wire.CHUNK` reads and writes, socket
buffers of :data:`~vmferry.migration.tunnel.WINDOW`), so their sum can be set beside the
daemons' CPU per MiB that ``bench/stream_bench.py`` prints for a tunnelled hop: what the sum
does not explain is the relay's own overhead (threads, locks, Python calls, cache misses).

* **unix send / recv**: a socket pair of the relay's kind, written and read in CHUNK pieces
  (the QEMU side writes and reads 32 KiB pieces instead: ``--qemu-side``).
* **tcp send / recv**: a loopback TCP connection, the same sizes (loopback: the sender's CPU
  also runs the receiving side's protocol work).
* **tls encrypt / decrypt**: the memory-BIO path the relay runs (``SSLObject.write`` then
  ``MemoryBIO.read`` per chunk; ``MemoryBIO.write`` then ``SSLObject.read`` per record), with
  the daemons' own mutual-TLS contexts (``vmferry.pki``), nothing else.
* **aes-gcm**: the cipher alone on the same chunks (``cryptography``'s AESGCM, one call per
  16 KiB record as TLS 1.3 makes them): the floor no TLS implementation goes below.

``--aes128``: the TLS arms run in a child process whose OpenSSL configuration
(``OPENSSL_CONF``, a temporary file) makes every context offer only TLS_AES_128_GCM_SHA256:
a measurement of what that suite would save, not something the daemons do (Python 3.11's
``ssl`` cannot choose TLS 1.3 suites per context; docs/migration-tls.md).

Usage::

    .venv/bin/python bench/tunnel_parts_bench.py [--mib 256] [--rounds 3] [--aes128]
"""

from __future__ import annotations

import argparse
import os
import resource
import socket
import ssl
import statistics
import subprocess
import sys
import tempfile
import threading
from collections.abc import Callable
from pathlib import Path
from typing import cast

from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from vmferry.migration import tunnel
from vmferry.migration.wire import CHUNK
from vmferry.pki import client_ssl_context, init_pki, server_ssl_context

RECORD = 16 << 10  # TLS's largest record of plaintext
QEMU_IO = 32 << 10  # what QEMU reads or writes at a time (its QEMUFile buffer)
AES128_CONF = """openssl_conf = init
[init]
ssl_conf = ssl
[ssl]
system_default = defaults
[defaults]
Ciphersuites = TLS_AES_128_GCM_SHA256
"""


def _cpu() -> float:
    r = resource.getrusage(resource.RUSAGE_THREAD)
    return r.ru_utime + r.ru_stime


def _stream(kind: str, mib: int, write: int, read: int) -> tuple[float, float]:
    """CPU ms per MiB of the writing and the reading thread over a *kind* connection."""
    if kind == "tcp":
        with socket.create_server(("127.0.0.1", 0)) as listener:
            a = socket.create_connection(listener.getsockname())
            b, _ = listener.accept()
    else:
        a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    for s in (a, b):
        tunnel.widen(s)
    got: list[float] = []

    def reader() -> None:
        buf = memoryview(bytearray(read))
        started = _cpu()
        while b.recv_into(buf):
            pass
        got.append(_cpu() - started)

    thread = threading.Thread(target=reader)
    thread.start()
    data = memoryview(os.urandom(write))
    started = _cpu()
    for _ in range((mib << 20) // write):
        a.sendall(data)
    sent = _cpu() - started
    a.shutdown(socket.SHUT_WR)
    thread.join()
    a.close()
    b.close()
    return sent * 1000 / mib, got[0] * 1000 / mib


def _tls(mib: int) -> tuple[float, float, str]:
    """CPU ms per MiB to encrypt and to decrypt through memory BIOs, and the suite."""
    pki = Path(tempfile.mkdtemp(prefix="vfpki", dir="/tmp"))
    init_pki(pki)
    ci, co, si, so = (ssl.MemoryBIO() for _ in range(4))
    client = client_ssl_context(pki).wrap_bio(ci, co, server_hostname="127.0.0.1")
    server = server_ssl_context(pki).wrap_bio(si, so, server_side=True)
    for _ in range(10):  # the handshake, by hand
        for end in (client, server):
            try:
                end.do_handshake()
            except ssl.SSLWantReadError:
                pass
        si.write(co.read())
        ci.write(so.read())
    data = memoryview(os.urandom(CHUNK))
    buf = memoryview(bytearray(CHUNK + (64 << 10)))
    enc = dec = 0.0
    for _ in range((mib << 20) // CHUNK):
        started = _cpu()
        client.write(data)
        out = co.read()
        enc += _cpu() - started
        started = _cpu()
        si.write(out)
        got = 0
        while True:
            try:
                got += cast(int, server.read(len(buf) - got, buf[got:]))  # into buf: a count
            except ssl.SSLWantReadError:
                break
        dec += _cpu() - started
        assert got == CHUNK
    cipher = client.cipher()
    return enc * 1000 / mib, dec * 1000 / mib, cipher[0] if cipher else "?"


def _aes(mib: int, bits: int) -> float:
    """CPU ms per MiB of AES-GCM alone, one call per TLS record."""
    aead = AESGCM(AESGCM.generate_key(bit_length=bits))
    record = os.urandom(RECORD)
    nonce = os.urandom(12)
    started = _cpu()
    for _ in range((mib << 20) // RECORD):
        aead.encrypt(nonce, record, None)
    return (_cpu() - started) * 1000 / mib


def _tls_child(mib: int) -> tuple[float, float, str]:
    """:func:`_tls` in a child whose OpenSSL offers only AES-128-GCM (``--aes128``)."""
    with tempfile.NamedTemporaryFile("w", suffix=".cnf") as conf:
        conf.write(AES128_CONF)
        conf.flush()
        out = subprocess.run(
            [sys.executable, __file__, "--tls-only", "--mib", str(mib)],
            env={**os.environ, "OPENSSL_CONF": conf.name},
            check=True,
            capture_output=True,
            text=True,
        ).stdout.split()
    return float(out[0]), float(out[1]), out[2]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--mib", type=int, default=256, help="MiB through each part per round")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--aes128", action="store_true", help="also TLS with AES-128-GCM (child)")
    ap.add_argument("--tls-only", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.tls_only:
        enc, dec, suite = _tls(args.mib)
        print(enc, dec, suite)
        return 0
    parts: dict[str, Callable[[], tuple[float, ...]]] = {
        "unix (relay sizes)": lambda: _stream("unix", args.mib, CHUNK, CHUNK),
        "unix (QEMU writes 32K)": lambda: _stream("unix", args.mib, QEMU_IO, CHUNK),
        "unix (QEMU reads 32K)": lambda: _stream("unix", args.mib, CHUNK, QEMU_IO),
        "tcp": lambda: _stream("tcp", args.mib, CHUNK, CHUNK),
        "tls (this process)": lambda: _tls(args.mib)[:2],
        "aes-gcm 256 / 128": lambda: (_aes(args.mib, 256), _aes(args.mib, 128)),
    }
    if args.aes128:
        parts["tls (AES-128-GCM only)"] = lambda: _tls_child(args.mib)[:2]
    runs: dict[str, list[tuple[float, ...]]] = {name: [] for name in parts}
    for _ in range(args.rounds):
        for name, part in parts.items():
            runs[name].append(part())
    print(f"CPU ms per MiB, median of {args.rounds} rounds of {args.mib} MiB")
    print(f"  {'part':26} {'send/encrypt':>12} {'recv/decrypt':>12}")
    for name, figs in runs.items():
        a, b = (statistics.median(f[i] for f in figs) for i in (0, 1))
        print(f"  {name:26} {a:12.3f} {b:12.3f}")
    print(f"  TLS suite negotiated by the daemons' contexts: {_tls(16)[2]}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
