"""The fault matrix: which faults, at which boundaries, and what each case must end with.

A case is (protocol mode, failpoint, fault). The failpoint names the phase
boundary where the protocol is stopped (``pause``) while the fault is
applied. What a correct system must end with depends on where the guest's
state is at that boundary:

* the source QEMU holds the only copy until the stream completed
  (:func:`state_moved`): killing it there may lose the guest;
* once the destination resumed the guest (v3 Finish, or the v2 source killed
  itself after Perform) the source copy is stale (:func:`committed`): the guest
  must never run on the source again, and killing the destination QEMU may
  lose it.

Post-copy (mode ``v3-postcopy``, boundaries :data:`POSTCOPY_POINTS`, all after
the switch-over) adds a third state: from the switch until the post-copy
stream completed (Finish returns only then) the guest's newest state is split
between the two QEMUs (:func:`split`), and killing *either* may lose it. Before
the destination ran the guest (Finish's ``cont``) the source may still take it
back; from ``dst-postcopy-running`` on it must not.

Everywhere else the guest must survive, on exactly one host.

A case with ``leases`` runs both hosts in one cluster (a shared lockspace,
vmferry.daemon.lease): it must also end with the guest's lease held by the
host that runs it, and by nobody when it is lost (id suffix ``+lease``).
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum


class Mode(StrEnum):
    V3 = "v3"  # client-managed, protocol v3
    P2P = "p2p"  # peer-to-peer (the source daemon runs v3)
    V2 = "v2"  # client-managed, protocol v2
    V3_POSTCOPY = "v3-postcopy"  # client-managed v3, switched to post-copy after the 1st pass
    V3_STORAGE = "v3-storage"  # client-managed v3 with --copy-storage-all, the guest writing


class Fault(StrEnum):
    KILL_SRC_DAEMON = "kill-src-daemon"
    KILL_DST_DAEMON = "kill-dst-daemon"
    KILL_SRC_QEMU = "kill-src-qemu"
    KILL_DST_QEMU = "kill-dst-qemu"
    KILL_CLIENT = "kill-client"
    CUT_LINK = "cut-link"


#: The boundaries of each protocol, in the order the protocol passes them.
V3_POINTS = (
    "src-begin-before",
    "src-begin-after",
    "dst-prepare-before",
    "dst-prepare-after",
    "src-perform3-before",
    "src-perform-migrating",
    "src-perform3-after",
    "dst-finish-before",
    "dst-finish-after",
    "src-confirm3-before",
    "src-confirm3-after",
)
V2_POINTS = (
    "dst-prepare-before",
    "dst-prepare-after",
    "src-perform2-before",
    "src-perform-migrating",
    "src-perform2-after",
    "dst-finish-before",
    "dst-finish-after",
)


#: The boundaries where post-copy matters: after the switch with the destination still paused,
#: with the destination running the guest while post-copy goes on, and Confirm.
POSTCOPY_POINTS = (
    "src-perform3-after",
    "dst-finish-before",
    "dst-postcopy-running",
    "src-confirm3-before",
    "src-confirm3-after",
)


#: Storage migration (mode ``v3-storage``): the destination's disks exist (before its QEMU
#: starts), the source about to mirror, every mirror in sync (the memory not yet moving), the
#: switchover (vCPUs stopped, the mirrors not yet drained), Finish with the NBD server stopped
#: (before ``cont``). The other v3 boundaries behave as in ``v3``.
STORAGE_POINTS = (
    "dst-prepare-storage",
    "src-perform-mirror",
    "src-perform-mirror-ready",
    "src-perform-switchover",
    "dst-finish-storage",
)
#: The v3 boundaries in the order a storage migration passes them.
V3_STORAGE_ORDER = (
    *V3_POINTS[:3],
    "dst-prepare-storage",
    "dst-prepare-after",
    "src-perform3-before",
    "src-perform-mirror",
    "src-perform-mirror-ready",
    "src-perform-migrating",
    "src-perform-switchover",
    "src-perform3-after",
    "dst-finish-before",
    "dst-finish-storage",
    *V3_POINTS[8:],
)


def points(mode: Mode) -> tuple[str, ...]:
    if mode == Mode.V3_POSTCOPY:
        return POSTCOPY_POINTS
    if mode == Mode.V3_STORAGE:
        return STORAGE_POINTS
    return V2_POINTS if mode == Mode.V2 else V3_POINTS


def _at_or_after(mode: Mode, point: str, first: str) -> bool:
    order = V3_STORAGE_ORDER if mode == Mode.V3_STORAGE else points(mode)
    return order.index(point) >= order.index(first)


def state_moved(mode: Mode, point: str) -> bool:
    """Whether the destination QEMU holds the complete state at *point*."""
    first = {
        Mode.V2: "src-perform2-after",
        # Finish returns once the post-copy stream completed: Confirm comes after it
        Mode.V3_POSTCOPY: "src-confirm3-before",
    }.get(mode, "src-perform3-after")
    return _at_or_after(mode, point, first)


def committed(mode: Mode, point: str) -> bool:
    """Whether the destination took over at *point* (the source copy is stale or gone)."""
    first = {
        Mode.V2: "src-perform2-after",
        # post-copy: the destination runs the guest from Finish's cont on
        Mode.V3_POSTCOPY: "dst-postcopy-running",
    }.get(mode, "dst-finish-after")
    return _at_or_after(mode, point, first)


def split(mode: Mode, point: str) -> bool:
    """Whether the guest's newest state is split between the two QEMUs at *point*.

    From the switch to post-copy until its stream completed the destination has
    the CPU and device state and some of the memory, the source the rest: no
    single QEMU holds a copy that can run on its own (QEMU cannot take a
    switched-over migration back to the source, and vmferry, like libvirt,
    never resumes the source after the switch).
    """
    return mode == Mode.V3_POSTCOPY and not state_moved(mode, point)


def src_qemu_exists(mode: Mode, point: str) -> bool:
    """The source QEMU is stopped by Confirm (v3) or at the end of Perform (v2)."""
    last = "src-perform-migrating" if mode == Mode.V2 else "src-confirm3-before"
    return not _at_or_after(mode, point, last) or point == last


def dst_qemu_exists(mode: Mode, point: str) -> bool:
    """The incoming QEMU starts inside Prepare."""
    if mode == Mode.V3_POSTCOPY:
        return True  # every post-copy boundary is after the switch
    return _at_or_after(mode, point, "dst-prepare-after")


@dataclass(frozen=True)
class Case:
    mode: Mode
    point: str
    fault: Fault
    leases: bool = False

    @property
    def id(self) -> str:
        return f"{self.mode}/{self.point}/{self.fault}" + ("+lease" if self.leases else "")

    @property
    def paused_side(self) -> str:
        """``src`` or ``dst``: whose daemon stops at the failpoint."""
        return self.point.split("-", 1)[0]

    def applicable(self) -> str:
        """Why the case cannot happen ("" when it can)."""
        if self.fault == Fault.KILL_SRC_QEMU and not src_qemu_exists(self.mode, self.point):
            return "the source QEMU is already gone"
        if self.fault == Fault.KILL_DST_QEMU and not dst_qemu_exists(self.mode, self.point):
            return "no destination QEMU yet"
        return ""

    def loss_allowed(self) -> bool:
        """Whether the fault killed the QEMU that held the only valid copy of the guest."""
        if self.fault == Fault.KILL_SRC_QEMU:
            return not state_moved(self.mode, self.point)
        if self.fault == Fault.KILL_DST_QEMU:
            return committed(self.mode, self.point) or split(self.mode, self.point)
        return False


def full_matrix() -> list[Case]:
    """Every mode x boundary x fault, including the ones that cannot happen (reported N/A)."""
    return [Case(mode, point, fault) for mode in Mode for point in points(mode) for fault in Fault]


def _c(mode: str, point: str, fault: str) -> Case:
    return Case(Mode(mode), point, Fault(fault))


#: What CI runs: every boundary, every fault and every mode at least once (see check_subset).
CI_SUBSET: tuple[Case, ...] = (
    _c("v3", "src-begin-before", "kill-src-qemu"),
    _c("v3", "src-begin-after", "kill-client"),
    _c("v3", "dst-prepare-before", "kill-client"),
    _c("p2p", "dst-prepare-after", "cut-link"),
    _c("v3", "src-perform3-before", "kill-dst-qemu"),
    _c("p2p", "src-perform-migrating", "kill-dst-daemon"),
    _c("v3", "src-perform3-after", "kill-src-daemon"),
    _c("v3", "dst-finish-before", "kill-src-qemu"),
    _c("p2p", "dst-finish-after", "kill-src-daemon"),
    _c("v3", "src-confirm3-before", "kill-dst-daemon"),
    _c("p2p", "src-confirm3-after", "cut-link"),
    _c("v2", "src-perform2-before", "kill-src-daemon"),
    _c("v2", "src-perform-migrating", "cut-link"),
    _c("v2", "src-perform2-after", "kill-dst-daemon"),
    _c("v2", "dst-finish-before", "kill-client"),
    # post-copy: the link cut while the destination runs the guest and pulls its pages
    _c("v3-postcopy", "dst-postcopy-running", "cut-link"),
    _c("v3-postcopy", "dst-postcopy-running", "kill-src-daemon"),
    # the destination daemon restarts while its QEMU, still paused, completes the stream
    _c("v3-postcopy", "dst-finish-before", "kill-dst-daemon"),
    # storage (each daemon restarted mid-mirror: tests/e2e/test_storage_migration.py too)
    _c("v3-storage", "src-perform-mirror-ready", "kill-src-daemon"),
    _c("v3-storage", "src-perform-switchover", "kill-dst-qemu"),
    _c("v3-storage", "dst-prepare-storage", "kill-client"),
    _c("v3-storage", "src-perform-mirror", "cut-link"),
    _c("v3-storage", "dst-finish-storage", "kill-src-qemu"),
)


def _lease(mode: str, point: str, fault: str) -> Case:
    return Case(Mode(mode), point, Fault(fault), leases=True)


#: The lease hand-over under the faults: before the source let go of the lease, after it did
#: (it stopped the guest), around the destination taking it, and the recovery of each side.
LEASE_SUBSET: tuple[Case, ...] = (
    _lease("v3", "src-begin-after", "kill-src-daemon"),
    _lease("v3", "src-perform3-after", "kill-src-daemon"),
    _lease("v3", "src-perform3-after", "kill-client"),
    _lease("v3", "dst-finish-before", "kill-dst-daemon"),
    _lease("v3", "dst-finish-after", "kill-dst-daemon"),
    _lease("p2p", "src-confirm3-before", "cut-link"),
    _lease("v2", "src-perform2-after", "kill-src-daemon"),
)
#: What ``make test`` runs of them (the rest: ``make faults``, or ``--subset lease``).
LEASE_CI_SUBSET: tuple[Case, ...] = tuple(
    c for c in LEASE_SUBSET if c.point in ("src-perform3-after", "dst-finish-after")
)


def check_subset(cases: tuple[Case, ...]) -> list[str]:
    """What *cases* leave uncovered: boundaries, faults and modes not hit (or N/A cases)."""
    missing = [f"{c.id} is not applicable" for c in cases if c.applicable()]
    missing += [f"mode {m}" for m in Mode if all(c.mode != m for c in cases)]
    missing += [f"fault {f}" for f in Fault if all(c.fault != f for c in cases)]
    all_points = set(V3_POINTS) | set(V2_POINTS) | set(POSTCOPY_POINTS) | set(STORAGE_POINTS)
    missing += [f"boundary {p}" for p in sorted(all_points) if all(c.point != p for c in cases)]
    return missing
