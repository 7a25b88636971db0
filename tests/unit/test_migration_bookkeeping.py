"""Typed migration bookkeeping and QEMU's migration statuses (no QEMU started)."""

from __future__ import annotations

import json

import pytest

from vmferry.domain.xml import parse_domain_xml
from vmferry.jobs import DomainJob
from vmferry.migration.params import MigrationParams
from vmferry.migration.restart import bookkeeping, restore_bookkeeping
from vmferry.qemu.domain import QemuDomain
from vmferry.qemu.migration_status import TERMINAL, MigrationStatus

_XML = (
    '<domain type="qemu"><name>bk</name><memory unit="MiB">128</memory>'
    "<os><type>hvm</type></os></domain>"
)


def _domain() -> QemuDomain:
    definition = parse_domain_xml(_XML)
    return QemuDomain(definition=definition, persistent=None, job=DomainJob("bk"))


def test_params_are_typed_and_round_trip_through_the_status_file() -> None:
    dom = _domain()
    dom.migration.flags = 3
    dom.migration.params = MigrationParams(bandwidth_mib_s=40, dname="x", postcopy_autoresume=False)
    saved = json.loads(json.dumps(bookkeeping(dom)))
    assert saved["params"]["bandwidth_mib_s"] == 40
    back = _domain()
    restore_bookkeeping(back, saved)
    assert back.migration.params == dom.migration.params
    assert isinstance(back.migration.params, MigrationParams)
    assert back.migration.flags == 3


def test_no_params_stay_none_and_are_written_as_before() -> None:
    dom = _domain()
    assert bookkeeping(dom)["params"] == {}
    restore_bookkeeping(dom, {"params": {}})
    assert dom.migration.params is None


def test_corrupt_params_are_refused_as_a_value_error() -> None:
    # The driver drops corrupt bookkeeping on ValueError and logs it.
    with pytest.raises(ValueError, match="bandwidth_mib_s"):
        restore_bookkeeping(_domain(), {"params": {"bandwidth_mib_s": "fast"}})


def test_migration_status() -> None:
    assert MigrationStatus.of({"status": "postcopy-active"}) is MigrationStatus.POSTCOPY_ACTIVE
    assert MigrationStatus.of(None) is MigrationStatus.NONE
    assert MigrationStatus.of({}) is MigrationStatus.NONE
    assert MigrationStatus.COMPLETED in TERMINAL and MigrationStatus.ACTIVE not in TERMINAL
    # A status a newer QEMU adds is kept, not refused.
    newer = MigrationStatus("postcopy-something")
    assert newer == "postcopy-something" and isinstance(newer, MigrationStatus)
    assert json.dumps({"status": MigrationStatus.COMPLETED}) == '{"status": "completed"}'
