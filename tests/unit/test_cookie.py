"""The migration cookie parser: libvirt's format, checks before use, property tests."""

from __future__ import annotations

import uuid as uuidlib

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.mutate import mutate
from vmferry.domain.xml import format_domain_xml, parse_domain_xml
from vmferry.errors import ErrorCode, VmferryError
from vmferry.migration.cookie import (
    LIBVIRT_FEATURES,
    MAX_COOKIE_BYTES,
    STAT_NAMES,
    SUPPORTED_MANDATORY,
    MigrationCookie,
    NbdDisk,
    parse_cookie,
    same_uuid,
)
from vmferry.testguest import guest_xml

DOM_UUID = "0b7b1c7e-6d1f-4f4e-9a43-2a4f3c1d9e10"
SRC_HOST = "6f2c8a41-1b0e-4d55-8c1e-0d6a7f3b2c91"
DST_HOST = "a3d5e7f9-2c4b-4e6d-8f0a-1b3c5d7e9f20"
PERSISTENT = format_domain_xml(parse_domain_xml(guest_xml("web", uuid=DOM_UUID)), migratable=True)

# What libvirt's qemuMigrationCookieXMLFormat writes after Perform with PERSIST_DEST
# (elements as in qemu_migration_cookie.c; the domain trimmed to vmferry's subset).
LIBVIRT_PERFORM = f"""<qemu-migration>
  <name>web</name>
  <uuid>{DOM_UUID}</uuid>
  <hostname>src.example.org</hostname>
  <hostuuid>{SRC_HOST}</hostuuid>
  <feature name='lockstate'/>
  <feature name='persistent'/>
  <lockstate driver='nop'>
    <leases></leases>
  </lockstate>
  {PERSISTENT}
  <network>
    <interface index='0' vporttype='openvswitch'><portdata>x</portdata></interface>
  </network>
  <nbd port='49153'>
    <disk target='vda' capacity='10737418240'/>
  </nbd>
  <statistics>
    <started>1700000000000</started>
    <stopped>1700000004321</stopped>
    <sent>1700000004400</sent>
    <delta>-12</delta>
    <time_elapsed>4400</time_elapsed>
    <downtime>57</downtime>
    <setup_time>3</setup_time>
    <memory_total>138870784</memory_total>
    <memory_processed>40960000</memory_processed>
    <memory_remaining>0</memory_remaining>
    <memory_bps>125000000</memory_bps>
    <memory_constant>30000</memory_constant>
    <memory_normal>10000</memory_normal>
    <memory_normal_bytes>40960000</memory_normal_bytes>
    <memory_dirty_rate>0</memory_dirty_rate>
    <memory_iteration>3</memory_iteration>
    <memory_postcopy_requests>0</memory_postcopy_requests>
    <memory_page_size>4096</memory_page_size>
    <disk_total>0</disk_total>
    <disk_processed>0</disk_processed>
    <disk_remaining>0</disk_remaining>
    <disk_bps>0</disk_bps>
    <auto_converge_throttle>0</auto_converge_throttle>
  </statistics>
  <cpu mode='custom' match='exact'><model>qemu64</model></cpu>
  <capabilities>
    <cap name='xbzrle' auto='no'/>
    <cap name='postcopy-ram' auto='no'/>
    <cap name='pause-before-switchover' auto='yes'/>
  </capabilities>
</qemu-migration>
"""


def _parse(text: str, *, local: str = DST_HOST, name: str = "web") -> MigrationCookie:
    return parse_cookie(text, name=name, uuid=DOM_UUID, local_hostuuid=local)


def _cookie(**kw: object) -> MigrationCookie:
    c = MigrationCookie(name="web", uuid=DOM_UUID, hostname="src", hostuuid=SRC_HOST)
    for k, v in kw.items():
        setattr(c, k, v)
    return c


def _code(text: str, **kw: object) -> ErrorCode:
    with pytest.raises(VmferryError) as err:
        _parse(text, **kw)  # type: ignore[arg-type]
    assert err.value.message
    return err.value.code


def test_libvirt_perform_cookie_means_the_same() -> None:
    c = _parse(LIBVIRT_PERFORM)
    assert (c.name, c.hostname, c.hostuuid) == ("web", "src.example.org", SRC_HOST)
    assert c.mandatory == ["lockstate", "persistent"]
    assert c.lock_driver == "nop" and c.leases == ""
    assert c.persistent is not None and c.persistent.uuid == DOM_UUID
    assert c.persistent == parse_domain_xml(PERSISTENT)
    assert (c.nbd_port, c.nbd_disks) == (49153, [NbdDisk("vda", 10737418240)])
    assert c.statistics["downtime"] == 57 and c.statistics["delta"] == -12
    assert c.statistics["stopped"] == 1700000004321
    assert c.capabilities == {
        "xbzrle": False,
        "postcopy-ram": False,
        "pause-before-switchover": True,
    }


def test_round_trip_keeps_every_part() -> None:
    c = _cookie(
        mandatory=["persistent"],
        persistent_xml=PERSISTENT,
        statistics={"started": 1, "downtime": 42, "delta": -5, "memory_total": 1 << 40},
        capabilities={"postcopy-ram": True},
        lock_driver="nop",
        nbd_port=49152,
        nbd_disks=[NbdDisk("vda", 1 << 30)],
    )
    back = _parse(c.to_xml())
    assert back.persistent == parse_domain_xml(PERSISTENT)
    back.persistent, c.persistent = None, None
    assert back.persistent_xml is not None
    back.persistent_xml = c.persistent_xml
    assert back == c


def test_domain_sits_directly_under_the_root_like_libvirt() -> None:
    xml = _cookie(persistent_xml=PERSISTENT, mandatory=["persistent"]).to_xml()
    assert "<qemu-migration><name>web</name>" in xml and "<persistent>" not in xml
    assert '<feature name="persistent" /><domain' in xml


@pytest.mark.parametrize(
    "value",
    [
        "nan",
        "NaN",
        "inf",
        "-inf",
        "1e400",
        "4.5",
        "-1",
        "1_000",
        "9" * 5000,
        "18446744073709551616",
        "",
        "٣",
    ],
)
def test_malformed_statistics_are_dropped_not_fatal(value: str) -> None:
    # libvirt leaves a statistic it cannot read unset; nothing downstream sees nan or a float
    xml = _cookie(statistics={"downtime": 5, "memory_total": 7}).to_xml()
    xml = xml.replace("<downtime>5</downtime>", f"<downtime>{value}</downtime>")
    c = _parse(xml)
    assert "downtime" not in c.statistics and c.statistics["memory_total"] == 7


def test_unknown_statistics_names_are_ignored() -> None:
    xml = (
        _cookie(statistics={"downtime": 5})
        .to_xml()
        .replace("<statistics>", "<statistics><bogus>nan</bogus><downtime_ms>1</downtime_ms>")
    )
    assert _parse(xml).statistics == {"downtime": 5}


def test_same_host_check_compares_uuids_not_strings() -> None:
    for variant in (SRC_HOST.upper(), "{" + SRC_HOST + "}", SRC_HOST.replace("-", "")):
        xml = _cookie(hostuuid=variant).to_xml()
        assert _code(xml, local=SRC_HOST) == ErrorCode.OPERATION_INVALID


def test_domain_uuid_compared_as_uuid() -> None:
    assert _parse(_cookie(uuid=DOM_UUID.upper()).to_xml()).name == "web"
    other = str(uuidlib.uuid4())
    assert _code(_cookie(uuid=other).to_xml()) == ErrorCode.INVALID_ARG


@pytest.mark.parametrize("bad", ["not-a-uuid", "x" * 5000])
def test_malformed_host_uuid_refused(bad: str) -> None:
    assert _code(_cookie(hostuuid=bad).to_xml()) == ErrorCode.INVALID_ARG


@pytest.mark.parametrize("tag", ["name", "uuid", "hostname", "hostuuid"])
def test_header_elements_are_required(tag: str) -> None:
    xml = _cookie().to_xml()
    start, end = xml.index(f"<{tag}>"), xml.index(f"</{tag}>") + len(tag) + 3
    assert _code(xml[:start] + xml[end:]) == ErrorCode.INVALID_ARG


def test_name_mismatch_refused() -> None:
    assert _code(_cookie().to_xml(), name="other") == ErrorCode.INVALID_ARG


def test_mandatory_features() -> None:
    for feature in sorted(SUPPORTED_MANDATORY):
        assert _parse(_cookie(mandatory=[feature]).to_xml()).mandatory == [feature]
    unsupported = [f for f in LIBVIRT_FEATURES if f not in SUPPORTED_MANDATORY]
    assert "memory-hotplug" in unsupported and "cpu" in unsupported
    for feature in unsupported:
        with pytest.raises(VmferryError) as err:
            _parse(_cookie(mandatory=[feature]).to_xml())
        assert err.value.code == ErrorCode.NO_SUPPORT
        assert f"Unsupported migration cookie feature {feature}" == err.value.message
    with pytest.raises(VmferryError) as err:
        _parse(_cookie(mandatory=["teleport"]).to_xml())
    assert err.value.message == "Unknown migration cookie feature teleport"


def test_unknown_parts_not_mandatory_are_ignored() -> None:
    xml = (
        _cookie()
        .to_xml()
        .replace(
            "</qemu-migration>",
            "<graphics type='spice' port='5900' listen='0.0.0.0' tlsPort='-1'/>"
            "<blockDirtyBitmaps/><cpu/><future-part a='1'><x/></future-part></qemu-migration>",
        )
    )
    assert _parse(xml).name == "web"


def test_lockstate_of_another_lock_driver_refused() -> None:
    ok = _cookie(lock_driver="sanlock").to_xml()  # no leases held: nothing to carry over
    assert _parse(ok).lock_driver == "sanlock"
    held = _cookie(lock_driver="sanlock", leases="lease-data").to_xml()
    assert _code(held) == ErrorCode.NO_SUPPORT
    assert _code(ok.replace(' driver="sanlock"', "")) == ErrorCode.INVALID_ARG


@pytest.mark.parametrize(
    "nbd",
    [
        "<nbd port='x'/>",
        "<nbd port='70000'/>",
        "<nbd><disk capacity='1'/></nbd>",
        "<nbd><disk target='vda' capacity='nan'/></nbd>",
    ],
)
def test_malformed_nbd_refused(nbd: str) -> None:
    xml = _cookie().to_xml().replace("</qemu-migration>", nbd + "</qemu-migration>")
    assert _code(xml) == ErrorCode.INVALID_ARG


def test_two_domains_refused_and_invalid_domain_refused() -> None:
    two = (
        _cookie(persistent_xml=PERSISTENT)
        .to_xml()
        .replace("</qemu-migration>", PERSISTENT + "</qemu-migration>")
    )
    assert _code(two) == ErrorCode.INVALID_ARG
    bad = _cookie(persistent_xml="<domain type='kvm'><name>x</name></domain>").to_xml()
    with pytest.raises(VmferryError):
        _parse(bad)


def test_deep_nesting_refused_cheaply() -> None:
    deep = "<a>" * 100_000 + "</a>" * 100_000
    xml = _cookie().to_xml().replace("</qemu-migration>", deep + "</qemu-migration>")
    with pytest.raises(VmferryError) as err:
        _parse(xml)
    # refused by a guard (size, then depth), not by a recursion that went through it all
    assert err.value.code == ErrorCode.INVALID_ARG
    assert "larger than" in err.value.message or "nested deeper than" in err.value.message
    # the old finding: ~1000 levels inside the persistent part
    inner = "<x>" * 1000 + "</x>" * 1000
    xml = (
        _cookie()
        .to_xml()
        .replace("</qemu-migration>", f"<domain type='kvm'>{inner}</domain></qemu-migration>")
    )
    with pytest.raises(VmferryError) as err:
        _parse(xml)
    assert "nested deeper than" in err.value.message


def test_size_capped_before_parsing() -> None:
    big = "<x/>" * (MAX_COOKIE_BYTES // 4 + 1)
    assert _code(f"<qemu-migration>{big}</qemu-migration>") == ErrorCode.INVALID_ARG
    assert _code("é" * (MAX_COOKIE_BYTES // 2 + 1)) == ErrorCode.INVALID_ARG  # bytes, not chars


@pytest.mark.parametrize(
    "text",
    [
        "",
        "garbage",
        "<qemu-migration>",
        "<other/>",
        "\ud800<qemu-migration/>",
        "<!DOCTYPE x [<!ENTITY a 'b'>]><qemu-migration/>",
        "<qemu-migration>\x00</qemu-migration>",
    ],
)
def test_malformed_documents_refused(text: str) -> None:
    assert _code(text) == ErrorCode.INVALID_ARG


# -- properties ------------------------------------------------------------------------------

_text = st.text(st.characters(blacklist_categories=("Cs",)), max_size=40)
_stats = st.dictionaries(
    st.sampled_from([s for s in STAT_NAMES if s not in ("delta", "auto_converge_throttle")]),
    st.integers(0, (1 << 64) - 1),
    max_size=8,
)


@settings(max_examples=200, deadline=None, derandomize=True)
@given(
    hostname=st.text(
        st.characters(min_codepoint=0x21, max_codepoint=0x7E), min_size=1, max_size=30
    ),
    stats=_stats,
    delta=st.integers(-(1 << 63), (1 << 63) - 1),
    caps=st.dictionaries(st.from_regex(r"[a-z][a-z-]{0,20}", fullmatch=True), st.booleans()),
    mandatory=st.lists(st.sampled_from(sorted(SUPPORTED_MANDATORY)), unique=True),
)
def test_round_trip_property(
    hostname: str, stats: dict[str, int], delta: int, caps: dict[str, bool], mandatory: list[str]
) -> None:
    c = _cookie(
        hostname=hostname,
        statistics={**stats, "delta": delta},
        capabilities=caps,
        mandatory=mandatory,
    )
    assert _parse(c.to_xml()) == c


_FRAGMENTS = st.sampled_from(
    [
        "<downtime>nan</downtime>",
        "<feature name='cpu'/>",
        "<feature/>",
        "<domain/>",
        "<nbd port='-1'/>",
        "<lockstate/>",
        "<statistics><started>1e9</started></statistics>",
        "<capabilities><cap/></capabilities>",
        "<uuid>" + DOM_UUID.upper() + "</uuid>",
        "<hostuuid>" + DST_HOST.upper() + "</hostuuid>",
        "<x>" * 50,
        "</x>" * 50,
        "&amp;",
        "]]>",
    ]
)


@settings(
    max_examples=300, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.too_slow]
)
@given(data=st.data())
def test_mutated_cookies_raise_only_vmferry_errors(data: st.DataObject) -> None:
    base = data.draw(
        st.sampled_from(
            [
                LIBVIRT_PERFORM,
                _cookie(persistent_xml=PERSISTENT, statistics={"downtime": 1}).to_xml(),
            ]
        )
    )
    text = mutate(base, data, _text, max_edits=4)
    for frag in data.draw(st.lists(_FRAGMENTS, max_size=3)):
        pos = data.draw(st.integers(0, len(text)))
        text = text[:pos] + frag + text[pos:]
    try:
        c = _parse(text)
    except VmferryError as err:
        assert err.message
        return
    for value in c.statistics.values():
        assert isinstance(value, int) and -(1 << 63) <= value < (1 << 64)


@settings(max_examples=300, deadline=None, derandomize=True)
@given(text=st.text(max_size=300))
def test_arbitrary_text_raises_only_vmferry_errors(text: str) -> None:
    with pytest.raises(VmferryError):
        _parse(text)


def test_same_uuid_helper() -> None:
    assert same_uuid(SRC_HOST, SRC_HOST.upper())
    assert same_uuid(SRC_HOST, SRC_HOST.replace("-", ""))
    assert not same_uuid(SRC_HOST, DST_HOST)
    assert not same_uuid("garbage", "garbage")


# libvirt's Begin cookie with the "nop" lock manager: lockstate is mandatory but has no
# element (no leases); capabilities and the guest CPU ride along.
LIBVIRT_BEGIN = f"""<qemu-migration>
  <name>web</name>
  <uuid>{DOM_UUID}</uuid>
  <hostname>src.example.org</hostname>
  <hostuuid>{SRC_HOST}</hostuuid>
  <feature name='lockstate'/>
  <cpu mode='custom' match='exact' check='partial'><model fallback='forbid'>qemu64</model></cpu>
  <capabilities>
    <cap name='postcopy-ram' auto='no'/>
    <cap name='pause-before-switchover' auto='yes'/>
  </capabilities>
</qemu-migration>
"""


def test_libvirt_begin_cookie_means_the_same() -> None:
    c = _parse(LIBVIRT_BEGIN)
    assert c.mandatory == ["lockstate"] and c.lock_driver == "" and c.persistent is None
    assert c.capabilities == {"postcopy-ram": False, "pause-before-switchover": True}
    # with memory hotplug in use libvirt marks it mandatory: vmferry cannot honour it
    hotplug = LIBVIRT_BEGIN.replace(
        "<feature name='lockstate'/>", "<feature name='lockstate'/><feature name='memory-hotplug'/>"
    )
    with pytest.raises(VmferryError) as err:
        _parse(hotplug)
    assert err.value.message == "Unsupported migration cookie feature memory-hotplug"
