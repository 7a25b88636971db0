"""Domain run states and their reasons, as libvirt names them (virDomainState*Reason)."""

from __future__ import annotations

from enum import StrEnum


class DomainState(StrEnum):
    NOSTATE = "nostate"
    RUNNING = "running"
    PAUSED = "paused"
    SHUTDOWN = "shutdown"  # being shut down
    SHUTOFF = "shutoff"
    CRASHED = "crashed"


class RunningReason(StrEnum):
    UNKNOWN = "unknown"
    BOOTED = "booted"
    MIGRATED = "migrated"
    UNPAUSED = "unpaused"
    MIGRATION_CANCELED = "migration-canceled"
    POSTCOPY = "post-copy"
    POSTCOPY_FAILED = "post-copy-failed"


class PausedReason(StrEnum):
    UNKNOWN = "unknown"
    USER = "user"
    MIGRATION = "migration"
    SHUTTING_DOWN = "shutting-down"
    STARTING_UP = "starting-up"
    CRASHED = "crashed"
    IOERROR = "ioerror"
    POSTCOPY = "post-copy"
    POSTCOPY_FAILED = "post-copy-failed"
    API_ERROR = "api-error"
    # this host lost the domain's cluster lease (vmferry.daemon.lease): it must not run here
    LEASE_LOST = "lease-lost"
    # vmferry's own: the outcome of an outgoing migration is not known yet
    # (source recovered in perform3_done and the destination cannot be asked).
    MIGRATION_UNRESOLVED = "migration-unresolved"


class ShutoffReason(StrEnum):
    UNKNOWN = "unknown"
    SHUTDOWN = "shutdown"
    DESTROYED = "destroyed"
    CRASHED = "crashed"
    MIGRATED = "migrated"
    FAILED = "failed"
    DAEMON = "daemon"
    # another host took the lease while this one was cut off (fencing): this copy was stopped
    LEASE_LOST = "lease-lost"


class ErrorReason(StrEnum):
    """vmferry's own reasons for a domain the daemon could not fully load (any state)."""

    # run/NAME.json was unreadable or corrupt; it was moved aside
    STATUS_CORRUPT = "status-corrupt"
    # QEMU is alive but its QMP monitor cannot be reached: only destroy works (state nostate)
    MONITOR_LOST = "monitor-lost"


class ShutdownReason(StrEnum):
    UNKNOWN = "unknown"
    USER = "user"


class EventType(StrEnum):
    DEFINED = "defined"
    UNDEFINED = "undefined"
    STARTED = "started"
    SUSPENDED = "suspended"
    RESUMED = "resumed"
    STOPPED = "stopped"
    SHUTDOWN = "shutdown"
    REBOOT = "reboot"  # the guest was reset (reboot, reset, or the guest itself)
    MIGRATION_ITERATION = "migration-iteration"
    JOB_COMPLETED = "job-completed"
