"""The CI subset of the fault matrix (``tests.faults.cases.CI_SUBSET``) on namespaced hosts.

Every phase boundary, every fault and every protocol at least once; the whole
matrix is ``make faults``. Needs root for the network namespaces.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.faults.cases import CI_SUBSET, Case, check_subset
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


@pytest.mark.parametrize("case", CI_SUBSET, ids=[c.id for c in CI_SUBSET])
def test_fault_case(net: NetnsPair, case: Case) -> None:
    result = run_case(net, case, keep_logs=LOGS)
    said = " — ".join(part for part in (result.outcome, result.reason) if part)
    where = f"; logs in {Path(result.logs[0]).parent}" if result.logs else ""
    assert result.ok, f"{case.id}: {result.verdict}: {said}{where}"
