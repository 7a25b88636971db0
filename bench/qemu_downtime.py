"""
Where QEMU's own downtime goes, from QEMU's trace events (``migrate_bench.py --qemu-trace``).

QEMU marks its downtime with ``vmstate_downtime_checkpoint``: the source stops the
guest (``src-downtime-start``), has sent the RAM (``src-iterable-saved``) and the
device state (``src-non-iterable-saved``); the destination has loaded everything
(``dst-precopy-loadvm-completed``); the source hears so (``src-downtime-end``).
``migrate_pending_exact`` says how much was left to send when QEMU decided to stop
the guest. With ``-msg timestamp=on`` (vmferry's QEMUs have it) each line carries
the host's wall clock, so both QEMUs of a hop line up.

The floor's QEMUs get the events on their command line (:func:`argv`); vmferry's
from the daemons' ``[qemu] trace_events``. QEMU writes them to its log.
"""

from __future__ import annotations

import re
import statistics
from collections.abc import Iterable, Sequence
from pathlib import Path

#: The trace events turned on in both arms' QEMUs.
EVENTS = ("vmstate_downtime_checkpoint", "migrate_pending_exact")

_LINE = re.compile(r"^(\d+)@(\d+\.\d+):(\S+) ?(.*)$")
MIB = 1 << 20

_LOADED = "dst-precopy-loadvm-completed"
#: (label, from checkpoint, to checkpoint) of each part of the downtime.
PARTS = (
    ("QEMU downtime (traced) ms", "src-downtime-start", "src-downtime-end"),
    ("  RAM sent with the guest stopped ms", "src-vm-stopped", "src-iterable-saved"),
    ("  device state ms", "src-iterable-saved", "src-non-iterable-saved"),
    ("  then the destination done loading ms", "src-non-iterable-saved", _LOADED),
    ("  then the source hears it ms", _LOADED, "src-downtime-end"),
)


def argv() -> list[str]:
    """QEMU options that turn the events on (and timestamp them)."""
    out = ["-msg", "timestamp=on"]
    for event in EVENTS:
        out += ["-trace", event]
    return out


def config_toml() -> str:
    """The daemons' ``[qemu]`` table that turns the same events on."""
    names = ", ".join(f'"{e}"' for e in EVENTS)
    return f"[qemu]\ntrace_events = [{names}]\n"


def _events(files: Iterable[Path]) -> list[tuple[float, int, str, str]]:
    out = []
    for f in files:
        for line in f.read_text(errors="replace").splitlines():
            m = _LINE.match(line)
            if m:
                out.append((float(m[2]), int(m[1]), m[3], m[4]))
    return sorted(out)


def hops(files: Iterable[Path]) -> list[dict[str, float]]:
    """One dict per outgoing migration in *files* (QEMU logs of both sides): times, MiB left."""
    events = _events(files)
    found = []
    for i, (t0, pid, name, what) in enumerate(events):
        if name != "vmstate_downtime_checkpoint" or what != "src-downtime-start":
            continue
        hop: dict[str, float] = {"src-downtime-start": t0}
        before = [e for e in events[:i] if e[1] == pid and e[2] == "migrate_pending_exact"]
        if before:
            size = re.search(r"size (\d+)", before[-1][3])
            if size:
                hop["pending_mib"] = int(size[1]) / MIB
        for t, p, n, w in events[i + 1 :]:
            if n != "vmstate_downtime_checkpoint" or w in hop:
                continue
            if w.startswith("src-downtime-start"):
                break  # the next hop
            if w.startswith("src-") and p != pid:
                continue
            hop[w] = t
            if w == "src-downtime-end":
                break
        found.append(hop)
    return found


def breakdown(hops_: Sequence[dict[str, float]]) -> dict[str, float]:
    """Medians over *hops_* of each part of the downtime, and of what was left at the stop."""
    out: dict[str, float] = {}
    for label, a, b in PARTS:
        xs = [(h[b] - h[a]) * 1000 for h in hops_ if a in h and b in h]
        if xs:
            out[label] = statistics.median(xs)
    left = [h["pending_mib"] for h in hops_ if "pending_mib" in h]
    if left:
        out["left to send when QEMU stopped the guest, MiB"] = statistics.median(left)
    out["hops"] = float(len(hops_))
    return out


def render(arms: dict[str, dict[str, float]]) -> str:
    names = list(arms)
    keys = [k for k in next(iter(arms.values()))]
    lines = ["", "QEMU's downtime from its trace events (median per hop):"]
    lines.append(f"  {'':<48}" + "".join(f"{n:>18}" for n in names))
    for k in keys:
        lines.append(f"  {k:<48}" + "".join(f"{arms[n].get(k, float('nan')):18.1f}" for n in names))
    return "\n".join(lines)
