"""QEMU's TLS credentials (``tls-creds-x509`` objects) from the vmferry PKI.

Used wherever QEMU itself speaks TLS: the migration stream (migration
parameter ``tls-creds``) and NBD (``nbd-server-start`` / ``blockdev-add``
``tls-creds``). QEMU runs unprivileged and cannot read the daemon's PKI
directory, nor traverse the state directory (mode 0700, root). So for each
object the daemon makes a private copy of just the files this endpoint needs
(``STATE/qemu-tls/ID``, mode 0700, owned by the QEMU user), opens it, passes
QEMU the directory descriptor (``add-fd``) and names the credentials'
``dir`` ``/proc/self/fd/N``: QEMU reaches the copy through its own
descriptor. QEMU reads every file when the object is created, so the copy and
the descriptor are removed right after ``object-add``, whatever its outcome:
no key stays on disk beyond that moment.

A server endpoint (the destination of a stream) presents ``server.pem``; a
client endpoint (the source) ``client.pem``; both verify the peer against the
cluster CA (``verify-peer``), so each side proves it belongs to the cluster.

A server endpoint also gets ``dh-params.pem``, the RFC 7919 ``ffdhe3072``
group (finite-field Diffie-Hellman for a TLS 1.2 DHE handshake; TLS 1.3 uses
its own named groups): without that file QEMU *generates* 2048-bit parameters
each time the object is created, 0.5-1.2 s of CPU in the destination's main
loop on every encrypted migration (docs/migration-tls.md). A standard group is
at least as strong as a freshly generated one and loads at once.

Every object gets the gnutls ``priority`` :data:`PRIORITY`: QEMU's own default
(``NORMAL``) with the same ciphers, AES-128-GCM moved first. Both QEMUs of a
stream are vmferry's, so a TLS 1.3 stream negotiates TLS_AES_128_GCM_SHA256
(the suite every TLS 1.3 implementation must have, RFC 8446 9.1) instead of
AES-256-GCM: with AES-NI it costs about 30 % less CPU per byte, and on an
encrypted stream QEMU's CPU is what bounds the throughput (docs/migration-tls.md).
Nothing is added or removed from ``NORMAL``: versions, key exchanges, MACs and
the cipher set stay as they are; only the order of preference changes.

Usage (migration or NBD alike)::

    obj = await add_x509(mon, pki_dir, base, "vmferry-tls-mig", "server", user)
    ... migrate-set-parameters {"tls-creds": obj} / nbd-server-start {"tls-creds": obj}
    await remove_x509(mon, obj)
"""

from __future__ import annotations

import contextlib
import os
import shutil
from pathlib import Path
from typing import Literal

from vmferry.errors import ErrorCode, VmferryError
from vmferry.qemu.confine import QemuUser
from vmferry.qemu.monitor import Monitor

Endpoint = Literal["server", "client"]

#: QEMU's file names in a ``tls-creds-x509`` directory, by the PKI file they copy.
_FILES: dict[Endpoint, tuple[tuple[str, str], ...]] = {
    "server": (
        ("ca.pem", "ca-cert.pem"),
        ("server.pem", "server-cert.pem"),
        ("server-key.pem", "server-key.pem"),
    ),
    "client": (
        ("ca.pem", "ca-cert.pem"),
        ("client.pem", "client-cert.pem"),
        ("client-key.pem", "client-key.pem"),
    ),
}
#: RFC 7919 ffdhe3072 (PKCS #3), as ``openssl genpkey -genparam -algorithm DH
#: -pkeyopt dh_param:ffdhe3072`` writes it; QEMU's ``dh-params.pem`` of a server endpoint.
FFDHE3072_PEM = b"""\
-----BEGIN DH PARAMETERS-----
MIIBiAKCAYEA//////////+t+FRYortKmq/cViAnPTzx2LnFg84tNpWp4TZBFGQz
+8yTnc4kmz75fS/jY2MMddj2gbICrsRhetPfHtXV/WVhJDP1H18GbtCFY2VVPe0a
87VXE15/V8k1mE8McODmi3fipona8+/och3xWKE2rec1MKzKT0g6eXq8CrGCsyT7
YdEIqUuyyOP7uWrat2DX9GgdT0Kj3jlN9K5W7edjcrsZCwenyO4KbXCeAvzhzffi
7MA0BM0oNC9hkXL+nOmFg/+OTxIy7vKBg8P+OxtMb61zO7X8vC7CIAXFjvGDfRaD
ssbzSibBsu/6iGtCOGEfz9zeNVs7ZRkDW7w09N75nAI4YbRvydbmyQd62R0mkff3
7lmMsPrBhtkcrv4TCYUTknC0EwyTvEN5RPT9RFLi103TZPLiHnH1S/9croKrnJ32
nuhtK8UiNjoNq8Uhl5sN6todv5pC1cRITgq80Gv6U93vPBsg7j/VnXwl5B0rZsYu
N///////////AgEC
-----END DH PARAMETERS-----
"""
DH_PARAMS = "dh-params.pem"
#: Below the state directory: one private directory per credentials object being created.
STAGING_DIR = "qemu-tls"


def has_pki(pki_dir: Path | None, endpoint: Endpoint | None = None) -> bool:
    """Whether *pki_dir* holds what an endpoint needs (both endpoints if None)."""
    if pki_dir is None:
        return False
    needed = {src for ep, files in _FILES.items() if endpoint in (None, ep) for src, _ in files}
    return all((pki_dir / name).is_file() for name in needed)


def stage(
    pki_dir: Path, base: Path, obj_id: str, endpoint: Endpoint, user: QemuUser | None
) -> Path:
    """Copy this endpoint's files into ``base/obj_id`` (0700, files 0400, owned by *user*).

    :raise VmferryError: ``OPERATION_FAILED`` when a file is missing or cannot be copied.
    """
    base.mkdir(mode=0o700, parents=True, exist_ok=True)
    target = base / obj_id
    shutil.rmtree(target, ignore_errors=True)  # a leftover of a crash
    uid, gid = (user.uid, user.gid) if user is not None else (-1, -1)
    try:
        target.mkdir(mode=0o700)
        files = [(dst, (pki_dir / src).read_bytes()) for src, dst in _FILES[endpoint]]
        if endpoint == "server":
            files.append((DH_PARAMS, FFDHE3072_PEM))
        for dst, data in files:
            fd = os.open(target / dst, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o400)
            try:
                os.write(fd, data)
                os.fchown(fd, uid, gid)
            finally:
                os.close(fd)
        os.chown(target, uid, gid)
    except OSError as exc:
        shutil.rmtree(target, ignore_errors=True)
        raise VmferryError(
            ErrorCode.OPERATION_FAILED,
            f"cannot prepare QEMU's TLS credentials from {pki_dir}: {exc}: "
            f"run `vmferry pki init {pki_dir}` or copy it from the host that made the CA",
        ) from exc
    return target


#: gnutls priority of QEMU's TLS: ``NORMAL`` (QEMU's default) with its ciphers in the same
#: set, AES-128-GCM first (gnutls 3.7's ``NORMAL`` starts with AES-256-GCM).
PRIORITY = (
    "NORMAL:-CIPHER-ALL:+AES-128-GCM:+AES-256-GCM:+CHACHA20-POLY1305"
    ":+AES-256-CCM:+AES-256-CBC:+AES-128-CCM:+AES-128-CBC"
)


async def add_x509(
    mon: Monitor,
    pki_dir: Path,
    base: Path,
    obj_id: str,
    endpoint: Endpoint,
    user: QemuUser | None,
) -> str:
    """Create the ``tls-creds-x509`` object *obj_id* in QEMU; return its id.

    *base* is a directory of the daemon's own (under the state directory).
    The object's ciphers are :data:`PRIORITY`'s.
    """
    staged = stage(pki_dir, base, obj_id, endpoint, user)
    dir_fd = -1
    fdset: int | None = None
    try:
        dir_fd = os.open(staged, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        info = await mon.execute_with_fd("add-fd", {"opaque": f"tls {obj_id}"}, dir_fd)
        fdset, qemu_fd = int(info["fdset-id"]), int(info["fd"])
        with contextlib.suppress(VmferryError):
            await mon.execute("object-del", {"id": obj_id})  # one left by a failed attempt
        await mon.execute(
            "object-add",
            {
                "qom-type": "tls-creds-x509",
                "id": obj_id,
                "dir": f"/proc/self/fd/{qemu_fd}",
                "endpoint": endpoint,
                "verify-peer": True,
                "priority": PRIORITY,
            },
        )
    finally:
        if dir_fd >= 0:
            os.close(dir_fd)
        if fdset is not None and mon.connected:
            with contextlib.suppress(VmferryError):
                await mon.execute("remove-fd", {"fdset-id": fdset})
        shutil.rmtree(staged, ignore_errors=True)
    return obj_id


async def remove_x509(mon: Monitor | None, obj_id: str) -> None:
    """Delete the credentials object (nothing if QEMU is gone or never had it)."""
    if mon is None or not mon.connected:
        return
    with contextlib.suppress(VmferryError):
        await mon.execute("object-del", {"id": obj_id})


def sweep(base: Path) -> None:
    """Remove copies a crash left behind (the daemon calls it when it starts)."""
    shutil.rmtree(base, ignore_errors=True)
