"""Migration parameters and how they become QEMU capabilities and parameters.

libvirt's ``qemu_migration_params.c``, reduced to what vmferry offers. One
``migrate-set-capabilities`` and at most one ``migrate-set-parameters`` per
side: round trips are the cost a migration pays on top of QEMU's own work.
"""

from __future__ import annotations

import math
import re
from typing import TYPE_CHECKING, Any, TypeVar, dataclass_transform

from vmferry.errors import ErrorCode, VmferryError
from vmferry.logs import is_migration_id
from vmferry.migration.flags import MigrateFlags

if TYPE_CHECKING:  # only for the annotations: the client and CLI import this module
    from vmferry.qemu.monitor import Monitor, QmpCommand

MIB = 1 << 20
# "Unlimited": QEMU's own default (128 MiB/s) must never be the silent cap.
UNLIMITED_BANDWIDTH = 1 << 40

R = TypeVar("R")


@dataclass_transform()
def _record(cls: type[R]) -> type[R]:
    """
    A dataclass of immutable defaults, without ``dataclasses``: keyword ``__init__``,
    ``__eq__`` and ``__repr__`` from the annotated fields (type checkers see a dataclass).

    ``vmferry migrate`` builds :class:`MigrationParams`; importing ``dataclasses``
    (and ``inspect`` with it) was a tenth of the process's start (issue 10).
    """
    names = tuple(cls.__annotations__)
    defaults = {name: getattr(cls, name) for name in names}

    def __init__(self: Any, **values: Any) -> None:
        unknown = values.keys() - defaults.keys()
        if unknown:
            raise TypeError(f"{cls.__name__}() got unexpected field(s): {sorted(unknown)}")
        for name in names:
            setattr(self, name, values.get(name, defaults[name]))

    def __eq__(self: Any, other: object) -> bool:
        if other.__class__ is not self.__class__:
            return NotImplemented
        return all(getattr(self, n) == getattr(other, n) for n in names)

    def __repr__(self: Any) -> str:
        fields = ", ".join(f"{n}={getattr(self, n)!r}" for n in names)
        return f"{cls.__name__}({fields})"

    # __hash__ None: mutable, as a dataclass's
    methods = {"__init__": __init__, "__eq__": __eq__, "__repr__": __repr__, "__hash__": None}
    for name, method in methods.items():
        setattr(cls, name, method)
    return cls


@_record
class MigrationParams:
    """Everything a migration can be tuned with, beyond its flags."""

    bandwidth_mib_s: int = 0  # 0: unlimited
    downtime_limit_ms: int | None = None
    parallel_connections: int = 0  # multifd channels, with MigrateFlags.PARALLEL
    timeout_suspend_s: float = 0.0  # suspend the guest after this long so the migration completes
    migrate_uri: str = ""  # where the source sends the stream (tcp:host:port)
    listen_address: str = ""  # where the destination listens
    dname: str = ""
    dest_xml: str = ""
    postcopy_bandwidth_mib_s: int = 0
    # switch to post-copy once the first full pre-copy pass is over (the source daemon does it)
    postcopy_after_precopy: bool = False
    # after a post-copy failure the source daemon resumes by itself once the peer answers
    postcopy_autoresume: bool = True
    # convergence policy (vmferry.migration.policy): a built-in name or a policy's TOML text
    policy: str = ""
    downtime_target_ms: int = 0  # the contract: 0: none (QEMU's limit)
    deadline_s: float = 0.0  # the contract: complete within this long, else abort; 0: none
    # --compressed's method: xbzrle (default) or zstd (multifd, the default with --parallel)
    compression: str = ""
    # the disks a storage migration copies, by target ("vda,vdb"); "": every writable
    # non-shared disk (libvirt's migrate_disks)
    migrate_disks: str = ""
    # one id per migration, in both daemons' logs and the client's (vmferry.logs)
    migration_id: str = ""

    def to_dict(self) -> dict[str, Any]:
        return {name: getattr(self, name) for name in _FIELDS}

    def copy(self, **changes: Any) -> MigrationParams:
        """A copy with *changes* (``dataclasses.replace``)."""
        return MigrationParams(**{**self.to_dict(), **changes})

    @classmethod
    def from_dict(cls, data: dict[str, Any] | None) -> MigrationParams:
        """
        The parameters a client sent, each of its own type and within its bounds.

        :raise VmferryError: ``INVALID_ARG`` naming the parameter: unknown,
            wrongly typed, out of range, non-finite or too long.
        """
        if not data:
            return cls()
        if not isinstance(data, dict):
            raise VmferryError(ErrorCode.INVALID_ARG, "migration parameters must be an object")
        known = set(_FIELDS)
        unknown = {str(k)[:40] for k in data} - known
        if unknown:
            raise VmferryError(
                ErrorCode.INVALID_ARG,
                f"unknown migration parameter(s): {', '.join(sorted(unknown)[:10])}",
            )
        return cls(**{key: _checked(key, value) for key, value in data.items()})

    def validate(self, flags: MigrateFlags) -> None:
        if self.bandwidth_mib_s < 0:
            raise VmferryError(ErrorCode.INVALID_ARG, "bandwidth must not be negative")
        if self.parallel_connections and not flags & MigrateFlags.PARALLEL:
            raise VmferryError(ErrorCode.INVALID_ARG, "parallel connections need the parallel flag")
        self._validate_compression(flags)
        if flags & MigrateFlags.TUNNELLED and (
            flags & MigrateFlags.PARALLEL or flags & MigrateFlags.POSTCOPY
        ):
            # one migration stream: no multifd channels; no return path (post-copy) enabled
            raise VmferryError(
                ErrorCode.INVALID_ARG,
                "a tunnelled migration cannot be parallel or post-copy (no return path)",
            )
        if flags & MigrateFlags.TUNNELLED and flags & MigrateFlags.TLS:
            raise VmferryError(
                ErrorCode.INVALID_ARG,
                "--tls and --tunnelled do not go together: a tunnelled stream is already "
                "inside the daemons' TLS connection",
            )
        if flags & MigrateFlags.OFFLINE:
            if not flags & MigrateFlags.PERSIST_DEST:
                raise VmferryError(ErrorCode.INVALID_ARG, "offline migration requires --persistent")
            if flags & MigrateFlags.LIVE:
                raise VmferryError(
                    ErrorCode.INVALID_ARG, "--live and --offline are mutually exclusive"
                )
        self._validate_postcopy(flags)
        self._validate_storage(flags)
        self._validate_policy()

    def _validate_compression(self, flags: MigrateFlags) -> None:
        if self.compression and not flags & MigrateFlags.COMPRESSED:
            raise VmferryError(ErrorCode.INVALID_ARG, "a compression method needs --compressed")
        method = compression_method(flags, self)
        if method == "xbzrle" and flags & MigrateFlags.PARALLEL:
            raise VmferryError(
                ErrorCode.INVALID_ARG,
                "xbzrle compression cannot be used with parallel migration (use zstd)",
            )
        if method == "zstd" and not flags & MigrateFlags.PARALLEL:
            raise VmferryError(
                ErrorCode.INVALID_ARG, "zstd compression needs parallel migration (--parallel N)"
            )

    def _validate_storage(self, flags: MigrateFlags) -> None:
        copy = flags & MigrateFlags.copy_storage()
        if copy == MigrateFlags.copy_storage():
            raise VmferryError(
                ErrorCode.INVALID_ARG,
                "--copy-storage-all and --copy-storage-inc are mutually exclusive",
            )
        if not copy and (flags & MigrateFlags.NON_SHARED_SYNCHRONOUS_WRITES or self.migrate_disks):
            raise VmferryError(
                ErrorCode.INVALID_ARG,
                "--migrate-disks and --copy-storage-synchronous-writes require "
                "--copy-storage-all or --copy-storage-inc",
            )
        if copy and flags & MigrateFlags.OFFLINE:
            raise VmferryError(
                ErrorCode.INVALID_ARG, "offline migration cannot copy non-shared storage"
            )
        if copy and flags & MigrateFlags.POSTCOPY:
            raise VmferryError(
                ErrorCode.NO_SUPPORT, "post-copy migration cannot copy non-shared storage yet"
            )

    def disk_targets(self) -> list[str]:
        """``migrate_disks`` as a list of targets (empty: the default selection)."""
        return [t for t in self.migrate_disks.split(",") if t]

    def _validate_postcopy(self, flags: MigrateFlags) -> None:
        postcopy = bool(flags & MigrateFlags.POSTCOPY)
        if flags & MigrateFlags.POSTCOPY_RESUME and not postcopy:
            raise VmferryError(ErrorCode.INVALID_ARG, "--postcopy-resume requires --postcopy")
        if postcopy and not flags & MigrateFlags.LIVE and not flags & MigrateFlags.POSTCOPY_RESUME:
            raise VmferryError(ErrorCode.INVALID_ARG, "post-copy migration requires --live")
        if postcopy and flags & MigrateFlags.PAUSED:
            raise VmferryError(
                ErrorCode.INVALID_ARG,
                "post-copy migration cannot leave the guest paused (--suspend)",
            )
        if self.postcopy_after_precopy and not postcopy:
            raise VmferryError(
                ErrorCode.INVALID_ARG, "--postcopy-after-precopy requires --postcopy"
            )
        if self.postcopy_bandwidth_mib_s < 0:
            raise VmferryError(ErrorCode.INVALID_ARG, "post-copy bandwidth must not be negative")

    def _validate_policy(self) -> None:
        if self.downtime_target_ms < 0 or self.deadline_s < 0:
            raise VmferryError(
                ErrorCode.INVALID_ARG, "downtime target and deadline must not be negative"
            )
        if self.policy:
            from vmferry.migration.policy.spec import load_policy  # the policy imports this module

            load_policy(self.policy)


#: The parameters' names, in their order.
_FIELDS = tuple(MigrationParams.__annotations__)


# Bounds of each parameter (QEMU's own where it has one: downtime-limit <= 2000 s,
# multifd-channels <= 255); a client's value outside them is refused, never sent on.
MAX_BANDWIDTH_MIB_S = 1 << 24  # 16 TiB/s: beyond any link
MAX_DOWNTIME_MS = 2_000_000
MAX_CHANNELS = 255
MAX_SECONDS = 10_000_000.0  # about 115 days
# a disk target as libvirt names them (vda, sdb, hdc, vdaa)
_DISK_TARGET = re.compile(r"(?:vd|sd|hd)[a-z]{1,3}")
MAX_TEXT = {
    "migrate_disks": 400,
    "dest_xml": 1 << 20,
    "policy": 64 << 10,
    "migrate_uri": 300,
    "listen_address": 253,
}
_INTS = {
    "bandwidth_mib_s": MAX_BANDWIDTH_MIB_S,
    "postcopy_bandwidth_mib_s": MAX_BANDWIDTH_MIB_S,
    "downtime_limit_ms": MAX_DOWNTIME_MS,
    "downtime_target_ms": MAX_DOWNTIME_MS,
    "parallel_connections": MAX_CHANNELS,
}
_FLOATS = ("timeout_suspend_s", "deadline_s")
#: ``compression`` values ("" : the default of the flags).
COMPRESSION_METHODS = ("", "xbzrle", "zstd")
_BOOLS = ("postcopy_after_precopy", "postcopy_autoresume")


def _checked(key: str, value: Any) -> Any:
    """*value* of parameter *key* if its type and range are right (see the bounds above)."""

    def bad(why: str) -> VmferryError:
        return VmferryError(ErrorCode.INVALID_ARG, f"migration parameter '{key}' {why}")

    if key in _INTS:
        if key == "downtime_limit_ms" and value is None:
            return None
        if isinstance(value, bool) or not isinstance(value, int):
            raise bad("must be an integer")
        if not 0 <= value <= _INTS[key]:
            raise bad(f"must be between 0 and {_INTS[key]}")
        return value
    if key in _FLOATS:
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise bad("must be a number of seconds")
        if isinstance(value, int) and value > MAX_SECONDS:
            raise bad(f"must be between 0 and {MAX_SECONDS:g}")
        seconds = float(value)
        if not math.isfinite(seconds) or not 0 <= seconds <= MAX_SECONDS:
            raise bad(f"must be between 0 and {MAX_SECONDS:g}")
        return seconds
    if key in _BOOLS:
        if not isinstance(value, bool):
            raise bad("must be true or false")
        return value
    if not isinstance(value, str):
        raise bad("must be a string")
    if len(value) > MAX_TEXT.get(key, 64):
        raise bad(f"is longer than {MAX_TEXT.get(key, 64)} characters")
    # Imported here: `vmferry migrate` imports this module, and these two load the XML
    # parser, asyncio and ipaddress, needed only when the values are given.
    if value and key == "migrate_uri":
        from vmferry.migration.uri import parse_migration_uri

        parse_migration_uri(value)
    elif value and key == "listen_address":
        from vmferry.migration.uri import check_host

        check_host(value, "listen address")
    elif key == "compression" and value not in COMPRESSION_METHODS:
        raise bad(f"must be one of {', '.join(COMPRESSION_METHODS)}")
    elif key == "migrate_disks" and value:
        targets = value.split(",")
        if not all(_DISK_TARGET.fullmatch(t) for t in targets) or len(set(targets)) != len(targets):
            raise bad("must be distinct disk targets separated by commas (vda,vdb)")
    elif key == "migration_id" and value and not is_migration_id(value):
        raise bad("must be 1-64 letters, digits, '.', '_', ':' or '-'")
    elif key == "dname" and value:
        from vmferry.domain.xml import _validate_name as validate_name

        try:
            validate_name(value)
        except VmferryError as err:
            raise bad(f"is not a valid domain name: {err.message}") from None
    return value


def compression_method(flags: MigrateFlags, params: MigrationParams) -> str:
    """What ``--compressed`` means here: "" (off), ``xbzrle`` or multifd's ``zstd``."""
    if not flags & MigrateFlags.COMPRESSED:
        return ""
    return params.compression or ("zstd" if flags & MigrateFlags.PARALLEL else "xbzrle")


def capabilities(flags: MigrateFlags, *, source: bool) -> dict[str, bool]:
    """The capabilities one side sets for a migration with *flags*."""
    caps = {
        # tunnelled: the return path is not enabled (the pipe could carry it; post-copy untested)
        "return-path": not flags & MigrateFlags.TUNNELLED,
        "multifd": bool(flags & MigrateFlags.PARALLEL),
        "postcopy-ram": bool(flags & MigrateFlags.POSTCOPY),
    }
    if source:
        caps["auto-converge"] = bool(flags & MigrateFlags.AUTO_CONVERGE)
        # with --parallel, --compressed is multifd's zstd (validate refuses xbzrle there)
        caps["xbzrle"] = bool(flags & MigrateFlags.COMPRESSED and not flags & MigrateFlags.PARALLEL)
        # storage: QEMU waits with the vCPUs stopped until the mirrors drained (libvirt's too)
        caps["pause-before-switchover"] = bool(flags & MigrateFlags.copy_storage())
    return caps


def parameters(params: MigrationParams, flags: MigrateFlags, *, source: bool) -> dict[str, Any]:
    out: dict[str, Any] = {}
    if flags & MigrateFlags.PARALLEL and params.parallel_connections:
        out["multifd-channels"] = params.parallel_connections
    if compression_method(flags, params) == "zstd":
        out["multifd-compression"] = "zstd"  # both sides: the destination decompresses
    if source:
        bandwidth = params.bandwidth_mib_s * MIB if params.bandwidth_mib_s else UNLIMITED_BANDWIDTH
        out["max-bandwidth"] = bandwidth
        if params.downtime_limit_ms is not None:
            out["downtime-limit"] = params.downtime_limit_ms
        if params.postcopy_bandwidth_mib_s:
            out["max-postcopy-bandwidth"] = params.postcopy_bandwidth_mib_s * MIB
    return out


def resume_parameters(params: MigrationParams) -> dict[str, Any]:
    """The parameters a post-copy resume may set again (libvirt: only the post-copy bandwidth)."""
    if params.postcopy_bandwidth_mib_s:
        return {"max-postcopy-bandwidth": params.postcopy_bandwidth_mib_s * MIB}
    return {}


async def apply(
    mon: Monitor,
    params: MigrationParams,
    flags: MigrateFlags,
    *,
    source: bool,
    extra: dict[str, Any] | None = None,
) -> None:
    """Set this migration's capabilities and parameters (*extra*: e.g. TLS's) in QEMU.

    One after the other: a QEMU that refuses a capability gets no parameters (the source
    runs on with its own).
    """
    for cmd, args in commands(params, flags, source=source, extra=extra):
        await mon.execute(cmd, args)


def commands(
    params: MigrationParams,
    flags: MigrateFlags,
    *,
    source: bool,
    extra: dict[str, Any] | None = None,
) -> list[QmpCommand]:
    """The QMP commands of :func:`apply`, for a caller that pipelines them with its own
    (a new incoming QEMU, killed if any fails)."""
    caps = capabilities(flags, source=source)
    out: list[QmpCommand] = [
        (
            "migrate-set-capabilities",
            {"capabilities": [{"capability": k, "state": v} for k, v in caps.items()]},
        )
    ]
    values = {**parameters(params, flags, source=source), **(extra or {})}
    if values:
        out.append(("migrate-set-parameters", values))
    return out


async def reset(mon: Monitor, flags: MigrateFlags, *, source: bool) -> None:
    """Switch this migration's capabilities off again (after a cancelled migration)."""
    caps = capabilities(flags, source=source)
    await mon.execute(
        "migrate-set-capabilities",
        {"capabilities": [{"capability": k, "state": False} for k, v in caps.items() if v]},
    )
