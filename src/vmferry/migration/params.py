"""Migration parameters and how they become QEMU capabilities and parameters.

libvirt's ``qemu_migration_params.c``, reduced to what vmferry offers. One
``migrate-set-capabilities`` and at most one ``migrate-set-parameters`` per
side: round trips are the cost a migration pays on top of QEMU's own work.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Any

from vmferry.errors import ErrorCode, VmferryError
from vmferry.migration.flags import MigrateFlags

if TYPE_CHECKING:  # only for the annotations: the client and CLI import this module
    from vmferry.qemu.monitor import Monitor

MIB = 1 << 20
# "Unlimited": QEMU's own default (128 MiB/s) must never be the silent cap.
UNLIMITED_BANDWIDTH = 1 << 40


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
        """
        The parameters a client sent, each of its own type and within its bounds.

        :raise VmferryError: ``INVALID_ARG`` naming the parameter: unknown,
            wrongly typed, out of range, non-finite or too long.
        """
        if not data:
            return cls()
        if not isinstance(data, dict):
            raise VmferryError(ErrorCode.INVALID_ARG, "migration parameters must be an object")
        known = set(cls.__dataclass_fields__)
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


# Bounds of each parameter (QEMU's own where it has one: downtime-limit <= 2000 s,
# multifd-channels <= 255); a client's value outside them is refused, never sent on.
MAX_BANDWIDTH_MIB_S = 1 << 24  # 16 TiB/s: beyond any link
MAX_DOWNTIME_MS = 2_000_000
MAX_CHANNELS = 255
MAX_SECONDS = 10_000_000.0  # about 115 days
MAX_TEXT = {"dest_xml": 1 << 20, "policy": 64 << 10, "migrate_uri": 300, "listen_address": 253}
_INTS = {
    "bandwidth_mib_s": MAX_BANDWIDTH_MIB_S,
    "postcopy_bandwidth_mib_s": MAX_BANDWIDTH_MIB_S,
    "downtime_limit_ms": MAX_DOWNTIME_MS,
    "downtime_target_ms": MAX_DOWNTIME_MS,
    "parallel_connections": MAX_CHANNELS,
}
_FLOATS = ("timeout_suspend_s", "deadline_s")
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
    elif key == "dname" and value:
        from vmferry.domain.xml import _validate_name as validate_name

        try:
            validate_name(value)
        except VmferryError as err:
            raise bad(f"is not a valid domain name: {err.message}") from None
    return value


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
