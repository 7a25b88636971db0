"""JSON bodies of the ``/v1`` HTTP API (pydantic), shared by daemon and client."""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, Field


class ErrorBody(BaseModel):
    code: str
    message: str


class HostInfo(BaseModel):
    hostname: str
    uuid: str
    version: str
    qemu_version: str = ""
    features: list[str] = Field(default_factory=list)  # e.g. "migration-v2", "migration-v3"


class ClusterVm(BaseModel):
    """A domain running (or paused) on a host of the cluster."""

    name: str
    uuid: str
    state: str = ""  # running, paused
    host: str = ""  # the name of the host it runs on
    host_uuid: str = ""


class ClusterHost(BaseModel):
    """One host of the cluster, as its last heartbeat (or the peers list) tells."""

    name: str = ""
    uuid: str = ""
    uri: str = ""
    # up: heartbeat fresh; down: heartbeat too old; unknown: a configured peer never seen
    state: str = "unknown"
    self: bool = False  # the host that answered
    maintenance: bool = False  # it takes no new guest (vmferry maintenance HOST on)
    memory_free_kib: int = 0
    memory_total_kib: int = 0
    cpus: int = 0
    load1: float = 0.0
    migration_address: str = ""
    last_seen: float = 0.0  # seconds since the epoch of its last heartbeat (0: never)
    vms: list[ClusterVm] = Field(default_factory=list)


class MaintenanceInfo(BaseModel):
    """``/v1/host/maintenance``: whether the host takes new guests."""

    on: bool = False
    since: float = 0.0  # seconds since the epoch it was turned on (0: off)
    reason: str = ""


class MaintenanceRequest(BaseModel):
    on: bool
    reason: str = Field(default="", max_length=200)


class EvacuateRequest(BaseModel):
    """``POST /v1/evacuate``: drain every running domain off this host."""

    #: Destination host names as ``cluster list`` shows them; empty: every other host up.
    to: list[str] = Field(default_factory=list, max_length=64)
    max_parallel: int = Field(default=2, ge=1, le=64)
    per_destination: int = Field(default=2, ge=1, le=64)
    #: The bandwidth of the link to each destination, MiB/s; 0: [evacuate] link_mib_s.
    bandwidth_mib_s: int = Field(default=0, ge=0, le=1_000_000)
    downtime_target_ms: int = Field(default=0, ge=0, le=600_000)
    #: Each migration's deadline, s (the convergence engine aborts it past that); 0: none.
    deadline_s: float = Field(default=0.0, ge=0.0, le=86_400.0)
    dry_run: bool = False


class EvacuationMove(BaseModel):
    """One guest of an evacuation: the plan, then what happened."""

    name: str
    uuid: str
    dest: str = ""
    dest_uri: str = ""
    memory_mib: int = 0
    dirty_rate_mib_s: float = 0.0
    order: int = 0
    bandwidth_mib_s: float = 0.0
    planned_start_s: float = 0.0
    planned_s: float = 0.0
    predicted_downtime_ms: float | None = None  # None: does not converge (the policy ends it)
    # pending, running, done, failed, skipped (no destination has room)
    result: str = "pending"
    progress: float = 0.0  # 0..1 while running
    wall_s: float = 0.0
    downtime_ms: float | None = None
    steps: dict[str, float] = Field(default_factory=dict)  # seconds per protocol step
    # Its turn on the link, s from the drain's start: from when it may send to when it handed
    # the link over (its switchover); None without a link bandwidth or before it sent.
    turn_start_s: float | None = None
    turn_end_s: float | None = None
    error: str = ""


class EvacuationInfo(BaseModel):
    """An evacuation's plan and, once started, its progress (``GET /v1/evacuate``)."""

    host: str = ""
    state: str = "none"  # none, planned (dry run), running, done
    started: float = 0.0
    finished: float = 0.0
    per_link: int = 1
    link_mib_s: int = 0  # the bandwidth of each link the plan assumed
    planned_s: float = 0.0
    eta_s: float | None = None
    moves: list[EvacuationMove] = Field(default_factory=list)


class ClusterInfo(BaseModel):
    """``GET /v1/cluster``: the hosts and where each VM runs."""

    backend: str = "none"  # none, lockspace, etcd
    hosts: list[ClusterHost] = Field(default_factory=list)
    vms: list[ClusterVm] = Field(default_factory=list)


class XmlBody(BaseModel):
    xml: str


class JobInfo(BaseModel):
    """The job a domain holds right now (sync and async parts)."""

    job: str = "none"  # sync job type
    job_owner_api: str = ""
    async_job: str = "none"
    phase: str = "none"
    async_owner_api: str = ""
    async_started: float | None = None
    flags: int = 0


class DomainInfo(BaseModel):
    name: str
    uuid: str
    id: int | None = None  # QEMU pid-independent run id; None when shut off
    state: str
    reason: str
    persistent: bool
    title: str = ""
    max_memory_kib: int
    memory_kib: int
    vcpus: int
    domain_type: str = "qemu"
    autostart: bool = False
    job: JobInfo = Field(default_factory=JobInfo)


class DomainStateInfo(BaseModel):
    state: str
    reason: str


#: Bounds of numbers the API accepts (QEMU's own limits where it has them).
MAX_SHUTDOWN_TIMEOUT_S = 86400.0
MAX_DOWNTIME_MS = 2_000_000  # QEMU's downtime-limit: 2000 s
MAX_BANDWIDTH_MIB_S = ((1 << 63) - 1) >> 20  # bytes/s must fit QEMU's int64
MAX_FLAGS = (1 << 32) - 1


class ShutdownRequest(BaseModel):
    # seconds to wait for the guest to power off
    timeout: float = Field(default=60.0, ge=0, le=MAX_SHUTDOWN_TIMEOUT_S, allow_inf_nan=False)


class ConsoleOutput(BaseModel):
    offset: int  # offset of the first byte of `data` in the console log
    next_offset: int
    data: str


class Event(BaseModel):
    """One domain lifecycle event; streamed as one JSON object per line."""

    type: str
    domain: str
    uuid: str
    reason: str = ""
    timestamp: float
    detail: dict[str, Any] = Field(default_factory=dict)


# -- migration ---------------------------------------------------------------------------------


class MigrationRequest(BaseModel):
    """Flags (``MigrateFlags`` values) and parameters of a migration."""

    flags: int = Field(default=0, ge=0, le=MAX_FLAGS)
    params: dict[str, Any] = Field(default_factory=dict)


class BeginReply(BaseModel):
    xml: str
    cookie: str


class PrepareRequest(MigrationRequest):
    xml: str
    cookie: str | None = None  # None for protocol v2


class PrepareReply(BaseModel):
    uri: str
    cookie: str


class PerformRequest(BaseModel):
    cookie: str
    uri: str
    # the destination daemon, as the client reaches it: the source asks it when Finish's
    # outcome is unknown (client gone after Perform, daemon restart)
    peer_uri: str = ""


class Perform2Request(MigrationRequest):
    uri: str
    peer_uri: str = ""  # as in PerformRequest


class CookieBody(BaseModel):
    cookie: str = ""


class StepReply(CookieBody):
    """Finish's and Confirm's reply: the cookie, and this side's completed job when it completed.

    ``stats`` is what ``jobinfo?completed=true`` would answer right after, so that a
    client reports the migration without more round trips; ``None`` when cancelled.
    """

    stats: dict[str, Any] | None = None


class FinishRequest(BaseModel):
    cookie: str | None = None
    cancelled: bool = False
    v3: bool = True


class ConfirmRequest(BaseModel):
    cookie: str = ""
    cancelled: bool = False


class PeerMigrationRequest(MigrationRequest):
    """Peer-to-peer: the source daemon runs the whole protocol against ``dest_uri``."""

    dest_uri: str


class MigrationResult(BaseModel):
    steps: dict[str, float] = Field(default_factory=dict)  # seconds per protocol step
    stats: dict[str, Any] = Field(default_factory=dict)


class JobStats(BaseModel):
    """``domjobinfo``: the running (or last completed) job of a domain."""

    type: str = "none"  # none | unbounded | completed | failed
    operation: str = ""
    phase: str = "none"
    stats: dict[str, Any] = Field(default_factory=dict)


class DowntimeBody(BaseModel):
    downtime_ms: int = Field(ge=0, le=MAX_DOWNTIME_MS)


class SpeedBody(BaseModel):
    bandwidth_mib_s: int = Field(ge=0, le=MAX_BANDWIDTH_MIB_S)  # 0: unlimited


#: What every ``/v1`` route may answer besides its reply: ``{code, message}`` (OpenAPI).
ERROR_RESPONSES: dict[int | str, dict[str, Any]] = {
    "4XX": {"model": ErrorBody, "description": "Refused: `{code, message}`"},
    "5XX": {"model": ErrorBody, "description": "Failed: `{code, message}`"},
}
