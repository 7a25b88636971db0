"""The migration cookie passed between protocol steps (libvirt's ``<qemu-migration>``).

Each step's output cookie is the next step's input. The header (name, uuid,
hostname, hostuuid, mandatory features) is checked on receipt; the parts carry
what one side must tell the other: the persistent definition, statistics,
QEMU's migration capabilities.
"""

from __future__ import annotations

import xml.etree.ElementTree as ET
from dataclasses import dataclass, field

import defusedxml.ElementTree as SafeET
from defusedxml import DefusedXmlException

from vmferry.errors import ErrorCode, VmferryError

# Parts this version understands. "lockstate" is reserved (no lock manager yet).
KNOWN_FEATURES = frozenset({"persistent", "statistics", "capabilities", "lockstate"})
# Parts a receiver must understand when the sender marks them mandatory.
MANDATORY_CAPABLE = frozenset({"persistent", "lockstate"})
_MAX_COOKIE = 1 << 20

STAT_FIELDS = (
    "started",
    "stopped",
    "sent",
    "received",
    "delta",
    "downtime",
    "total_time",
    "setup_time",
    "transferred",
    "remaining",
    "total",
)


@dataclass
class MigrationCookie:
    name: str
    uuid: str
    hostname: str
    hostuuid: str
    mandatory: list[str] = field(default_factory=list)
    persistent_xml: str | None = None
    statistics: dict[str, float] = field(default_factory=dict)
    capabilities: dict[str, bool] = field(default_factory=dict)  # QEMU caps the sender supports

    def to_xml(self) -> str:
        root = ET.Element("qemu-migration")
        for tag in ("name", "uuid", "hostname", "hostuuid"):
            ET.SubElement(root, tag).text = getattr(self, tag)
        for feature in self.mandatory:
            ET.SubElement(root, "feature", name=feature)
        if self.capabilities:
            caps = ET.SubElement(root, "capabilities")
            for cap, auto in sorted(self.capabilities.items()):
                ET.SubElement(caps, "cap", name=cap, auto="yes" if auto else "no")
        if self.statistics:
            stats = ET.SubElement(root, "statistics")
            for key, value in self.statistics.items():
                ET.SubElement(stats, key).text = repr(value)
        if self.persistent_xml is not None:
            persistent = ET.SubElement(root, "persistent")
            persistent.append(SafeET.fromstring(self.persistent_xml))
        return ET.tostring(root, encoding="unicode")


def parse_cookie(text: str, *, name: str, uuid: str, local_hostuuid: str) -> MigrationCookie:
    """Parse and check a cookie received from the peer.

    *name* and *uuid* are the domain's original ones (before any ``--dname``).
    """
    if len(text) > _MAX_COOKIE:
        raise VmferryError(ErrorCode.INVALID_ARG, "migration cookie is too large")
    try:
        root = SafeET.fromstring(text)
    except (ET.ParseError, DefusedXmlException) as err:
        raise VmferryError(ErrorCode.INVALID_ARG, f"malformed migration cookie: {err}") from err
    if root.tag != "qemu-migration":
        raise VmferryError(ErrorCode.INVALID_ARG, "migration cookie is not <qemu-migration>")
    cookie = MigrationCookie(
        name=root.findtext("name", ""),
        uuid=root.findtext("uuid", ""),
        hostname=root.findtext("hostname", ""),
        hostuuid=root.findtext("hostuuid", ""),
    )
    if cookie.name != name:
        raise VmferryError(
            ErrorCode.INVALID_ARG,
            f"Incoming cookie data had unexpected name {cookie.name} vs {name}",
        )
    if cookie.uuid != uuid:
        raise VmferryError(
            ErrorCode.INVALID_ARG,
            f"Incoming cookie data had unexpected UUID {cookie.uuid} vs {uuid}",
        )
    if cookie.hostuuid == local_hostuuid:
        raise VmferryError(
            ErrorCode.OPERATION_INVALID,
            f"Attempt to migrate guest to the same host {local_hostuuid}",
        )
    for feature in root.findall("feature"):
        fname = feature.get("name", "")
        if fname not in KNOWN_FEATURES:
            raise VmferryError(ErrorCode.NO_SUPPORT, f"Unknown migration cookie feature {fname}")
        if fname not in MANDATORY_CAPABLE or fname == "lockstate":
            raise VmferryError(
                ErrorCode.NO_SUPPORT, f"Unsupported migration cookie feature {fname}"
            )
        cookie.mandatory.append(fname)
    caps = root.find("capabilities")
    if caps is not None:
        cookie.capabilities = {
            c.get("name", ""): c.get("auto") == "yes" for c in caps.findall("cap")
        }
    stats = root.find("statistics")
    if stats is not None:
        for child in stats:
            try:
                cookie.statistics[child.tag] = float(child.text or 0)
            except ValueError:
                continue
    persistent = root.find("persistent")
    if persistent is not None and len(persistent):
        cookie.persistent_xml = ET.tostring(persistent[0], encoding="unicode")
    return cookie
