"""The migration cookie passed between protocol steps (libvirt's ``<qemu-migration>``).

Each step's output cookie is the next step's input. The format is libvirt's
(``qemu_migration_cookie.c``) wherever vmferry has the same part: the header
(name, uuid, hostname, hostuuid, ``<feature name=.../>`` per mandatory part),
``<lockstate>``, the persistent ``<domain>`` directly under the root,
``<nbd>``, ``<statistics>`` with libvirt's names and integer values (times in
milliseconds, ``started``/``stopped``/``sent`` in milliseconds since the
epoch) and ``<capabilities>``. Parts vmferry does not know are ignored, and
refused by name when the sender marks them mandatory, as libvirt does.

Everything is checked before a step acts on it: size (before parsing),
nesting depth, UUIDs (compared as UUIDs, not strings) and numbers (integers
only, in range; a malformed statistic is dropped, as libvirt does).
"""

from __future__ import annotations

import json
import logging
import math
import re
import uuid as uuidlib
import xml.etree.ElementTree as ET
from dataclasses import dataclass, field
from typing import Any

import defusedxml.ElementTree as SafeET
from defusedxml import DefusedXmlException

from vmferry.domain.model import DomainDef
from vmferry.domain.xml import MAX_XML_BYTES, parse_domain_xml
from vmferry.errors import ErrorCode, VmferryError

log = logging.getLogger(__name__)

#: libvirt's cookie flags (``qemuMigrationCookieFlag``), in libvirt's order.
LIBVIRT_FEATURES = (
    "graphics",
    "lockstate",
    "persistent",
    "network",
    "nbd",
    "statistics",
    "memory-hotplug",
    "cpu-hotplug",
    "cpu",
    "allowReboot",
    "capabilities",
    "block-dirty-bitmaps",
)
#: Parts a sender may mark mandatory that vmferry honours. lockstate: vmferry
#: has no lock manager, i.e. libvirt's "nop" driver; leases of another driver are refused.
SUPPORTED_MANDATORY = frozenset({"persistent", "lockstate", "statistics", "capabilities", "nbd"})
#: The lock driver of a host outside any cluster, in libvirt's terms.
LOCK_DRIVER = "nop"
#: Lock drivers whose lease state vmferry understands (vmferry.daemon.lease's kinds).
LOCK_DRIVERS = frozenset({LOCK_DRIVER, "none", "lockspace", "etcd"})

#: The whole cookie, checked before parsing: room for a domain XML of the largest size.
MAX_COOKIE_BYTES = MAX_XML_BYTES + 64 * 1024
#: Nesting deeper than any valid cookie (a domain is ~6 levels deep).
MAX_DEPTH = 32

#: ``<statistics>`` children libvirt writes, all unsigned 64-bit except ``delta``
#: (signed) and ``auto_converge_throttle`` (int).
STAT_NAMES = (
    "started",
    "stopped",
    "sent",
    "delta",
    "time_elapsed",
    "downtime",
    "setup_time",
    "memory_total",
    "memory_processed",
    "memory_remaining",
    "memory_bps",
    "memory_constant",
    "memory_normal",
    "memory_normal_bytes",
    "memory_dirty_rate",
    "memory_iteration",
    "memory_postcopy_requests",
    "memory_page_size",
    "disk_total",
    "disk_processed",
    "disk_remaining",
    "disk_bps",
    "compression_cache",
    "compression_bytes",
    "compression_pages",
    "compression_cache_misses",
    "compression_overflow",
    "auto_converge_throttle",
    # vmferry's own (libvirt ignores it): ms from the guest resuming on the destination
    # to Finish writing this cookie, so the source can tell the guest-visible downtime
    "resumed_ago",
)
_SIGNED = frozenset({"delta", "auto_converge_throttle"})
_U64 = (1 << 64) - 1
_I64 = (1 << 63) - 1
# a plain file name: no directory, no "..", nothing hidden
_FILE_NAME = re.compile(r"[A-Za-z0-9_+-][A-Za-z0-9._+-]{0,254}")
_INT_RE = re.compile(r"[+-]?[0-9]{1,20}")


def _invalid(message: str) -> VmferryError:
    return VmferryError(ErrorCode.INVALID_ARG, message)


@dataclass
class NbdDisk:
    target: str
    capacity: int
    # vmferry's addition for --copy-storage-inc: the top image's backing file (its name only:
    # the same pool, or directory, on each host) and format; libvirt ignores them
    backing: str = ""
    backing_format: str = ""


#: The most multifd channels a destination may ask an encrypted stream to use (the
#: cookie passes through the client: a larger figure is refused, never sent to QEMU).
TLS_MAX_CHANNELS = 16


@dataclass
class MigrationCookie:
    name: str
    uuid: str
    hostname: str
    hostuuid: str
    mandatory: list[str] = field(default_factory=list)
    persistent_xml: str | None = None
    #: libvirt's statistics names, integer values (see :data:`STAT_NAMES`)
    statistics: dict[str, int] = field(default_factory=dict)
    capabilities: dict[str, bool] = field(default_factory=dict)  # QEMU caps the sender supports
    lock_driver: str = ""
    leases: str = ""
    nbd_port: int | None = None
    nbd_disks: list[NbdDisk] = field(default_factory=list)
    #: the persistent definition, validated (set by :func:`parse_cookie`)
    persistent: DomainDef | None = None
    # vmferry's <tls> (vmferry.migration.tls): Begin offers, Prepare answers
    tls_pki: bool | None = None  # the sender has a PKI
    tls_mode: str = ""  # the sender's [migration] tls
    tls_use: bool | None = None  # Prepare: the stream is encrypted by QEMU
    # multifd channels of an encrypted stream: Begin, the most the source runs; Prepare, the count
    tls_channels: int | None = None
    #: vmferry's own part: the convergence policy's report (``policy*`` job statistics and
    #: its actions), so the destination's ``domjobinfo --completed`` shows them too
    policy: dict[str, Any] = field(default_factory=dict)

    def to_xml(self) -> str:
        """libvirt's cookie XML; statistics not in :data:`STAT_NAMES` are left out."""
        root = ET.Element("qemu-migration")
        for tag in ("name", "uuid", "hostname", "hostuuid"):
            ET.SubElement(root, tag).text = getattr(self, tag)
        for feature in self.mandatory:
            ET.SubElement(root, "feature", name=feature)
        if self.lock_driver:
            lock = ET.SubElement(root, "lockstate", driver=self.lock_driver)
            ET.SubElement(lock, "leases").text = self.leases
        if self.persistent_xml is not None:
            root.append(SafeET.fromstring(self.persistent_xml))
        if self.nbd_port is not None or self.nbd_disks:
            nbd = ET.SubElement(root, "nbd")
            if self.nbd_port:
                nbd.set("port", str(self.nbd_port))
            for disk in self.nbd_disks:
                el = ET.SubElement(nbd, "disk", target=disk.target, capacity=str(disk.capacity))
                if disk.backing:
                    el.set("backing", disk.backing)
                    el.set("backingFormat", disk.backing_format)
        if self.tls_pki is not None or self.tls_mode or self.tls_use is not None:
            tls = ET.SubElement(root, "tls")
            for attr, value in (("pki", self.tls_pki), ("use", self.tls_use)):
                if value is not None:
                    tls.set(attr, "yes" if value else "no")
            if self.tls_mode:
                tls.set("mode", self.tls_mode)
            if self.tls_channels:
                tls.set("channels", str(self.tls_channels))
        if self.statistics:
            stats = ET.SubElement(root, "statistics")
            for key in STAT_NAMES:
                if key in self.statistics:
                    ET.SubElement(stats, key).text = str(int(self.statistics[key]))
        if self.capabilities:
            caps = ET.SubElement(root, "capabilities")
            for cap, auto in sorted(self.capabilities.items()):
                ET.SubElement(caps, "cap", name=cap, auto="yes" if auto else "no")
        report = policy_report(self.policy)
        if report:
            ET.SubElement(root, POLICY_TAG).text = json.dumps(report, separators=(",", ":"))
        return ET.tostring(root, encoding="unicode")


def parse_cookie(text: str, *, name: str, uuid: str, local_hostuuid: str) -> MigrationCookie:
    """Parse and check a cookie received from the peer.

    *name* and *uuid* are the domain's original ones (before any ``--dname``),
    known to this side, never taken from the cookie.

    :raise VmferryError: ``INVALID_ARG`` for a malformed or mismatched cookie,
        ``OPERATION_INVALID`` for a migration to the same host, ``NO_SUPPORT``
        for a mandatory part vmferry does not support.
    """
    root = _parse_xml(text)
    cookie = MigrationCookie(
        name=_header(root, "name"),
        uuid=_header(root, "uuid"),
        hostname=_header(root, "hostname"),
        hostuuid=_header(root, "hostuuid"),
    )
    if cookie.name != name:
        raise _invalid(f"Incoming cookie data had unexpected name {cookie.name} vs {name}")
    if _uuid(cookie.uuid, "uuid") != _uuid(uuid, "local domain UUID"):
        raise _invalid(f"Incoming cookie data had unexpected UUID {cookie.uuid} vs {uuid}")
    if _uuid(cookie.hostuuid, "hostuuid") == _uuid(local_hostuuid, "local host UUID"):
        raise VmferryError(
            ErrorCode.OPERATION_INVALID,
            f"Attempt to migrate guest to the same host {cookie.hostuuid}",
        )
    cookie.mandatory = _mandatory(root)
    _parse_lockstate(root, cookie)
    _parse_persistent(root, cookie)
    _parse_nbd(root, cookie)
    _parse_tls(root, cookie)
    stats = root.find("statistics")
    if stats is not None:
        cookie.statistics = _parse_statistics(stats)
    policy = root.find(POLICY_TAG)
    if policy is not None:
        cookie.policy = _parse_policy(policy.text or "")
    caps = root.find("capabilities")
    if caps is not None:
        for cap in caps.findall("cap"):
            cap_name = cap.get("name")
            if not cap_name:
                raise _invalid("missing migration capability name in migration cookie")
            cookie.capabilities[cap_name] = cap.get("auto") == "yes"
    return cookie


#: vmferry's policy report: JSON text (libvirt ignores a part it does not know).
POLICY_TAG = "vmferry-policy"
MAX_POLICY_BYTES = 64 * 1024
MAX_POLICY_ACTIONS = 256
_MAX_POLICY_TEXT = 500


def _scalar(value: Any) -> bool:
    if isinstance(value, str):
        return len(value) <= _MAX_POLICY_TEXT
    if isinstance(value, float):
        return math.isfinite(value)
    return value is None or isinstance(value, bool | int)


def policy_report(stats: dict[str, Any]) -> dict[str, Any]:
    """The ``policy*`` entries of job *stats* that may travel: scalars, and the actions.

    Anything else (a nested value, an oversized string, too many actions) is left out,
    when sent as when received: a malformed report is dropped, as libvirt drops a
    malformed statistic.
    """
    out: dict[str, Any] = {}
    for key, value in stats.items():
        if not isinstance(key, str) or not key.startswith("policy") or len(key) > 64:
            continue
        if key == "policy_actions":
            if isinstance(value, list) and len(value) <= MAX_POLICY_ACTIONS:
                actions = [
                    {str(k): v for k, v in a.items() if len(str(k)) <= 64 and _scalar(v)}
                    for a in value
                    if isinstance(a, dict)
                ]
                out[key] = actions
        elif _scalar(value):
            out[key] = value
    return out


def _parse_policy(text: str) -> dict[str, Any]:
    if len(text) > MAX_POLICY_BYTES:
        log.debug("dropping an oversized policy report from a migration cookie")
        return {}
    try:
        data = json.loads(text)
    except ValueError:
        log.debug("dropping a malformed policy report from a migration cookie")
        return {}
    return policy_report(data) if isinstance(data, dict) else {}


def _parse_xml(text: str) -> ET.Element:
    if len(text) > MAX_COOKIE_BYTES:
        raise _invalid(f"migration cookie is larger than {MAX_COOKIE_BYTES // 1024} KiB")
    try:
        size = len(text.encode("utf-8"))
    except UnicodeEncodeError as err:
        raise _invalid(f"migration cookie is not valid UTF-8 text: {err.reason}") from None
    if size > MAX_COOKIE_BYTES:
        raise _invalid(f"migration cookie is larger than {MAX_COOKIE_BYTES // 1024} KiB")
    try:
        root: ET.Element = SafeET.fromstring(text, forbid_dtd=True)
    except (ET.ParseError, DefusedXmlException, ValueError) as err:
        raise _invalid(f"malformed migration cookie: {err}") from None
    _check_depth(root)
    if root.tag != "qemu-migration":
        raise _invalid("migration cookie is not <qemu-migration>")
    return root


def _check_depth(root: ET.Element) -> None:
    # Iterative: serializing or walking a deeper tree recursively would overflow the stack.
    stack = [(root, 1)]
    while stack:
        el, depth = stack.pop()
        if depth > MAX_DEPTH:
            raise _invalid(f"migration cookie is nested deeper than {MAX_DEPTH} elements")
        stack.extend((child, depth + 1) for child in el)


def _header(root: ET.Element, tag: str) -> str:
    el = root.find(tag)
    if el is None or not (el.text or "").strip():
        raise _invalid(f"missing {tag} element in migration cookie")
    return (el.text or "").strip()


def _uuid(text: str, what: str) -> uuidlib.UUID:
    try:
        return uuidlib.UUID(text)
    except (ValueError, TypeError):
        raise _invalid(f"malformed {what} '{text[:64]}' in migration cookie") from None


def same_uuid(a: str, b: str) -> bool:
    """Whether *a* and *b* name the same UUID (any case or spelling); malformed: never."""
    try:
        return uuidlib.UUID(a) == uuidlib.UUID(b)
    except (ValueError, TypeError):
        return False


def _mandatory(root: ET.Element) -> list[str]:
    features = []
    for feature in root.findall("feature"):
        fname = feature.get("name")
        if not fname:
            raise _invalid("missing feature name in migration cookie")
        if fname not in LIBVIRT_FEATURES:
            raise VmferryError(
                ErrorCode.NO_SUPPORT, f"Unknown migration cookie feature {fname[:64]}"
            )
        if fname not in SUPPORTED_MANDATORY:
            raise VmferryError(
                ErrorCode.NO_SUPPORT, f"Unsupported migration cookie feature {fname}"
            )
        features.append(fname)
    return features


def _parse_lockstate(root: ET.Element, cookie: MigrationCookie) -> None:
    lock = root.find("lockstate")
    if lock is None:
        return
    driver = lock.get("driver")
    if not driver:
        raise _invalid("Missing lock driver name in migration cookie")
    cookie.lock_driver = driver
    cookie.leases = lock.findtext("leases", "") or ""
    if cookie.leases and driver not in LOCK_DRIVERS:
        raise VmferryError(
            ErrorCode.NO_SUPPORT,
            f"Source host lock driver {driver[:64]} is not supported "
            f"(known: {', '.join(sorted(LOCK_DRIVERS))})",
        )


def check_lockstate(cookie: MigrationCookie, local_driver: str) -> None:
    """The destination's check of the source's ``<lockstate>``: both hosts use one lock driver."""
    source = cookie.lock_driver if cookie.leases else "none"
    source = "none" if source == LOCK_DRIVER else source
    if source != local_driver:
        raise VmferryError(
            ErrorCode.NO_SUPPORT,
            f"Source host lock driver {source[:64]} different from target {local_driver} "
            "(both hosts need the same [cluster] lease backend)",
        )


def _parse_persistent(root: ET.Element, cookie: MigrationCookie) -> None:
    domains = root.findall("domain")
    if not domains:
        return
    if len(domains) > 1:
        raise _invalid("Too many domain elements in migration cookie")
    cookie.persistent_xml = ET.tostring(domains[0], encoding="unicode")
    cookie.persistent = parse_domain_xml(cookie.persistent_xml)


def _parse_nbd(root: ET.Element, cookie: MigrationCookie) -> None:
    nbd = root.find("nbd")
    if nbd is None:
        return
    port = nbd.get("port")
    if port is not None:
        value = _int(port, signed=False)
        if value is None or value > 65535:
            raise _invalid(f"Malformed nbd port '{port[:32]}' in migration cookie")
        cookie.nbd_port = value
    for disk in nbd.findall("disk"):
        target = disk.get("target")
        if not target:
            raise _invalid("Malformed disk target in migration cookie")
        capacity = _int(disk.get("capacity", ""), signed=False)
        if capacity is None:
            raise _invalid(f"Malformed disk capacity of '{target[:64]}' in migration cookie")
        backing = disk.get("backing", "")
        backing_format = disk.get("backingFormat", "")
        if backing and (
            not _FILE_NAME.fullmatch(backing) or backing_format not in ("raw", "qcow2")
        ):
            raise _invalid(f"Malformed backing file of disk '{target[:64]}' in migration cookie")
        cookie.nbd_disks.append(NbdDisk(target, capacity, backing, backing_format))


def _parse_tls(root: ET.Element, cookie: MigrationCookie) -> None:
    tls = root.find("tls")
    if tls is None:
        return

    def yes_no(attr: str) -> bool | None:
        value = tls.get(attr)
        if value is None:
            return None
        if value not in ("yes", "no"):
            raise _invalid(f"Malformed tls {attr} '{value[:16]}' in migration cookie")
        return value == "yes"

    cookie.tls_pki = yes_no("pki")
    cookie.tls_use = yes_no("use")
    mode = tls.get("mode", "")
    if mode not in ("", "off", "on", "required"):
        raise _invalid(f"Malformed tls mode '{mode[:16]}' in migration cookie")
    cookie.tls_mode = mode
    channels = tls.get("channels")
    if channels is not None:
        if not channels.isdigit() or not 1 <= int(channels) <= TLS_MAX_CHANNELS:
            raise _invalid(f"Malformed tls channels '{channels[:16]}' in migration cookie")
        cookie.tls_channels = int(channels)


def _parse_statistics(stats: ET.Element) -> dict[str, int]:
    out: dict[str, int] = {}
    for key in STAT_NAMES:
        el = stats.find(key)
        if el is None:
            continue
        value = _int(el.text or "", signed=key in _SIGNED)
        if value is None:
            # libvirt leaves a statistic it cannot read unset; it is information only
            log.warning("migration cookie: ignoring malformed statistic %s", key)
            continue
        out[key] = value
    return out


def _int(text: str, *, signed: bool) -> int | None:
    """A decimal integer in 64-bit range, or None (no float, nan, inf or huge numbers)."""
    text = text.strip()
    if not _INT_RE.fullmatch(text):
        return None
    value = int(text)
    if signed:
        return value if -_I64 - 1 <= value <= _I64 else None
    return value if 0 <= value <= _U64 else None
