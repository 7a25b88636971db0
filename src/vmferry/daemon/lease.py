"""VM leases: a running or paused domain holds one, so no VM ever runs on two hosts.

libvirt's lock managers (virtlockd, sanlock) behind one small protocol,
:class:`LeaseBackend`. :class:`NoLeases` is a host outside any cluster;
:class:`LockspaceLeases` is virtlockd's model: an fcntl lock on
``<lockspace>/<uuid>.lock`` in a directory every host mounts. The lock is an
open-file-description lock (``F_OFD_SETLK``): it belongs to the open file, not
to the process, so closing another descriptor of the same file never drops it
by accident, and it dies with the daemon (a restarted daemon takes it again).

The holder writes its identity into the file once it has the lock, so a
refused host can name the one that holds it.
"""

from __future__ import annotations

import fcntl
import json
import logging
import os
import struct
import uuid as uuidlib
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from vmferry.errors import ErrorCode, VmferryError

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class LeaseOwner:
    """Who holds a lease: a host's UUID and name."""

    host_uuid: str
    hostname: str

    def describe(self) -> str:
        return f"host '{self.hostname}' ({self.host_uuid})" if self.hostname else self.host_uuid


class LeaseBackend(Protocol):
    """Where this host takes, keeps and gives up the leases of its domains."""

    #: ``none``, ``lockspace`` or ``etcd``: travels in the migration cookie's lockstate.
    kind: str

    async def acquire(self, uuid: str, name: str, *, previous: str = "") -> None:
        """
        Take the lease of domain *uuid* for this host (a no-op if it holds it already).

        :param previous: The host UUID that handed it over (migration), when known.
        :raise VmferryError: ``LEASE_HELD`` naming the host that holds it.
        """
        ...

    def release(self, uuid: str) -> None:
        """Give the lease of *uuid* up (a no-op if this host does not hold it)."""
        ...

    def holds(self, uuid: str) -> bool:
        """Whether this host holds the lease of *uuid* now."""
        ...

    async def holder(self, uuid: str) -> LeaseOwner | None:
        """Who holds the lease of *uuid*, as far as this host can tell (None: nobody)."""
        ...

    async def close(self) -> None:
        """Let go of everything (the daemon stops; its guests keep running)."""
        ...

    def inheritable(self, uuid: str) -> list[int]:
        """Descriptors the domain's QEMU should keep open so the lease outlives this daemon."""
        ...


def lease_held(name: str, owner: LeaseOwner | None) -> VmferryError:
    who = owner.describe() if owner is not None else "another host"
    return VmferryError(
        ErrorCode.LEASE_HELD,
        f"domain '{name}' is running on {who}: its lease is held there "
        "(stop it there or migrate it here)",
    )


def check_uuid(value: str) -> str:
    """*value* as a canonical UUID: lease keys and file names are built from it."""
    try:
        return str(uuidlib.UUID(value))
    except (ValueError, AttributeError, TypeError):
        raise VmferryError(ErrorCode.INVALID_ARG, f"{value!r} is not a domain UUID") from None


class NoLeases:
    """A host outside any cluster: nothing to lock, every start is allowed."""

    kind = "none"

    def __init__(self) -> None:
        self._held: set[str] = set()

    async def acquire(self, uuid: str, name: str, *, previous: str = "") -> None:
        self._held.add(uuid)

    def release(self, uuid: str) -> None:
        self._held.discard(uuid)

    def holds(self, uuid: str) -> bool:
        return uuid in self._held

    async def holder(self, uuid: str) -> LeaseOwner | None:
        return None

    async def close(self) -> None:
        self._held.clear()

    def inheritable(self, uuid: str) -> list[int]:
        return []


# struct flock on Linux x86_64/aarch64: short l_type, l_whence; off_t l_start, l_len; pid_t l_pid.
_FLOCK = "hhqqi4x"


def _ofd_lock(fd: int, kind: int) -> bool:
    """Set (F_WRLCK) or clear (F_UNLCK) an OFD lock on the whole file; False if held elsewhere."""
    request = struct.pack(_FLOCK, kind, os.SEEK_SET, 0, 0, 0)  # l_pid must be 0 for OFD locks
    try:
        fcntl.fcntl(fd, fcntl.F_OFD_SETLK, request)
    except OSError as exc:
        if exc.errno in (11, 13):  # EAGAIN, EACCES: another open file holds it
            return False
        raise
    return True


def _ofd_locked(fd: int) -> bool:
    """Whether another open file holds a lock on *fd*'s file (asks; takes nothing)."""
    request = struct.pack(_FLOCK, fcntl.F_WRLCK, os.SEEK_SET, 0, 0, 0)
    answer = fcntl.fcntl(fd, fcntl.F_OFD_GETLK, request)
    kind: int = struct.unpack(_FLOCK, answer)[0]
    return kind != fcntl.F_UNLCK


class LockspaceLeases:
    """virtlockd's model: an fcntl lock on ``<lockspace>/<uuid>.lock`` per running domain."""

    kind = "lockspace"

    def __init__(self, lockspace: Path, me: LeaseOwner) -> None:
        self.lockspace = lockspace
        self.me = me
        self._fds: dict[str, int] = {}  # uuid -> the open, locked lock file

    def path(self, uuid: str) -> Path:
        return self.lockspace / f"{check_uuid(uuid)}.lock"

    async def acquire(self, uuid: str, name: str, *, previous: str = "") -> None:
        uuid = check_uuid(uuid)
        if uuid in self._fds:
            return
        path = self.path(uuid)
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        except OSError as exc:
            raise VmferryError(
                ErrorCode.OPERATION_FAILED,
                f"cannot open the lease file {path} of domain '{name}': {exc.strerror} "
                "(is [cluster] lockspace mounted and writable?)",
            ) from exc
        try:
            if not _ofd_lock(fd, fcntl.F_WRLCK):
                owner = _read_owner(fd)
                if owner is None or owner.host_uuid != self.me.host_uuid:
                    raise lease_held(name, owner)
                # Ours: a QEMU started by an earlier daemon of this host still holds the lock.
                adopted = _adopt_from_process(path)
                if adopted is None:
                    raise lease_held(name, owner)
                os.close(fd)
                fd = adopted
                log.info("domain %s: took over the lease lock its QEMU kept", name)
            record = json.dumps(
                {"host_uuid": self.me.host_uuid, "hostname": self.me.hostname, "domain": name}
            ).encode()
            os.ftruncate(fd, 0)
            os.pwrite(fd, record, 0)
        except BaseException:
            os.close(fd)  # closing the only descriptor drops a lock taken just now
            raise
        self._fds[uuid] = fd
        log.info("took the lease of domain %s (%s)", name, uuid)

    def release(self, uuid: str) -> None:
        fd = self._fds.pop(uuid, None)
        if fd is None:
            return
        try:
            os.ftruncate(fd, 0)  # the file stays: removing it would race a new locker
            _ofd_lock(fd, fcntl.F_UNLCK)
        except OSError as exc:
            log.warning("releasing the lease of %s: %s", uuid, exc)
        finally:
            os.close(fd)
        log.info("released the lease of domain %s", uuid)

    def holds(self, uuid: str) -> bool:
        return uuid in self._fds

    def inheritable(self, uuid: str) -> list[int]:
        # A dup shares the open file description, and so the lock: QEMU keeps it alive.
        fd = self._fds.get(uuid)
        return [os.dup(fd)] if fd is not None else []

    async def holder(self, uuid: str) -> LeaseOwner | None:
        return self.holder_now(uuid)

    def holder_now(self, uuid: str) -> LeaseOwner | None:
        """:meth:`holder`, without an event loop (the lockspace answers at once)."""
        if uuid in self._fds:
            return self.me
        try:
            fd = os.open(self.path(uuid), os.O_RDWR | os.O_CLOEXEC)
        except (OSError, VmferryError):
            return None
        try:
            if not _ofd_locked(fd):
                return None
            return _read_owner(fd) or LeaseOwner("", "")
        finally:
            os.close(fd)

    async def close(self) -> None:
        for fd in self._fds.values():
            os.close(fd)
        self._fds.clear()


_SYS_PIDFD_GETFD = 438  # x86_64, aarch64 (Linux >= 5.6)


def _adopt_from_process(path: Path) -> int | None:
    """A descriptor of the open file (and so the OFD lock) some process holds on *path*.

    After a daemon restart the only holder of a domain's lock is its QEMU, which
    inherited it; ``pidfd_getfd`` hands the daemon the same open file description,
    so it can release the lock again (a migration) like its own.
    """
    import ctypes

    target = str(path)
    libc = ctypes.CDLL(None, use_errno=True)
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit() or int(proc.name) == os.getpid():
            continue
        try:
            entries = list((proc / "fd").iterdir())
        except OSError:
            continue
        for entry in entries:
            try:
                if os.readlink(entry) != target:
                    continue
                pidfd = os.pidfd_open(int(proc.name))
            except OSError:
                continue
            try:
                fd = libc.syscall(_SYS_PIDFD_GETFD, pidfd, int(entry.name), 0)
            finally:
                os.close(pidfd)
            if fd < 0:
                continue
            if not _ofd_locked(fd):  # no conflict seen through it: this one holds the lock
                os.set_inheritable(fd, False)
                return int(fd)
            os.close(fd)
    return None


def _read_owner(fd: int) -> LeaseOwner | None:
    try:
        data = json.loads(os.pread(fd, 4096, 0) or b"null")
    except (OSError, ValueError):
        return None
    if not isinstance(data, dict):
        return None
    return LeaseOwner(str(data.get("host_uuid", "")), str(data.get("hostname", "")))
