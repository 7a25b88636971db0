"""The daemon's state directory and crash-safe writes into it.

Layout (``vmferryd --state-dir DIR``)::

    DIR/host.json              hostname and host UUID
    DIR/qemu/NAME.xml          persistent definitions
    DIR/run/NAME.json          live status of a running domain
    DIR/run/NAME.qmp           QMP socket of the domain's QEMU
    DIR/log/NAME.log           QEMU's stderr
    DIR/log/NAME.console.log   the guest's serial console

A file the daemon cannot use (empty, unreadable, corrupt) is renamed to
``FILE.corrupt-<UTC time>`` by :meth:`StateDir.move_aside` and never loaded
again; the daemon goes on without it (see docs/security-robust.md).

A unix socket path holds at most 107 bytes.  When ``run/NAME.qmp`` would be
longer (a long domain name), the socket is ``run/.<hash>.qmp`` instead, a
name no domain can have (domain names never start with a dot).  When even
that does not fit, the state directory itself is too long:
:meth:`StateDir.ensure` refuses it at daemon start.
"""

from __future__ import annotations

import contextlib
import ctypes
import hashlib
import json
import os
import tempfile
import time
from pathlib import Path
from typing import Any

from vmferry import trace
from vmferry.errors import ErrorCode, VmferryError

# sun_path is 108 bytes including the terminating NUL.
UNIX_PATH_MAX = 107

_HASH_LEN = 24


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write(path: Path, data: bytes | str, *, mode: int = 0o600, durable: bool = True) -> None:
    """
    Replace *path* with *data* so that a crash leaves either the old or the new content.

    Writes a temp file in the same directory, fsyncs it, renames it over
    *path* and fsyncs the directory.  On failure the temp file is removed
    and *path* is untouched.  ``durable=False`` skips both fsyncs: still whole
    after a process crash, not after a power loss.  It also swaps the temp file
    with *path* (``renameat2(RENAME_EXCHANGE)``) and removes the old content
    under the temp name, instead of renaming over *path*: on ext4 a rename over
    an existing file starts writing the new one out (``auto_da_alloc``), ~2 ms
    a status write, a flush for a power loss that the caller chose not to pay
    for.  *path* names a whole file, old or new, at every moment either way.
    """
    with trace.span("status write", lambda: trace.caller(depth=8)):
        _atomic_write(Path(path), data, mode, durable)


def _atomic_write(path: Path, data: bytes | str, mode: int, durable: bool) -> None:
    payload = data.encode() if isinstance(data, str) else data
    fd, tmp_name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    tmp = Path(tmp_name)
    try:
        try:
            os.fchmod(fd, mode)
            view = memoryview(payload)
            while view:
                view = view[os.write(fd, view) :]
            if durable:
                os.fsync(fd)
        finally:
            os.close(fd)
        exchanged = not durable and _exchange(tmp, path)
        if not exchanged:
            os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    if exchanged:
        # The old content, now under the temp name; a crash before this leaves a dot file
        # that nothing loads (StateDir._names), as a crash in the middle of a write does.
        with contextlib.suppress(OSError):
            tmp.unlink()
    if durable:
        _fsync_dir(path.parent)


_RENAME_EXCHANGE = 2  # linux/fs.h
_AT_FDCWD = -100


def _libc_renameat2() -> Any:
    """libc's ``renameat2``, or None when this libc has none."""
    try:
        func = ctypes.CDLL(None, use_errno=True).renameat2
    except (AttributeError, OSError):
        return None
    func.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    func.restype = ctypes.c_int
    return func


#: Looked up when the daemon starts (importing ctypes in its first status write cost ~30 ms).
_RENAMEAT2 = _libc_renameat2()


def _exchange(tmp: Path, path: Path) -> bool:
    """Swap *tmp* and *path* atomically; False when this cannot be done here (rename then).

    False too when *path* does not exist yet (a rename over nothing flushes nothing)
    or the file system has no ``RENAME_EXCHANGE``.
    """
    if _RENAMEAT2 is None:
        return False
    done: int = _RENAMEAT2(
        _AT_FDCWD, os.fsencode(tmp), _AT_FDCWD, os.fsencode(path), _RENAME_EXCHANGE
    )
    return done == 0


def check_name(name: str) -> str:
    """Refuse a domain name that cannot be a file name in the state directory."""
    if (
        not name
        or name.startswith(".")
        or "/" in name
        or "\0" in name
        or len(os.fsencode(name)) > 200
    ):
        raise VmferryError(
            ErrorCode.INVALID_ARG,
            f"invalid domain name {name!r}: it must be 1-200 bytes, "
            "contain no '/' and not start with '.'",
        )
    return name


class StateDir:
    """
    Paths of the daemon's state directory.

    :param root: The directory; made absolute, since QEMU is given socket
        and log paths below it.
    """

    def __init__(self, root: Path) -> None:
        self.root = Path(root).absolute()
        self.host_file = self.root / "host.json"
        self.config_dir = self.root / "qemu"
        self.run_dir = self.root / "run"
        self.log_dir = self.root / "log"
        # one empty file per autostarted domain (libvirt's autostart/NAME.xml links)
        self.autostart_dir = self.root / "autostart"
        # the boot id of the host boot whose autostart already ran (libvirt's /run marker)
        self.autostarted_marker = self.run_dir / "autostarted"

    def __repr__(self) -> str:
        return f"StateDir({str(self.root)!r})"

    def ensure(self) -> None:
        """
        Create the directories (0700) and check that QMP sockets fit.

        :raise VmferryError: ``INVALID_ARG`` if the directory cannot be
            created or its path is too long for a unix socket below it.
        """
        shortest = self.run_dir / f".{'0' * _HASH_LEN}.qmp"
        if len(os.fsencode(shortest)) > UNIX_PATH_MAX:
            raise VmferryError(
                ErrorCode.INVALID_ARG,
                f"state directory {self.root} is too long: QMP sockets below it would exceed "
                f"the {UNIX_PATH_MAX}-byte limit of unix socket paths; use a shorter --state-dir",
            )
        try:
            self.root.mkdir(mode=0o700, parents=True, exist_ok=True)
            for sub in (self.config_dir, self.run_dir, self.log_dir, self.autostart_dir):
                sub.mkdir(mode=0o700, exist_ok=True)
                os.chmod(sub, 0o700)
        except OSError as exc:
            raise VmferryError(
                ErrorCode.INVALID_ARG,
                f"cannot create state directory {self.root}: {exc.strerror}",
            ) from exc

    def definition_path(self, name: str) -> Path:
        return self.config_dir / f"{check_name(name)}.xml"

    def status_path(self, name: str) -> Path:
        return self.run_dir / f"{check_name(name)}.json"

    def qmp_socket(self, name: str) -> Path:
        """``run/NAME.qmp``, or ``run/.<hash>.qmp`` if that is too long for a unix socket."""
        path = self.run_dir / f"{check_name(name)}.qmp"
        if len(os.fsencode(path)) <= UNIX_PATH_MAX:
            return path
        digest = hashlib.sha256(name.encode()).hexdigest()[:_HASH_LEN]
        return self.run_dir / f".{digest}.qmp"

    def autostart_path(self, name: str) -> Path:
        return self.autostart_dir / check_name(name)

    def qemu_log(self, name: str) -> Path:
        return self.log_dir / f"{check_name(name)}.log"

    def console_log(self, name: str) -> Path:
        return self.log_dir / f"{check_name(name)}.console.log"

    @staticmethod
    def _names(directory: Path, suffix: str) -> list[str]:
        try:
            entries = list(directory.iterdir())
        except FileNotFoundError:
            return []
        # Dot files are temp files of atomic_write (or hashed sockets), never domains.
        return sorted(
            p.name[: -len(suffix)]
            for p in entries
            if p.name.endswith(suffix) and not p.name.startswith(".") and p.is_file()
        )

    def list_definitions(self) -> list[str]:
        """Names of the persistent domains (``qemu/*.xml``), sorted."""
        return self._names(self.config_dir, ".xml")

    def list_statuses(self) -> list[str]:
        """Names of the domains with a live status file (``run/*.json``), sorted."""
        return self._names(self.run_dir, ".json")

    @staticmethod
    def read_text(path: Path) -> str | None:
        """The file's text, or None if it does not exist."""
        try:
            return Path(path).read_text()
        except FileNotFoundError:
            return None

    @staticmethod
    def read_state_text(path: Path) -> str | None:
        """
        Like :meth:`read_text`, but any other failure is a corrupt state file.

        :raise VmferryError: ``INTERNAL_ERROR`` if the file cannot be read
            (permissions, a directory, not UTF-8).
        """
        try:
            return StateDir.read_text(path)
        except (OSError, UnicodeDecodeError) as exc:
            why = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
            raise VmferryError(
                ErrorCode.INTERNAL_ERROR, f"unreadable state file {path}: {why}"
            ) from exc

    @staticmethod
    def read_json(path: Path) -> Any:
        """
        The file's JSON value, or None if it does not exist.

        :raise VmferryError: ``INTERNAL_ERROR`` if the file is unreadable or
            not valid JSON (an empty file included).
        """
        text = StateDir.read_state_text(path)
        if text is None:
            return None
        try:
            return json.loads(text)
        except ValueError as exc:
            raise VmferryError(
                ErrorCode.INTERNAL_ERROR, f"corrupt state file {path}: {exc}"
            ) from exc

    @staticmethod
    def move_aside(path: Path) -> Path | None:
        """
        Rename a corrupt state file to ``PATH.corrupt-<UTC time>`` for inspection.

        The new name ends in neither ``.json`` nor ``.xml``, so the daemon
        never loads it again.  Returns the new path, or None if *path* is
        gone or cannot be renamed (then it is left where it is).
        """
        path = Path(path)
        stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
        target = path.with_name(f"{path.name}.corrupt-{stamp}")
        n = 1
        while target.exists() or target.is_symlink():
            n += 1
            target = path.with_name(f"{path.name}.corrupt-{stamp}-{n}")
        try:
            os.rename(path, target)
        except OSError:
            return None
        return target

    @staticmethod
    def write_json(path: Path, value: Any) -> None:
        """Write *value* as JSON with :func:`atomic_write`."""
        atomic_write(path, json.dumps(value, indent=2, sort_keys=True) + "\n")

    @staticmethod
    def remove(path: Path) -> None:
        """Delete *path*; a missing file is fine."""
        with contextlib.suppress(FileNotFoundError):
            Path(path).unlink()
