"""Migration parameters and how they become QEMU capabilities and parameters.

libvirt's ``qemu_migration_params.c``, reduced to what vmferry offers. One
``migrate-set-capabilities`` and at most one ``migrate-set-parameters`` per
side: round trips are the cost a migration pays on top of QEMU's own work.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any

from vmferry.errors import ErrorCode, VmferryError
from vmferry.migration.flags import MigrateFlags
from vmferry.qemu.monitor import Monitor

MIB = 1 << 20
# "Unlimited": QEMU's own default (128 MiB/s) must never be the silent cap.
UNLIMITED_BANDWIDTH = 1 << 40


# A parameter's integers must fit QEMU's int64 parameters.
_INT_MAX = (1 << 63) - 1


def _check_type(key: str, annotation: str, value: Any) -> None:
    """Refuse a parameter of the wrong JSON type (a client's typo must not become a 500)."""
    if value is None and annotation.endswith("| None"):
        return
    kind = annotation.removesuffix(" | None")
    if kind == "bool":
        ok = isinstance(value, bool)
    elif kind == "int":
        ok = isinstance(value, int) and not isinstance(value, bool) and abs(value) <= _INT_MAX
    elif kind == "float":
        ok = (
            isinstance(value, int | float)
            and not isinstance(value, bool)
            and math.isfinite(value)
            and abs(value) <= _INT_MAX
        )
    else:
        ok = isinstance(value, str)
    if not ok:
        what = {"int": "an integer", "float": "a finite number", "bool": "true or false"}
        raise VmferryError(
            ErrorCode.INVALID_ARG,
            f"migration parameter {key} must be {what.get(kind, 'a string')}",
        )


@dataclass
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

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any] | None) -> MigrationParams:
        if not data:
            return cls()
        known = set(cls.__dataclass_fields__)
        unknown = set(data) - known
        if unknown:
            raise VmferryError(
                ErrorCode.INVALID_ARG,
                f"unknown migration parameter(s): {', '.join(sorted(unknown))}",
            )
        for key, value in data.items():
            _check_type(key, str(cls.__dataclass_fields__[key].type), value)
        return cls(**data)

    def validate(self, flags: MigrateFlags) -> None:
        if self.bandwidth_mib_s < 0:
            raise VmferryError(ErrorCode.INVALID_ARG, "bandwidth must not be negative")
        if self.parallel_connections and not flags & MigrateFlags.PARALLEL:
            raise VmferryError(ErrorCode.INVALID_ARG, "parallel connections need the parallel flag")
        if flags & MigrateFlags.PARALLEL and flags & MigrateFlags.COMPRESSED:
            raise VmferryError(
                ErrorCode.INVALID_ARG, "xbzrle compression cannot be used with parallel migration"
            )
        if flags & MigrateFlags.OFFLINE:
            if not flags & MigrateFlags.PERSIST_DEST:
                raise VmferryError(ErrorCode.INVALID_ARG, "offline migration requires --persistent")
            if flags & MigrateFlags.LIVE:
                raise VmferryError(
                    ErrorCode.INVALID_ARG, "--live and --offline are mutually exclusive"
                )
        self._validate_postcopy(flags)
        self._validate_policy()

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


def capabilities(flags: MigrateFlags, *, source: bool) -> dict[str, bool]:
    """The capabilities one side sets for a migration with *flags*."""
    caps = {
        "return-path": True,
        "multifd": bool(flags & MigrateFlags.PARALLEL),
        "postcopy-ram": bool(flags & MigrateFlags.POSTCOPY),
    }
    if source:
        caps["auto-converge"] = bool(flags & MigrateFlags.AUTO_CONVERGE)
        caps["xbzrle"] = bool(flags & MigrateFlags.COMPRESSED)
    return caps


def parameters(params: MigrationParams, flags: MigrateFlags, *, source: bool) -> dict[str, Any]:
    out: dict[str, Any] = {}
    if flags & MigrateFlags.PARALLEL and params.parallel_connections:
        out["multifd-channels"] = params.parallel_connections
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
    mon: Monitor, params: MigrationParams, flags: MigrateFlags, *, source: bool
) -> None:
    caps = capabilities(flags, source=source)
    await mon.execute(
        "migrate-set-capabilities",
        {"capabilities": [{"capability": k, "state": v} for k, v in caps.items()]},
    )
    values = parameters(params, flags, source=source)
    if values:
        await mon.execute("migrate-set-parameters", values)


async def reset(mon: Monitor, flags: MigrateFlags, *, source: bool) -> None:
    """Switch this migration's capabilities off again (after a cancelled migration)."""
    caps = capabilities(flags, source=source)
    await mon.execute(
        "migrate-set-capabilities",
        {"capabilities": [{"capability": k, "state": False} for k, v in caps.items() if v]},
    )
