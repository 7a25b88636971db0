"""The CI subset of the fault matrix (``tests.faults.cases.CI_SUBSET``) on namespaced hosts.

Every phase boundary, every fault and every protocol at least once; the whole
matrix is ``make faults``. Needs root for the network namespaces.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.faults.cases import (
    CI_SUBSET,
    LEASE_CI_SUBSET,
    Case,
    Fault,
    Mode,
    check_subset,
    committed,
)
from tests.faults.matrix import LOGS
from tests.faults.runner import run_case
from tests.netns import NetnsPair, available, netns_pair

pytestmark = [
    pytest.mark.qemu,
    pytest.mark.skipif(bool(available()), reason=available() or "namespaces available"),
]


@pytest.fixture(scope="module")
def net() -> Iterator[NetnsPair]:
    with netns_pair() as pair:
        yield pair


def test_ci_subset_covers_every_boundary_fault_and_mode() -> None:
    assert check_subset(CI_SUBSET) == []


def test_postcopy_expectations() -> None:
    """Until the post-copy stream completed either QEMU may take the guest with it."""

    def case(point: str, fault: Fault) -> Case:
        return Case(Mode.V3_POSTCOPY, point, fault)

    for point in ("src-perform3-after", "dst-finish-before", "dst-postcopy-running"):
        assert case(point, Fault.KILL_SRC_QEMU).loss_allowed()
        assert case(point, Fault.KILL_DST_QEMU).loss_allowed()
        for fault in (Fault.KILL_CLIENT, Fault.CUT_LINK, Fault.KILL_SRC_DAEMON):
            assert not case(point, fault).loss_allowed()
    # Finish returned: the stream completed, the source copy is no longer needed
    assert not case("src-confirm3-before", Fault.KILL_SRC_QEMU).loss_allowed()
    assert case("src-confirm3-after", Fault.KILL_SRC_QEMU).applicable()
    # the destination ran the guest from Finish's cont on: the source must not resume
    assert not committed(Mode.V3_POSTCOPY, "dst-finish-before")
    assert committed(Mode.V3_POSTCOPY, "dst-postcopy-running")


@pytest.mark.parametrize("case", CI_SUBSET, ids=[c.id for c in CI_SUBSET])
def test_fault_case(net: NetnsPair, case: Case) -> None:
    result = run_case(net, case, keep_logs=LOGS)
    said = " — ".join(part for part in (result.outcome, result.reason) if part)
    where = f"; logs in {Path(result.logs[0]).parent}" if result.logs else ""
    assert result.ok, f"{case.id}: {result.verdict}: {said}{where}"


@pytest.mark.parametrize("case", LEASE_CI_SUBSET, ids=[c.id for c in LEASE_CI_SUBSET])
def test_lease_fault_case(net: NetnsPair, case: Case) -> None:
    """The lease hand-over under a fault: the host that runs the guest holds its lease."""
    result = run_case(net, case, keep_logs=LOGS)
    said = " — ".join(part for part in (result.outcome, result.reason) if part)
    where = f"; logs in {Path(result.logs[0]).parent}" if result.logs else ""
    assert result.ok, f"{case.id}: {result.verdict}: {said}{where}"
