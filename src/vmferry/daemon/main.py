"""``vmferryd``: the per-host daemon that owns this host's QEMU domains."""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import signal
import subprocess
import sys
from pathlib import Path

from vmferry import logformat, trace
from vmferry.daemon.access import AccessPolicy
from vmferry.daemon.api import create_app
from vmferry.daemon.autostart import autostart_domains
from vmferry.daemon.cluster import Membership
from vmferry.daemon.config import DaemonConfig, load_config
from vmferry.daemon.driver import Driver
from vmferry.daemon.etcd import Etcd, EtcdError, EtcdLeases, EtcdMembership, EtcdSession
from vmferry.daemon.evacuate import Evacuations
from vmferry.daemon.guard import install_log_rate_limit
from vmferry.daemon.host import HostIdentity, load_or_create_host_identity
from vmferry.daemon.lease import LeaseBackend, LeaseOwner, LockspaceLeases, NoLeases
from vmferry.daemon.listen import parse_listen_uri, serve
from vmferry.daemon.migrate import MigrationService
from vmferry.daemon.state import StateDir
from vmferry.errors import ErrorCode, VmferryError
from vmferry.qemu.confine import (
    USERFAULTFD,
    Confinement,
    allowed_emulators,
    grant_userfaultfd,
    resolve_user,
)
from vmferry.storage import Pools

log = logging.getLogger("vmferryd")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="vmferryd", description="vmferry host daemon: runs QEMU domains and migrates them"
    )
    p.add_argument("--state-dir", required=True, type=Path, help="where definitions and state live")
    p.add_argument(
        "--listen",
        action="append",
        required=True,
        metavar="URI",
        help="unix:///abs/path.sock or tls://HOST:PORT (repeatable); "
        "append ?ro=1 for a read-only listener",
    )
    p.add_argument("--config", type=Path, help="TOML configuration file")
    p.add_argument(
        "--pki-dir",
        type=Path,
        help="TLS files from `vmferry pki init` (overrides [tls] pki_dir)",
    )
    p.add_argument(
        "--insecure",
        action="store_true",
        help="allow plain tcp://HOST:PORT on a loopback address, and p2p peers over tcp:// "
        "or unix://",
    )
    p.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])
    p.add_argument(
        "--log-format",
        default="text",
        choices=logformat.LOG_FORMATS,
        help="text lines (default) or one JSON object per line; a migration's lines carry "
        "its id either way",
    )
    return p.parse_args(argv)


def qemu_version(emulator: str) -> str:
    try:
        out = subprocess.run(
            [emulator, "--version"], capture_output=True, text=True, timeout=10, check=True
        ).stdout
    except (OSError, subprocess.SubprocessError) as err:
        raise VmferryError("qemu-failed", f"cannot run QEMU binary '{emulator}': {err}") from err
    first = out.splitlines()[0] if out else ""
    return first.removeprefix("QEMU emulator version ").strip()


def access_policy(config: DaemonConfig, state: StateDir) -> AccessPolicy:
    """The ``[access]`` section, checked; the audit file lives in the state directory."""
    a = config.access
    return AccessPolicy(
        tls_admin=a.tls_admin,
        tls_readonly=a.tls_readonly,
        admin_permissions=a.admin_permissions,
        readonly_permissions=a.readonly_permissions,
        readonly_socket_group=a.readonly_socket_group,
        audit_file=state.log_dir / "audit.log" if a.audit_log else None,
    )


def storage_pools(config: DaemonConfig, state: StateDir, protected: list[Path | None]) -> Pools:
    """The ``[pools.NAME]`` of the config (or ``default`` in the state dir), created.

    A pool may not hold or lie in the daemon's own files: its volumes can be
    overwritten and deleted through the API.

    :raise VmferryError: ``INVALID_ARG`` naming the pool.
    """
    pools = Pools.from_config(
        list(config.pools.values()), state_root=state.root, roots=config.paths.roots
    )
    own = [Path(os.path.realpath(p)) for p in protected if p is not None]
    state_root = Path(os.path.realpath(state.root))
    for pool in pools:
        path = Path(os.path.realpath(pool.path))
        clash = [p for p in own if p == path or p in path.parents or path in p.parents]
        if path == state_root or path in state_root.parents:
            clash.append(state_root)
        elif state_root in path.parents and (state_root / "pools") not in path.parents:
            clash.append(state_root)
        if clash:
            raise VmferryError(
                ErrorCode.INVALID_ARG,
                f"pool '{pool.name}': directory {pool.path} overlaps the daemon's own files "
                f"({clash[0]}); give it a directory of its own (below the state directory "
                "only under pools/)",
            )
    pools.ensure()
    return pools


def confinement(
    config: DaemonConfig,
    state: StateDir,
    protected: list[Path | None],
    pool_roots: list[Path] | None = None,
) -> Confinement:
    """What this daemon's QEMUs may reach, from ``[qemu]``, ``[paths]`` and the pools."""
    user = resolve_user(config.qemu.user, config.qemu.group)
    if user is not None and config.qemu.userfaultfd and not grant_userfaultfd(user):
        log.warning("no %s: post-copy migration will fail as user %s", USERFAULTFD, user.name)
    return Confinement(
        roots=config.paths.roots,
        state_root=state.root,
        protected=[p for p in protected if p is not None],
        emulators=allowed_emulators(config.qemu.emulator, config.qemu.emulators),
        user=user,
        pool_roots=pool_roots or [],
    )


async def _autostart(driver: Driver) -> None:
    try:
        await autostart_domains(driver)
    except Exception:  # never stops the daemon
        log.exception("autostart failed")


async def join_etcd(driver: Driver, config: DaemonConfig, host: HostIdentity, uri: str) -> None:
    """``[cluster] etcd``: a session kept alive, leases and membership bound to it."""
    cluster = config.cluster
    etcd = Etcd(cluster.etcd)
    session = EtcdSession(etcd, cluster.etcd_ttl, on_lost=driver.fence)
    try:
        await session.open()
    except EtcdError as exc:
        await etcd.close()
        raise VmferryError(
            "connect-failed", f"[cluster] etcd: cannot open a session: {exc}"
        ) from None
    driver.leases = EtcdLeases(etcd, session, LeaseOwner(host.uuid, host.hostname))
    local = Membership(
        cluster,
        host,
        uri=uri,
        migration_address=config.migration.listen_address,
        vms=driver.cluster_vms,
        maintenance=lambda: driver.maintenance.on,
        backend="etcd",
    )
    membership = EtcdMembership(etcd, session, local.local, cluster.heartbeat_interval)
    driver.membership = membership
    driver.spawn(session.run(on_renewed=driver.unfence))


def join_cluster(driver: Driver, config: DaemonConfig, host: HostIdentity, uri: str) -> None:
    """The ``[cluster]`` section: this host's lease backend and membership."""
    cluster = config.cluster
    leases: LeaseBackend = NoLeases()
    if cluster.lockspace:
        lockspace = Path(cluster.lockspace)
        if not lockspace.is_dir():
            raise VmferryError(
                "invalid-arg",
                f"[cluster] lockspace {lockspace} is not a directory (mount the shared "
                "lockspace there first)",
            )
        leases = LockspaceLeases(lockspace, LeaseOwner(host.uuid, host.hostname))
    driver.leases = leases
    driver.membership = Membership(
        cluster,
        host,
        uri=uri,
        migration_address=config.migration.listen_address,
        vms=driver.cluster_vms,
        maintenance=lambda: driver.maintenance.on,
        backend=leases.kind,
    )


async def run(args: argparse.Namespace) -> None:
    config = load_config(args.config)
    install_log_rate_limit(config.limits.error_log_interval)
    if args.pki_dir is not None:
        config.tls.pki_dir = args.pki_dir.resolve()
    state = StateDir(args.state_dir.resolve())
    state.ensure()
    specs = [parse_listen_uri(uri, insecure=args.insecure) for uri in args.listen]
    access = access_policy(config, state)
    host = load_or_create_host_identity(state, config)
    protected = [args.config, config.tls.pki_dir, *(spec.path for spec in specs)]
    pools = storage_pools(config, state, protected)
    confine = confinement(config, state, protected, pools.paths())
    if confine.user is not None:
        pools.set_owner((confine.user.uid, confine.user.gid))
    driver = Driver(state, config, host, confine=confine, pools=pools)
    driver.qemu_version = qemu_version(config.qemu.emulator)
    if config.cluster.etcd:
        await join_etcd(driver, config, host, args.listen[0])
    else:
        join_cluster(driver, config, host, args.listen[0])
    migration = MigrationService(driver)
    migration.insecure = args.insecure  # p2p peers over plain tcp:// or unix:// too
    await driver.load()
    # after restart recovery; in the background, so a slow guest does not hold the listeners
    driver.spawn(_autostart(driver))
    evacuations = Evacuations(migration)
    evacuations.resume()  # an evacuation a restart interrupted goes on
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    log.info("vmferryd on %s: host %s (%s)", ", ".join(args.listen), host.hostname, host.uuid)
    try:
        app = create_app(migration, access, evacuations)
        await serve(
            trace.timed_asgi(app, skip=("/session",)) if trace.enabled() else app,
            specs,
            pki_dir=config.tls.pki_dir,
            stop=stop,
            access=access,
            crl=config.tls.crl,
            limits=config.limits,
        )
    finally:
        await evacuations.close()
        await driver.close()


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logformat.setup(args.log_level, args.log_format)
    try:
        asyncio.run(run(args))
    except VmferryError as err:
        print(str(err), file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
