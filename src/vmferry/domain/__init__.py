"""Domain definitions: the model, and domain XML in and out (libvirt's ``domain_conf``)."""

from vmferry.domain.model import (
    CharDef,
    CpuDef,
    Devices,
    DiskDef,
    DomainDef,
    FeaturesDef,
    GraphicsDef,
    InterfaceDef,
    OsDef,
)
from vmferry.domain.xml import check_abi_stability, format_domain_xml, parse_domain_xml

__all__ = [
    "CharDef",
    "CpuDef",
    "Devices",
    "DiskDef",
    "DomainDef",
    "FeaturesDef",
    "GraphicsDef",
    "InterfaceDef",
    "OsDef",
    "check_abi_stability",
    "format_domain_xml",
    "parse_domain_xml",
]
