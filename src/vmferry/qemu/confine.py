"""What a domain's QEMU may touch on this host (libvirt's security drivers, in small).

Every definition passes :meth:`Confinement.check` before the daemon defines,
creates, starts or prepares an incoming migration of it:

- ``<emulator>`` must be one of the configured emulators;
- kernel, initrd and disk files must resolve (symlinks and ``..`` followed)
  below a configured root and be reachable by the QEMU user;
- files and sockets QEMU would create, truncate or bind (``<serial
  type='file'>``, ``<serial type='unix' mode='bind'>``) must lie in the
  domain's own console directory ``STATE/console/NAME/``; a ``connect``
  socket below a root or that directory;
- none of them may be one of the daemon's own files (state directory outside
  the console directory, configuration, PKI directory, API sockets).

:meth:`Confinement.open_files` then opens what QEMU writes (its QMP socket,
the console log, serial files and sockets) in the daemon, as root, and hands
QEMU the descriptors, so an unprivileged QEMU needs no access to the state
directory at all.
"""

from __future__ import annotations

import contextlib
import grp
import os
import pwd
import shutil
import socket
import stat
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from vmferry.domain.model import DomainDef
from vmferry.errors import ErrorCode, VmferryError


@dataclass(frozen=True)
class QemuUser:
    """The unprivileged identity QEMU runs as."""

    name: str
    uid: int
    gid: int


def resolve_user(user: str, group: str) -> QemuUser | None:
    """The configured QEMU user, or None when QEMU runs as root (``""`` or ``"root"``).

    :raise VmferryError: ``INVALID_ARG`` when the user or group does not
        exist, or the daemon cannot switch to it (not running as root).
    """
    if user in ("", "root"):
        return None
    try:
        pw = pwd.getpwnam(user)
    except KeyError:
        raise VmferryError(
            ErrorCode.INVALID_ARG,
            f"QEMU user '{user}' does not exist: create it (scripts/install-deps.sh runs "
            f"'useradd --system --no-create-home --shell /usr/sbin/nologin {user}') or set "
            '[qemu] user = "root" in the daemon config (unsafe: QEMU then runs as root)',
        ) from None
    gid = pw.pw_gid
    if group:
        try:
            gid = grp.getgrnam(group).gr_gid
        except KeyError:
            raise VmferryError(
                ErrorCode.INVALID_ARG,
                f"QEMU group '{group}' does not exist (set [qemu] group = \"\" to use the "
                f"primary group of '{user}')",
            ) from None
    if os.geteuid() != 0 and os.geteuid() != pw.pw_uid:
        raise VmferryError(
            ErrorCode.INVALID_ARG,
            f"the daemon must run as root to start QEMU as user '{user}' "
            '(or set [qemu] user = "" to run QEMU as the daemon\'s own user)',
        )
    return QemuUser(name=user, uid=pw.pw_uid, gid=gid)


USERFAULTFD = "/dev/userfaultfd"


def grant_userfaultfd(user: QemuUser, device: str = USERFAULTFD) -> bool:
    """Let QEMU's group open *device*: post-copy needs userfaultfd for kernel faults.

    An unprivileged process gets those only through ``/dev/userfaultfd``
    (``vm.unprivileged_userfaultfd`` is 0 by default); libvirt grants the
    device to post-copy QEMUs the same way. Sets the group, mode 0660.

    :return: False when the device does not exist (older kernels).
    """
    try:
        st = os.stat(device)
    except FileNotFoundError:
        return False
    if st.st_gid != user.gid:
        os.chown(device, -1, user.gid)
    if stat.S_IMODE(st.st_mode) & 0o060 != 0o060:
        os.chmod(device, stat.S_IMODE(st.st_mode) | 0o060)
    return True


def allowed_emulators(emulator: str, emulators: Iterable[str]) -> frozenset[str]:
    """Real paths of the emulators a definition may name (default: *emulator* from PATH)."""
    listed = list(emulators)
    if not listed:
        found = shutil.which(emulator)
        listed = [found] if found else []
    return frozenset(os.path.realpath(e) for e in listed)


def _refuse(message: str) -> VmferryError:
    return VmferryError(ErrorCode.ACCESS_DENIED, message)


def _within(path: str, base: str) -> bool:
    return path == base or path.startswith(base.rstrip("/") + "/")


@dataclass
class PassedFiles:
    """Descriptors for one QEMU start; the daemon closes its copies once QEMU runs."""

    #: Listening QMP socket (``-chardev socket,fd=N``).
    qmp_fd: int
    #: ``(fdset id, fd, what it is)`` for ``-add-fd``.
    fdsets: list[tuple[int, int, str]] = field(default_factory=list)
    #: fdset path of the console log (``/dev/fdset/N``), "" without serial port 0.
    console_log: str = ""
    #: serial port -> ``/dev/fdset/N`` of its file backend.
    serial_files: dict[int, str] = field(default_factory=dict)
    #: serial port -> listening socket fd of its ``unix`` bind backend.
    serial_sockets: dict[int, int] = field(default_factory=dict)
    #: disk image path -> ``/dev/fdset/N`` (volumes: QEMU needs no access to the pool).
    disk_files: dict[str, str] = field(default_factory=dict)
    #: Descriptors QEMU only keeps open, named by no option: a VM lease's lock, so the lock
    #: lives as long as QEMU even if the daemon dies (vmferry.daemon.lease).
    inherit: list[int] = field(default_factory=list)

    @property
    def fds(self) -> list[int]:
        return [
            self.qmp_fd,
            *(fd for _, fd, _ in self.fdsets),
            *self.serial_sockets.values(),
            *self.inherit,
        ]

    def close(self) -> None:
        """Close the daemon's copies (idempotent)."""
        for fd in self.fds:
            with contextlib.suppress(OSError):
                os.close(fd)
        self.fdsets.clear()
        self.serial_sockets.clear()
        self.inherit.clear()
        self.qmp_fd = -1


class Confinement:
    """The path and emulator rules of one daemon.

    :param roots: directories kernel, initrd and disk files must lie below.
    :param state_root: the daemon's state directory (its own files).
    :param pool_roots: storage pool directories: roots too, even below the
        state directory (the pool ``default`` lives there).
    :param protected: further daemon files QEMU must never get (config file,
        PKI directory, API sockets).
    :param emulators: real paths of the allowed emulators.
    :param user: QEMU's user, None for root.
    """

    def __init__(
        self,
        *,
        roots: Iterable[str | Path],
        state_root: Path,
        protected: Iterable[str | Path] = (),
        emulators: Iterable[str] = (),
        user: QemuUser | None = None,
        pool_roots: Iterable[str | Path] = (),
    ) -> None:
        self.state_root = os.path.realpath(state_root)
        self.console_root = os.path.join(self.state_root, "console")
        self.pool_roots = tuple(os.path.realpath(r) for r in pool_roots)
        self.roots = tuple(os.path.realpath(r) for r in roots) + self.pool_roots
        self.protected = tuple(os.path.realpath(p) for p in protected)
        self.emulators = frozenset(os.path.realpath(e) for e in emulators)
        self.user = user

    def console_dir(self, name: str) -> str:
        """The domain's own directory for serial files and sockets."""
        return os.path.join(self.console_root, name)

    # -- checks ---------------------------------------------------------------------------

    def check(self, d: DomainDef) -> None:
        """Refuse a definition whose QEMU would reach beyond what it may.

        :raise VmferryError: ``ACCESS_DENIED`` naming the element and the rule.
        """
        emulator = d.devices.emulator
        if emulator is not None and os.path.realpath(emulator) not in self.emulators:
            allowed = ", ".join(sorted(self.emulators)) or "none"
            raise _refuse(
                f"<emulator>{emulator}</emulator> is not an allowed emulator "
                f"(allowed: {allowed}; set [qemu] emulators in the daemon config)"
            )
        if d.os.kernel:
            self._check_input(d.os.kernel, "<kernel>", write=False)
        if d.os.initrd:
            self._check_input(d.os.initrd, "<initrd>", write=False)
        for disk in d.devices.disks:
            if disk.source_file:
                write = not disk.readonly and disk.device != "cdrom"
                self._check_input(disk.source_file, f"disk '{disk.target_dev}'", write=write)
        for serial in d.devices.serials:
            what = f"serial port {serial.target_port}"
            if serial.type == "file" or (serial.type == "unix" and serial.mode == "bind"):
                self._check_owned(d.name, serial.path, what)
            elif serial.type == "unix":
                real = os.path.realpath(serial.path)
                if not _within(real, self.console_dir(d.name)):
                    self._check_under_roots(real, serial.path, what)

    def check_new_file(self, given: str, what: str) -> str:
        """A file the daemon is to create for QEMU (storage migration): below a root, not one
        of the daemon's own, no symbolic link; return its real path."""
        if os.path.basename(given) in ("", ".", ".."):
            raise _refuse(f"{what}: {given} is not a file name")
        real = os.path.join(os.path.realpath(os.path.dirname(given)), os.path.basename(given))
        self._check_under_roots(real, given, what)
        return real

    def _check_under_roots(self, real: str, given: str, what: str) -> None:
        if not any(_within(real, root) for root in self.roots):
            roots = ", ".join(self.roots) or "none"
            raise _refuse(
                f"{what}: {given} is not below an allowed directory "
                f"(allowed: {roots}; set [paths] roots in the daemon config)"
            )
        self._check_not_daemon(real, given, what)

    def _check_not_daemon(self, real: str, given: str, what: str) -> None:
        own = any(_within(real, p) for p in self.protected) or (
            _within(real, self.state_root)
            and not _within(real, self.console_root)
            and not any(_within(real, p) for p in self.pool_roots)
        )
        if own:
            raise _refuse(f"{what}: {given} is one of the daemon's own files")

    def _check_input(self, given: str, what: str, *, write: bool) -> None:
        real = os.path.realpath(given)
        self._check_under_roots(real, given, what)
        if self.user is not None:
            problem = _access_problem(real, self.user, write=write)
            if problem:
                raise VmferryError(
                    ErrorCode.ACCESS_DENIED,
                    f"{what}: {given} is not {'writable' if write else 'readable'} by the QEMU "
                    f"user '{self.user.name}': {problem}",
                )

    def _check_owned(self, name: str, given: str, what: str) -> None:
        home = self.console_dir(name)
        parent = os.path.realpath(os.path.dirname(given))
        if not _within(parent, home) or os.path.basename(given) in ("", ".", ".."):
            raise _refuse(
                f"{what}: {given} must lie in the domain's console directory {home}/ "
                "(QEMU creates, truncates or binds it)"
            )
        with contextlib.suppress(FileNotFoundError):
            if stat.S_ISLNK(os.lstat(given).st_mode):
                raise _refuse(f"{what}: {given} is a symbolic link")

    # -- handing files over ---------------------------------------------------------------

    def open_files(
        self,
        d: DomainDef,
        *,
        qmp_socket: Path,
        console_log: Path | None,
        disks: Sequence[DiskFile] = (),
    ) -> PassedFiles:
        """Bind the QMP socket and open every file QEMU writes, as the daemon.

        :param console_log: the log of serial port 0 (None: no serial port 0).
        :param disks: disk images (of pool volumes) QEMU gets as descriptors;
            the caller resolved them inside their pool.
        :raise VmferryError: ``ACCESS_DENIED`` (see :meth:`check`) or
            ``OPERATION_FAILED`` when a file cannot be opened.
        """
        self.check(d)
        qmp_socket.unlink(missing_ok=True)
        files = PassedFiles(qmp_fd=_listen(str(qmp_socket)))
        try:
            next_set = 1
            if console_log is not None and any(s.target_port == 0 for s in d.devices.serials):
                fd = _open_append(str(console_log), truncate=False)
                files.fdsets.append((next_set, fd, str(console_log)))
                files.console_log = f"/dev/fdset/{next_set}"
                next_set += 1
            for serial in d.devices.serials:
                if serial.type not in ("file", "unix") or (
                    serial.type == "unix" and serial.mode != "bind"
                ):
                    continue
                home = self.console_dir(d.name)
                os.makedirs(self.console_root, mode=0o700, exist_ok=True)
                os.makedirs(home, mode=0o700, exist_ok=True)
                path = os.path.join(
                    os.path.realpath(os.path.dirname(serial.path)), os.path.basename(serial.path)
                )
                if serial.type == "file":
                    fd = _open_append(path, truncate=not serial.append)
                    files.fdsets.append((next_set, fd, path))
                    files.serial_files[serial.target_port] = f"/dev/fdset/{next_set}"
                    next_set += 1
                else:
                    with contextlib.suppress(FileNotFoundError):
                        if stat.S_ISSOCK(os.lstat(path).st_mode):
                            os.unlink(path)
                    files.serial_sockets[serial.target_port] = _listen(path)
            for disk in disks:
                if disk.path in files.disk_files:
                    continue  # one image in two chains: QEMU refuses that itself
                # One descriptor, in the mode QEMU opens the image with (the command line
                # turns auto-read-only off for a passed writable image): two descriptors of
                # one image are two open file descriptions whose image locks conflict, and
                # QEMU aborts at the first permission change (a block job's, a migration's).
                files.fdsets.append((next_set, _open_disk(disk, write=disk.write), disk.path))
                files.disk_files[disk.path] = f"/dev/fdset/{next_set}"
                next_set += 1
        except BaseException:
            files.close()
            raise
        return files


@dataclass(frozen=True)
class DiskFile:
    """A disk image QEMU gets as a descriptor, opened as QEMU will use it.

    QEMU hands out a descriptor of an fdset only for the same access mode and
    ``O_DIRECT`` flag it asks for: the top image of a writable disk read-write
    (QEMU opens it so from the start), backing images read-only, ``O_DIRECT``
    for the cache modes that bypass the host's page cache.
    """

    path: str
    write: bool
    direct: bool


def _open_disk(disk: DiskFile, *, write: bool) -> int:
    flags = (os.O_RDWR if write else os.O_RDONLY) | os.O_NOFOLLOW | os.O_CLOEXEC
    if disk.direct:
        flags |= os.O_DIRECT
    try:
        return os.open(disk.path, flags)
    except OSError as err:
        hint = " (cache mode 'none'/'directsync' needs O_DIRECT)" if disk.direct else ""
        raise VmferryError(
            ErrorCode.OPERATION_FAILED,
            f"cannot open disk image {disk.path} for QEMU: {err.strerror}{hint}",
        ) from err


def _listen(path: str) -> int:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.bind(path)
        os.chmod(path, 0o600)
        sock.listen(16)
    except OSError as err:
        sock.close()
        raise VmferryError(
            ErrorCode.OPERATION_FAILED, f"cannot create socket {path}: {err.strerror}"
        ) from err
    return sock.detach()


def _open_append(path: str, *, truncate: bool) -> int:
    flags = os.O_WRONLY | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC
    flags |= os.O_TRUNC if truncate else os.O_APPEND
    try:
        return os.open(path, flags, 0o600)
    except OSError as err:
        raise VmferryError(
            ErrorCode.OPERATION_FAILED, f"cannot open {path} for QEMU: {err.strerror}"
        ) from err


def _access_problem(path: str, user: QemuUser, *, write: bool) -> str:
    """Why *user* cannot open *path* (mode bits only, as the kernel checks them), or ""."""
    groups = {user.gid}

    def allowed(st: os.stat_result, bits: int) -> bool:
        shift = 6 if st.st_uid == user.uid else 3 if st.st_gid in groups else 0
        return (st.st_mode >> shift) & bits == bits

    current = "/"
    for part in Path(path).parts[1:]:
        try:
            st = os.stat(current)
        except OSError as err:
            return f"{current}: {err.strerror}"
        if not allowed(st, 0o1):
            return f"directory {current} is not searchable"
        current = os.path.join(current, part)
    try:
        st = os.stat(path)
    except OSError as err:
        return err.strerror or "cannot stat"
    need = 0o6 if write else 0o4
    if not allowed(st, need):
        return f"mode {stat.filemode(st.st_mode)}, owner {st.st_uid}:{st.st_gid}"
    return ""
