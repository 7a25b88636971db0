"""A pool of type ``dir``: volumes are the plain files of one directory.

Every method blocks (file system, ``qemu-img``): the daemon calls them with
``asyncio.to_thread``. A volume name is checked (:mod:`vmferry.domain.
storage_names`) and its resolved path must be a direct child of the pool
directory, so no name and no symbolic link in the pool reaches another file.
"""

from __future__ import annotations

import builtins
import contextlib
import errno
import os
import secrets
import stat
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

from vmferry.domain.storage_names import check_pool_name, check_volume_name
from vmferry.errors import ErrorCode, VmferryError
from vmferry.storage import qemuimg

VOLUME_FORMATS = ("raw", "qcow2")
#: A backing chain deeper than this is refused (a loop, or a file built to exhaust us).
MAX_CHAIN = 16
_QCOW2_MAGIC = b"QFI\xfb"
# qcow2 metadata on top of the guest data: an upload may exceed the capacity by this much.
_QCOW2_SLACK = 1 << 24


@dataclass(frozen=True)
class PoolConfig:
    """``[pools.NAME]`` of the daemon config."""

    name: str
    path: Path


@dataclass(frozen=True)
class Layer:
    """One image of a disk's backing chain: its file, format and volume name."""

    path: str
    format: str
    name: str


@dataclass(frozen=True)
class VolumeInfo:
    """What ``vol-info`` shows; *backing* is the chain below, nearest first, as names."""

    pool: str
    name: str
    path: str
    format: str
    capacity: int
    allocation: int
    backing: tuple[tuple[str, str], ...] = ()


def os_error(err: OSError, what: str) -> VmferryError:
    """*err* of the file system as the API's error: a full pool is ``STORAGE_FULL``."""
    if err.errno in (errno.ENOSPC, errno.EDQUOT):
        return VmferryError(ErrorCode.STORAGE_FULL, f"cannot {what}: the pool is full")
    return VmferryError(ErrorCode.OPERATION_FAILED, f"cannot {what}: {err.strerror or err}")


def _no_volume(pool: str, name: str) -> VmferryError:
    return VmferryError(
        ErrorCode.NO_STORAGE_VOL, f"Storage volume not found: no volume '{name}' in pool '{pool}'"
    )


def probe_format(path: str) -> str:
    """``qcow2`` if *path* starts with the qcow2 magic, else ``raw`` (for showing only)."""
    with open(path, "rb") as f:
        return "qcow2" if f.read(4) == _QCOW2_MAGIC else "raw"


class Pool:
    """One ``dir`` pool.

    :param owner: ``(uid, gid)`` new volumes get (the QEMU user), None: the daemon's.
    """

    def __init__(self, name: str, path: Path, *, owner: tuple[int, int] | None = None) -> None:
        self.name = check_pool_name(name)
        self.path = Path(os.path.realpath(path))
        self.owner = owner

    def __repr__(self) -> str:
        return f"Pool({self.name!r}, {str(self.path)!r})"

    def ensure(self) -> None:
        """Create the directory (mode 0711: QEMU may reach a file it knows, not list them).

        Temporary files a crash left behind (a half-made volume or upload) go.
        """
        try:
            self.path.mkdir(mode=0o711, parents=True, exist_ok=True)
            for entry in os.scandir(self.path):
                if entry.name.startswith((".create-", ".upload-")) and entry.is_file(
                    follow_symlinks=False
                ):
                    os.unlink(entry.path)
        except OSError as err:
            raise VmferryError(
                ErrorCode.INVALID_ARG,
                f"cannot create directory {self.path} of pool '{self.name}': {err.strerror}",
            ) from err

    # -- names ----------------------------------------------------------------------------

    def volume_path(self, name: str) -> Path:
        """The file of volume *name* (which need not exist).

        :raise VmferryError: ``INVALID_ARG`` for a name that is not a plain file
            name or whose file resolves outside the pool (a symbolic link).
        """
        check_volume_name(name)
        path = self.path / name
        if os.path.dirname(os.path.realpath(path)) != str(self.path):
            raise VmferryError(
                ErrorCode.INVALID_ARG,
                f"volume '{name}' of pool '{self.name}' resolves outside the pool directory",
            )
        return path

    def _existing(self, name: str) -> Path:
        path = self.volume_path(name)
        try:
            st = os.stat(path)
        except FileNotFoundError:
            raise _no_volume(self.name, name) from None
        if not stat.S_ISREG(st.st_mode):
            raise VmferryError(
                ErrorCode.INVALID_ARG, f"volume '{name}' of pool '{self.name}' is not a file"
            )
        return path

    # -- volumes ----------------------------------------------------------------------------

    def list(self) -> list[VolumeInfo]:
        """Every volume (regular files with valid names), by name."""
        found = []
        for entry in sorted(os.scandir(self.path), key=lambda e: e.name):
            if entry.name.startswith(".") or not entry.is_file():
                continue
            with contextlib.suppress(VmferryError):
                found.append(self.info(entry.name))
        return found

    def free_bytes(self) -> int:
        """Bytes free for the daemon in the pool's file system."""
        st = os.statvfs(self.path)
        return st.f_bavail * st.f_frsize

    def info(self, name: str) -> VolumeInfo:
        """Capacity, allocation, format and backing chain of volume *name*.

        :raise VmferryError: ``NO_STORAGE_VOL``; ``OPERATION_FAILED`` when the
            image cannot be read or its chain leaves the pool.
        """
        path = self._existing(name)
        fmt = probe_format(str(path))
        data = qemuimg.info(str(path), fmt)
        chain = self.chain(name, fmt)
        return VolumeInfo(
            pool=self.name,
            name=name,
            path=str(path),
            format=fmt,
            capacity=int(data.get("virtual-size", 0)),
            allocation=int(data.get("actual-size", 0)),
            backing=tuple((layer.name, layer.format) for layer in chain[1:]),
        )

    def create_volume(
        self,
        name: str,
        capacity_bytes: int,
        fmt: str = "raw",
        backing: tuple[str, str] | None = None,
        owner: tuple[int, int] | None = None,
    ) -> VolumeInfo:
        """Create volume *name*; *backing* is ``(volume, format)`` in this pool (qcow2 only).

        The image is made under a temporary name and linked into place, so a
        volume is either whole or absent, and an existing one is never replaced.

        :raise VmferryError: ``STORAGE_VOL_EXISTS``, ``NO_STORAGE_VOL`` (backing),
            ``INVALID_ARG``, ``OPERATION_FAILED`` (e.g. the pool is full).
        """
        path = self.volume_path(name)
        if fmt not in VOLUME_FORMATS:
            raise VmferryError(
                ErrorCode.INVALID_ARG, f"volume format must be raw or qcow2, not '{fmt}'"
            )
        if isinstance(capacity_bytes, bool) or capacity_bytes <= 0:
            raise VmferryError(ErrorCode.INVALID_ARG, "volume capacity must be > 0 bytes")
        if backing is not None:
            if fmt != "qcow2":
                raise VmferryError(
                    ErrorCode.INVALID_ARG, "only a qcow2 volume can have a backing volume"
                )
            if backing[1] not in VOLUME_FORMATS:
                raise VmferryError(
                    ErrorCode.INVALID_ARG,
                    f"backing format must be raw or qcow2, not '{backing[1]}'",
                )
            self.chain(backing[0], backing[1])  # exists, and its own chain stays in the pool
        if os.path.lexists(path):
            raise self._exists(name)
        if fmt == "raw" and capacity_bytes > self.free_bytes():
            # Sparse, but a raw volume the guest fills must fit: refuse what cannot.
            raise VmferryError(
                ErrorCode.STORAGE_FULL,
                f"pool '{self.name}' has {self.free_bytes()} bytes free, "
                f"not enough for a raw volume of {capacity_bytes} bytes",
            )
        tmp = self._temp(f"create-{name}")
        try:
            qemuimg.create(str(tmp), fmt, capacity_bytes, backing)
            self._own(tmp, owner or self.owner)
            os.link(tmp, path)  # fails if the name was taken meanwhile
        except FileExistsError:
            raise self._exists(name) from None
        except OSError as err:
            raise os_error(err, f"create volume '{name}'") from err
        finally:
            tmp.unlink(missing_ok=True)
        if backing is None:  # the chain is this one image: no header to read at its start
            qemuimg.remember_created(str(path), fmt, capacity_bytes)
        return self.info(name)

    def _exists(self, name: str) -> VmferryError:
        return VmferryError(
            ErrorCode.STORAGE_VOL_EXISTS, f"volume '{name}' already exists in pool '{self.name}'"
        )

    def _temp(self, what: str) -> Path:
        # Dot names are never volume names: list() skips them, no client can name them.
        return self.path / f".{what}.{secrets.token_hex(6)}"

    def _own(self, path: Path, owner: tuple[int, int] | None) -> None:
        if owner is not None:
            os.chown(path, *owner)
        os.chmod(path, 0o600)

    def delete_volume(self, name: str) -> None:
        """Remove volume *name*.

        :raise VmferryError: ``NO_STORAGE_VOL``.
        """
        path = self._existing(name)
        try:
            path.unlink()
        except FileNotFoundError:
            raise _no_volume(self.name, name) from None
        except OSError as err:
            raise os_error(err, f"delete volume '{name}'") from err

    # -- chains ------------------------------------------------------------------------------

    def chain(self, name: str, fmt: str) -> builtins.list[Layer]:
        """Volume *name* opened as *fmt* and its backing images, top first.

        Every backing file must be a volume of this pool and name its format
        (no probing): QEMU gets exactly these files and no other.
        """
        top = self._existing(name)
        return walk_chain(str(top), fmt, self._place, top_name=name)

    def _place(self, real: str) -> str:
        parent, base = os.path.split(real)
        if parent != str(self.path):
            raise VmferryError(
                ErrorCode.ACCESS_DENIED,
                f"backing file {real} is not a volume of pool '{self.name}' ({self.path})",
            )
        return check_volume_name(base)

    # -- upload and download ----------------------------------------------------------------

    def upload_limit(self, name: str) -> int:
        """Most bytes an upload into volume *name* may hold: its capacity (+ qcow2 metadata)."""
        info = self.info(name)
        return info.capacity + (_QCOW2_SLACK + info.capacity // 64 if info.format == "qcow2" else 0)

    def begin_upload(self, name: str) -> Upload:
        """Start replacing volume *name*'s file; :meth:`Upload.commit` puts it in place."""
        path = self._existing(name)
        limit = self.upload_limit(name)
        st = os.stat(path)
        tmp = self._temp(f"upload-{name}")
        flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
        try:
            fd = os.open(tmp, flags, 0o600)
        except OSError as err:
            raise os_error(err, f"upload into volume '{name}'") from err
        os.fchown(fd, st.st_uid, st.st_gid)
        return Upload(self, name, path, tmp, os.fdopen(fd, "wb"), limit)

    def open_download(self, name: str) -> tuple[BinaryIO, int]:
        """Volume *name*'s file, open for reading, and its size."""
        path = self._existing(name)
        try:
            fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
        except OSError as err:
            raise os_error(err, f"read volume '{name}'") from err
        f = os.fdopen(fd, "rb")
        return f, os.fstat(fd).st_size


class Upload:
    """An upload under way: bytes go to a temporary file in the pool."""

    def __init__(
        self, pool: Pool, name: str, path: Path, tmp: Path, f: BinaryIO, limit: int
    ) -> None:
        self.pool, self.name, self.path, self.tmp = pool, name, path, tmp
        self._f = f
        self.limit = limit
        self.written = 0

    def write(self, chunk: bytes) -> None:
        """Append *chunk*; refuses to go past the volume's capacity."""
        if self.written + len(chunk) > self.limit:
            raise VmferryError(
                ErrorCode.INVALID_ARG,
                f"upload is larger than volume '{self.name}' ({self.limit} bytes)",
            )
        try:
            self._f.write(chunk)
        except OSError as err:
            raise os_error(err, f"upload into volume '{self.name}'") from err
        self.written += len(chunk)

    def commit(self) -> VolumeInfo:
        """Check the new content (a qcow2 must stay in the pool) and swap it in."""
        try:
            self._f.flush()
            os.fsync(self._f.fileno())
            self._f.close()
        except OSError as err:
            raise os_error(err, f"upload into volume '{self.name}'") from err
        fmt = probe_format(str(self.tmp))
        try:
            walk_chain(str(self.tmp), fmt, self.pool._place, top_name=self.name)
        except VmferryError as err:
            self.abort()
            raise VmferryError(
                ErrorCode.INVALID_ARG, f"uploaded image refused: {err.message}"
            ) from None
        os.replace(self.tmp, self.path)
        return self.pool.info(self.name)

    def abort(self) -> None:
        """Drop the temporary file (idempotent)."""
        with contextlib.suppress(OSError):
            self._f.close()
        self.tmp.unlink(missing_ok=True)


def walk_chain(top: str, fmt: str, place: Any, *, top_name: str = "") -> list[Layer]:
    """The backing chain of image *top* opened as *fmt*, top first.

    :param place: ``real path -> name``: raises ``VmferryError`` for a backing
        file outside what is allowed (a pool, the configured roots).
    :raise VmferryError: ``OPERATION_FAILED`` for an unreadable image, a chain
        that is too deep or loops, a backing file without a format, an
        external data file; whatever *place* raises.
    """
    layers = [Layer(top, fmt, top_name)]
    seen = {os.path.realpath(top)}
    while True:
        current = layers[-1]
        data = qemuimg.header(current.path, current.format)
        specific = data.get("format-specific", {}).get("data", {})
        if isinstance(specific, dict) and specific.get("data-file"):
            raise VmferryError(
                ErrorCode.ACCESS_DENIED,
                f"image {current.path} uses an external data file: not supported",
            )
        backing = data.get("full-backing-filename") or data.get("backing-filename")
        if not backing:
            return layers
        if len(layers) >= MAX_CHAIN:
            raise VmferryError(
                ErrorCode.OPERATION_FAILED, f"backing chain of {top} is deeper than {MAX_CHAIN}"
            )
        backing_fmt = data.get("backing-filename-format", "")
        if backing_fmt not in VOLUME_FORMATS:
            raise VmferryError(
                ErrorCode.OPERATION_FAILED,
                f"image {current.path} has backing file '{backing}' of format "
                f"'{backing_fmt or 'unknown'}' (must be raw or qcow2, named in the image: "
                "qemu-img rebase -u -F FORMAT)",
            )
        if not isinstance(backing, str) or not backing.startswith("/"):
            raise VmferryError(
                ErrorCode.ACCESS_DENIED, f"image {current.path}: backing '{backing}' is not a file"
            )
        real = os.path.realpath(backing)
        name = place(real)
        if real in seen:
            raise VmferryError(ErrorCode.OPERATION_FAILED, f"backing chain of {top} loops")
        if not os.path.isfile(real):
            raise VmferryError(
                ErrorCode.NO_STORAGE_VOL, f"backing file {backing} of {current.path} is missing"
            )
        seen.add(real)
        layers.append(Layer(real, backing_fmt, name))


def iter_chunks(f: BinaryIO, size: int, chunk: int) -> Iterator[bytes]:
    """Up to *size* bytes of *f* in chunks of *chunk* (blocking reads)."""
    left = size
    while left > 0:
        data = f.read(min(chunk, left))
        if not data:
            return
        left -= len(data)
        yield data
