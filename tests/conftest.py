"""Fixtures shared by tests/unit, tests/e2e and tests/faults.

Layout: ``tests/unit`` starts no QEMU and no daemon process (pure logic, in
milliseconds to seconds); ``tests/e2e`` runs real vmferryd processes and, where
marked ``qemu``, real QEMU guests; ``tests/faults`` is the fault matrix. Every
test under tests/e2e gets the ``e2e`` marker.
"""

from __future__ import annotations

import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from vmferry.testing import Host, hosts

_E2E = Path(__file__).parent / "e2e"


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        if _E2E in Path(str(item.fspath)).parents:
            item.add_marker(pytest.mark.e2e)


@pytest.fixture
def tmp() -> Iterator[Path]:
    """A fresh directory under /tmp, short enough for unix socket paths; removed afterwards."""
    path = Path(tempfile.mkdtemp(prefix="vf", dir="/tmp"))
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture(scope="module")
def pair() -> Iterator[tuple[Host, Host]]:
    """Two running daemons shared by a module's tests; all they started dies afterwards."""
    with hosts(2) as (a, b):
        yield a, b


@pytest.fixture
def fresh_pair() -> Iterator[tuple[Host, Host]]:
    """Two running daemons for one test only."""
    with hosts(2) as (a, b):
        yield a, b
