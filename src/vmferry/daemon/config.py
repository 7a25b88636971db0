"""The daemon's configuration file (TOML), like libvirt's ``qemu.conf``.

Every key is optional; an absent file means all defaults::

    [host]
    hostname = ""            # override the hostname in host.json
    uuid = ""                # override the host UUID in host.json

    [jobs]
    wait_timeout = 30.0      # seconds a job waits for another to finish

    [migration]
    port_min = 49152         # incoming migration ports of the destination
    port_max = 49215
    listen_address = ""      # "": the address the destination host is reached by
    bandwidth_mib_s = 0      # default bandwidth limit, 0 = unlimited
    # where a client may make this host send a migration stream or call a peer daemon
    allowed_networks = ["127.0.0.0/8", "::1/128"]   # CIDRs; host names are resolved first
    allowed_listen_addresses = []   # a client's Prepare listen_address; [] = only the default
    prepare_timeout = 60.0   # s an incoming QEMU prepared without a client session may wait
    perform_stall_timeout = 60.0   # s a Perform may go without the stream moving
    perform_timeout = 0.0    # s a Perform may take at all, 0 = no overall limit
    # the contract of a live migration that names none (see docs/convergence.md)
    downtime_target_ms = 300 # the downtime the guest may see at the switchover
    deadline_s = 0.0         # complete within this long; 0 = automatic (memory / bandwidth)
    policy = "vmferry"       # the convergence policy; "none" = QEMU's and libvirt's behaviour

    [keepalive]
    interval = 5.0           # seconds between keepalive probes, 0 = off
    count = 5                # unanswered probes before the peer is dead

    [tls]
    pki_dir = "/etc/vmferry/pki"   # relative paths are relative to the file
    crl = "/etc/vmferry/crl.pem"   # revocation list (PEM); unset: PKI_DIR/crl.pem if present

    [access]                 # see docs/security-access.md
    tls_admin = ["CN=*,O=vmferry"]                 # certificates that are admin
    tls_readonly = ["CN=*,OU=read-only,O=vmferry"] # ... read-only (wins over tls_admin)
    admin_permissions = ["*"]                      # permission names or patterns
    readonly_permissions = ["api.read", "host.read", "cluster.read", "domain.read",
                            "domain.console", "events.read", "storage.read", "metrics.read"]
    readonly_socket_group = ""   # "": ?ro=1 sockets are 0666; else 0660 and this group
    audit_log = true             # also write STATE_DIR/log/audit.log (JSON lines)

    [qemu]
    emulator = "qemu-system-x86_64"
    emulators = []           # allowed <emulator> values; [] = emulator, resolved in PATH
    user = "vmferry-qemu"    # QEMU runs as this user; "" or "root" = as root (UNSAFE)
    group = "vmferry-qemu"   # and group ("" = the user's primary group)
    sandbox = true           # QEMU's seccomp filter (-sandbox on,...)
    userfaultfd = true       # give the QEMU group /dev/userfaultfd (post-copy needs it)
    trace_events = []        # QEMU trace events (-trace NAME) into QEMU's log, e.g. for
                             # ["vmstate_downtime_checkpoint"]: where a downtime went

    [paths]
    roots = ["/var/lib/vmferry/images"]   # kernel, initrd, disk paths must lie below one

    [pools.NAME]             # a storage pool of type dir (docs/storage.md), one table each
    path = "/var/lib/vmferry/pools/NAME"  # its directory (created); no pool configured:
                             # pool "default" in STATE_DIR/pools/default
    [cluster]                # see docs/cluster.md
    peers = []               # the other daemons: ["tls://host-b:16514", ...]
    lockspace = ""           # a directory every host mounts: VM leases + host heartbeats
    etcd = []                # or etcd: ["http://10.0.0.1:2379", ...] (wins over lockspace)
    etcd_ttl = 10            # seconds of this host's etcd session (guests pause at 2/3)
    uri = ""                 # how peers reach this daemon ("": its first --listen URI)
    heartbeat_interval = 5.0 # seconds between two heartbeats in the lockspace

    [limits]                 # per listener (see docs/security-robust.md)
    max_body_bytes = 4194304 # larger request bodies get 413 before being read
    max_clients = 128        # open connections; idle ones are closed to make room
    handshake_timeout = 10.0 # seconds for a TLS handshake
    idle_timeout = 30.0      # seconds a connection may sit without a request (or body data)
    error_log_interval = 10.0  # identical errors are logged once per interval, with a count

Unknown sections or keys and values of the wrong type are errors, so a typo
never goes unnoticed.
"""

from __future__ import annotations

import dataclasses
import os
import re
import tomllib
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from vmferry.daemon.access import READ_ONLY_DEFAULT
from vmferry.domain.storage_names import check_pool_name
from vmferry.errors import ErrorCode, VmferryError
from vmferry.migration.cookie import TLS_MAX_CHANNELS
from vmferry.storage.pool import PoolConfig


@dataclass
class HostConfig:
    hostname: str = ""
    uuid: str = ""


@dataclass
class JobsConfig:
    wait_timeout: float = 30.0


@dataclass
class MigrationConfig:
    port_min: int = 49152
    port_max: int = 49215
    listen_address: str = ""
    bandwidth_mib_s: int = 0
    # migration endpoints a client may ask for (see vmferry.migration.uri)
    allowed_networks: list[str] = field(default_factory=lambda: ["127.0.0.0/8", "::1/128"])
    allowed_listen_addresses: list[str] = field(default_factory=list)
    prepare_timeout: float = 60.0
    perform_stall_timeout: float = 60.0
    perform_timeout: float = 0.0
    # QEMU's TLS for the stream (vmferry.migration.tls): off (only with --tls), on, required
    tls: str = "off"
    # an encrypted stream without --parallel: this many multifd channels, each encrypting in
    # its own QEMU thread (the smaller of both hosts', docs/migration-tls.md); 0: one stream
    tls_channels: int = 2
    # the default contract (vmferry.migration.policy.contract)
    downtime_target_ms: int = 300
    deadline_s: float = 0.0
    policy: str = "vmferry"


@dataclass
class KeepaliveConfig:
    interval: float = 5.0
    count: int = 5


@dataclass
class TlsConfig:
    pki_dir: Path | None = None
    crl: Path | None = None


@dataclass
class AccessConfig:
    tls_admin: list[str] = field(default_factory=lambda: ["CN=*,O=vmferry"])
    tls_readonly: list[str] = field(default_factory=lambda: ["CN=*,OU=read-only,O=vmferry"])
    admin_permissions: list[str] = field(default_factory=lambda: ["*"])
    readonly_permissions: list[str] = field(default_factory=lambda: list(READ_ONLY_DEFAULT))
    readonly_socket_group: str = ""
    audit_log: bool = True


@dataclass
class QemuConfig:
    emulator: str = "qemu-system-x86_64"
    emulators: list[str] = field(default_factory=list)
    user: str = "vmferry-qemu"
    group: str = "vmferry-qemu"
    sandbox: bool = True
    userfaultfd: bool = True
    #: QEMU trace event names or patterns (``-trace``), logged to QEMU's log.
    trace_events: list[str] = field(default_factory=list)


@dataclass
class PathsConfig:
    roots: list[str] = field(default_factory=lambda: ["/var/lib/vmferry/images"])


@dataclass
class ClusterConfig:
    peers: list[str] = field(default_factory=list)
    lockspace: str = ""
    etcd: list[str] = field(default_factory=list)
    etcd_ttl: int = 10
    uri: str = ""
    heartbeat_interval: float = 5.0


@dataclass
class EvacuateConfig:
    """``vmferry evacuate``: what the planner assumes when the request does not say."""

    link_mib_s: int = 1000  # bandwidth of the link to each destination
    downtime_target_ms: int = 300  # every guest's downtime target


@dataclass
class LimitsConfig:
    max_body_bytes: int = 4 * 1024 * 1024
    max_clients: int = 128
    handshake_timeout: float = 10.0
    idle_timeout: float = 30.0
    error_log_interval: float = 10.0


@dataclass
class DaemonConfig:
    """All settings of ``vmferryd``, one attribute per TOML section."""

    host: HostConfig = field(default_factory=HostConfig)
    jobs: JobsConfig = field(default_factory=JobsConfig)
    migration: MigrationConfig = field(default_factory=MigrationConfig)
    keepalive: KeepaliveConfig = field(default_factory=KeepaliveConfig)
    tls: TlsConfig = field(default_factory=TlsConfig)
    qemu: QemuConfig = field(default_factory=QemuConfig)
    access: AccessConfig = field(default_factory=AccessConfig)
    limits: LimitsConfig = field(default_factory=LimitsConfig)
    evacuate: EvacuateConfig = field(default_factory=EvacuateConfig)
    paths: PathsConfig = field(default_factory=PathsConfig)
    #: ``[pools.NAME]`` tables, by name (empty: the daemon makes the pool ``default``).
    pools: dict[str, PoolConfig] = field(default_factory=dict)
    cluster: ClusterConfig = field(default_factory=ClusterConfig)


# A key accepts the type of its default; these (default None) take a path instead.
#: ``[qemu] trace_events``: how many, and what a name may be (QEMU's event names, ``*``).
MAX_TRACE_EVENTS = 64
_TRACE_EVENT = re.compile(r"[A-Za-z0-9_*]{1,100}")

_PATH_FIELDS = {("tls", "pki_dir"), ("tls", "crl")}


def _convert(where: str, key: str, expected: type, value: Any, base: Path) -> Any:
    def wrong(kind: str) -> VmferryError:
        return VmferryError(
            ErrorCode.INVALID_ARG,
            f"{where}: {key} must be {kind}, not {type(value).__name__} {value!r}",
        )

    # bool is an int subclass in Python, but `port_min = true` is a mistake.
    if expected is Path:
        if not isinstance(value, str) or not value:
            raise wrong("a non-empty path string")
        path = Path(value).expanduser()
        return path if path.is_absolute() else base / path
    if expected is bool:
        if not isinstance(value, bool):
            raise wrong("true or false")
        return value
    if expected is float:
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise wrong("a number")
        return float(value)
    if expected is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise wrong("an integer")
        return value
    if expected is bool:
        if not isinstance(value, bool):
            raise wrong("true or false")
        return value
    if expected is str:
        if not isinstance(value, str):
            raise wrong("a string")
        return value
    if expected is list:
        if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
            raise wrong("a list of strings")
        return list(value)
    raise AssertionError(f"no converter for {expected}")


def _check(where: str, config: DaemonConfig) -> None:
    def bad(message: str) -> VmferryError:
        return VmferryError(ErrorCode.INVALID_ARG, f"{where}: {message}")

    if config.host.uuid:
        try:
            config.host.uuid = str(uuid.UUID(config.host.uuid))
        except ValueError:
            raise bad(f"host.uuid {config.host.uuid!r} is not a UUID") from None
    if config.jobs.wait_timeout <= 0:
        raise bad("jobs.wait_timeout must be > 0")
    mig = config.migration
    for key in ("port_min", "port_max"):
        if not 1 <= getattr(mig, key) <= 65535:
            raise bad(f"migration.{key} must be between 1 and 65535")
    if mig.port_min > mig.port_max:
        raise bad("migration.port_min must not be greater than migration.port_max")
    if mig.bandwidth_mib_s < 0:
        raise bad("migration.bandwidth_mib_s must be >= 0 (0 = unlimited)")
    _check_migration_endpoints(where, mig)
    if not 1 <= config.evacuate.link_mib_s <= 1_000_000:
        raise bad("evacuate.link_mib_s must be between 1 and 1000000")
    if not 1 <= config.evacuate.downtime_target_ms <= 600_000:
        raise bad("evacuate.downtime_target_ms must be between 1 and 600000")
    if config.keepalive.interval < 0:
        raise bad("keepalive.interval must be >= 0 (0 = off)")
    if config.keepalive.count < 1:
        raise bad("keepalive.count must be >= 1")
    if not config.qemu.emulator:
        raise bad("qemu.emulator must not be empty")
    if len(config.qemu.trace_events) > MAX_TRACE_EVENTS:
        raise bad(f"qemu.trace_events: at most {MAX_TRACE_EVENTS} names")
    for name in config.qemu.trace_events:
        # a name or a pattern, never another -trace option (file=, events=)
        if not isinstance(name, str) or not _TRACE_EVENT.fullmatch(name):
            raise bad(f"qemu.trace_events: {name!r} is not a QEMU trace event name or pattern")
    for key, values in (
        ("qemu.emulators", config.qemu.emulators),
        ("paths.roots", config.paths.roots),
    ):
        for value in values:
            if not value.startswith("/"):
                raise bad(f"{key}: {value!r} is not an absolute path")
    _check_limits(config.limits, bad)
    _check_cluster(config.cluster, bad)


def _check_cluster(cluster: ClusterConfig, bad: Callable[[str], VmferryError]) -> None:
    if cluster.lockspace and not cluster.lockspace.startswith("/"):
        raise bad(f"cluster.lockspace: {cluster.lockspace!r} is not an absolute path")
    for uri in [*cluster.peers, *([cluster.uri] if cluster.uri else [])]:
        if not uri.startswith(("tls://", "tcp://", "unix:///")):
            raise bad(f"cluster: {uri!r} is not a daemon URI (tls://HOST:PORT)")
    for url in cluster.etcd:
        if not url.startswith(("http://", "https://")):
            raise bad(f"cluster.etcd: {url!r} is not an etcd URL (http://HOST:2379)")
    if cluster.etcd_ttl < 3:
        raise bad("cluster.etcd_ttl must be >= 3 seconds")
    if cluster.heartbeat_interval <= 0:
        raise bad("cluster.heartbeat_interval must be > 0")


def _check_limits(limits: LimitsConfig, bad: Callable[[str], VmferryError]) -> None:
    if limits.max_body_bytes < 1024:
        raise bad("limits.max_body_bytes must be >= 1024")
    if limits.max_clients < 1:
        raise bad("limits.max_clients must be >= 1")
    for key in ("handshake_timeout", "idle_timeout"):
        if getattr(limits, key) <= 0:
            raise bad(f"limits.{key} must be > 0")
    if limits.error_log_interval < 0:
        raise bad("limits.error_log_interval must be >= 0 (0 = log every error)")


def _check_migration_endpoints(where: str, mig: MigrationConfig) -> None:
    from vmferry.migration.uri import check_host, parse_networks

    try:
        parse_networks(mig.allowed_networks)
        for address in [mig.listen_address, *mig.allowed_listen_addresses]:
            if address:
                check_host(address, "listen address")
    except VmferryError as err:
        raise VmferryError(ErrorCode.INVALID_ARG, f"{where}: migration: {err.message}") from None
    for key in ("prepare_timeout", "perform_stall_timeout"):
        if getattr(mig, key) <= 0:
            raise VmferryError(ErrorCode.INVALID_ARG, f"{where}: migration.{key} must be > 0")
    if mig.tls not in ("off", "on", "required"):
        raise VmferryError(
            ErrorCode.INVALID_ARG,
            f'{where}: migration.tls must be "off", "on" or "required", not {mig.tls!r}',
        )
    if not 0 <= mig.tls_channels <= TLS_MAX_CHANNELS:
        raise VmferryError(
            ErrorCode.INVALID_ARG,
            f"{where}: migration.tls_channels must be 0 (one stream) to {TLS_MAX_CHANNELS}",
        )
    if mig.perform_timeout < 0:
        raise VmferryError(
            ErrorCode.INVALID_ARG, f"{where}: migration.perform_timeout must be >= 0 (0 = none)"
        )
    _check_contract(where, mig)


def _check_contract(where: str, mig: MigrationConfig) -> None:
    from vmferry.migration.params import MAX_DOWNTIME_MS, MAX_SECONDS
    from vmferry.migration.policy.spec import builtin_names

    if not 1 <= mig.downtime_target_ms <= MAX_DOWNTIME_MS:
        raise VmferryError(
            ErrorCode.INVALID_ARG,
            f"{where}: migration.downtime_target_ms must be between 1 and {MAX_DOWNTIME_MS}",
        )
    if not 0 <= mig.deadline_s <= MAX_SECONDS:
        raise VmferryError(
            ErrorCode.INVALID_ARG,
            f"{where}: migration.deadline_s must be between 0 (automatic) and {MAX_SECONDS:g}",
        )
    if mig.policy not in builtin_names():
        raise VmferryError(
            ErrorCode.INVALID_ARG,
            f"{where}: migration.policy {mig.policy!r} is not a built-in policy "
            f"({', '.join(builtin_names())})",
        )


def _load_pools(where: str, table: Any, base: Path) -> dict[str, PoolConfig]:
    def bad(message: str) -> VmferryError:
        return VmferryError(ErrorCode.INVALID_ARG, f"{where}: {message}")

    if not isinstance(table, dict):
        raise bad('pools must be tables [pools.NAME] with path = "..."')
    pools: dict[str, PoolConfig] = {}
    for name, pool in table.items():
        try:
            check_pool_name(name)
        except VmferryError as err:
            raise bad(f"[pools.{name}]: {err.message}") from None
        if not isinstance(pool, dict):
            raise bad(f'pools.{name} must be a table [pools.{name}] with path = "..."')
        unknown = sorted(set(pool) - {"path"})
        if unknown:
            raise bad(f"unknown key pools.{name}.{unknown[0]} (known in [pools.{name}]: path)")
        if "path" not in pool:
            raise bad(f'[pools.{name}] needs path = "..."')
        pool_path = _convert(where, f"pools.{name}.path", Path, pool["path"], base)
        pools[name] = PoolConfig(name, Path(os.path.normpath(pool_path)))
    seen: list[PoolConfig] = []
    for pool in pools.values():
        for other in seen:
            if (
                pool.path == other.path
                or other.path in pool.path.parents
                or (pool.path in other.path.parents)
            ):
                raise bad(
                    f"pools '{other.name}' and '{pool.name}' overlap "
                    f"({other.path}, {pool.path}): each pool needs its own directory"
                )
        seen.append(pool)
    return pools


def load_config(path: Path | None) -> DaemonConfig:
    """
    Read the daemon's configuration file.

    :param path: The TOML file, or None for all defaults.
    :raise VmferryError: ``INVALID_ARG`` naming the file and key on any
        unreadable file, syntax error, unknown key or wrong value.
    """
    config = DaemonConfig()
    if path is None:
        return config
    path = Path(path)
    where = str(path)
    try:
        with path.open("rb") as f:
            data = tomllib.load(f)
    except FileNotFoundError:
        raise VmferryError(ErrorCode.INVALID_ARG, f"config file {path} does not exist") from None
    except OSError as exc:
        raise VmferryError(
            ErrorCode.INVALID_ARG, f"cannot read config file {path}: {exc.strerror}"
        ) from exc
    except tomllib.TOMLDecodeError as exc:
        raise VmferryError(ErrorCode.INVALID_ARG, f"{where}: invalid TOML: {exc}") from exc

    base = path.absolute().parent
    sections = {f.name: getattr(config, f.name) for f in dataclasses.fields(config)}
    del sections["pools"]  # a table of tables, read by _load_pools
    for section_name, table in data.items():
        if section_name == "pools":
            config.pools = _load_pools(where, table, base)
            continue
        if section_name not in sections:
            raise VmferryError(
                ErrorCode.INVALID_ARG,
                f"{where}: unknown section [{section_name}] (known: {', '.join(sorted(sections))})",
            )
        if not isinstance(table, dict):
            raise VmferryError(
                ErrorCode.INVALID_ARG, f"{where}: {section_name} must be a [{section_name}] table"
            )
        section = sections[section_name]
        defaults = {f.name: getattr(section, f.name) for f in dataclasses.fields(section)}
        for key, value in table.items():
            full_key = f"{section_name}.{key}"
            if key not in defaults:
                raise VmferryError(
                    ErrorCode.INVALID_ARG,
                    f"{where}: unknown key {full_key} (known in [{section_name}]: "
                    f"{', '.join(sorted(defaults))})",
                )
            expected = Path if (section_name, key) in _PATH_FIELDS else type(defaults[key])
            setattr(section, key, _convert(where, full_key, expected, value, base))
    _check(where, config)
    return config
