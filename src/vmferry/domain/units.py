"""libvirt's size units (``virScaleInteger``), shared by domain XML and ``vmferry setmem``.

Imports nothing heavy: the CLI parses sizes with it before any client is loaded.
"""

from __future__ import annotations

import re

#: Upper bound for memory (1 PiB), so absurd values fail here and not in QEMU.
MAX_MEMORY_KIB = 1 << 40

# k/KiB are 1024, KB is 1000, and so on.
_UNIT_POWER: dict[str, int] = {"k": 1, "m": 2, "g": 3, "t": 4, "p": 5, "e": 6}
_SCALED = re.compile(r"\s*([0-9]+)\s*([A-Za-z]*)\s*")


def unit_scale(unit: str) -> int | None:
    """Bytes per *unit* (``b``, ``k``, ``KiB``, ``KB``, ``M``, ...), None if unknown."""
    lowered = unit.lower()
    if lowered in ("b", "byte", "bytes"):
        return 1
    power = _UNIT_POWER.get(lowered[:1])
    rest = lowered[1:]
    if power is None or rest not in ("", "ib", "b"):
        return None
    return int((1000 if rest == "b" else 1024) ** power)


def scaled_kib(text: str, default_unit: str = "KiB") -> int | None:
    """``"512M"``, ``"1GiB"``, ``"4096"`` (in *default_unit*) as KiB rounded up; None if invalid."""
    m = _SCALED.fullmatch(text)
    if m is None:
        return None
    scale = unit_scale(m[2] or default_unit)
    if scale is None:
        return None
    return -(-int(m[1]) * scale // 1024)
