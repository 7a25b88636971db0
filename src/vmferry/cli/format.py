"""Text and JSON output of the ``vmferry`` command, laid out like virsh's."""

from __future__ import annotations

import datetime
import json
from collections.abc import Iterable, Sequence
from typing import Any

from pydantic import BaseModel

from vmferry.api.models import DomainInfo, DomainStateInfo, Event, HostInfo
from vmferry.domain.state import ErrorReason

# virsh's words for the states (virshDomainStateToString).
_STATE_TEXT = {
    "nostate": "no state",
    "running": "running",
    "paused": "paused",
    "shutdown": "in shutdown",
    "shutoff": "shut off",
    "crashed": "crashed",
}

# Domain lifecycle events print as virsh's 'lifecycle' event; the rest under their own name.
_LIFECYCLE = {"defined", "undefined", "started", "suspended", "resumed", "stopped", "shutdown"}


def to_json(
    value: BaseModel | Sequence[BaseModel] | dict[str, Any], *, indent: int | None = 2
) -> str:
    """One JSON document for a model, a list of models or a plain dict."""
    data: Any
    if isinstance(value, BaseModel):
        data = value.model_dump(mode="json")
    elif isinstance(value, dict):
        data = value
    else:
        data = [item.model_dump(mode="json") for item in value]
    return json.dumps(data, indent=indent)


def state_text(state: str) -> str:
    return _STATE_TEXT.get(state, state)


def table(headers: Sequence[str], rows: Iterable[Sequence[str]]) -> str:
    """
    virsh's table: a leading space, columns three spaces apart, a dashed rule.

        Id   Name   State
       ----------------------
        1    vm1    running
    """
    rows = [list(row) for row in rows]
    widths = [max([len(h), *(len(row[i]) for row in rows)]) for i, h in enumerate(headers)]

    def line(cells: Sequence[str]) -> str:
        return (" " + "   ".join(c.ljust(w) for c, w in zip(cells, widths, strict=True))).rstrip()

    rule = "-" * (sum(widths) + 3 * (len(widths) - 1) + 2)
    return "\n".join([line(headers), rule, *(line(row) for row in rows)])


def fields(pairs: Iterable[tuple[str, object]]) -> str:
    """``Label:          value`` lines, values aligned like ``virsh dominfo``."""
    return "\n".join(f"{label + ':':<15} {value}".rstrip() for label, value in pairs)


def _yes_no(flag: bool) -> str:
    return "yes" if flag else "no"


def _listed_state(d: DomainInfo) -> str:
    # A domain the daemon could not fully load says why, even without --reason.
    if d.reason in ErrorReason.__members__.values():
        return f"{state_text(d.state)} ({d.reason})"
    return state_text(d.state)


def domain_list(domains: Iterable[DomainInfo]) -> str:
    rows = [["-" if d.id is None else str(d.id), d.name, _listed_state(d)] for d in domains]
    return table(["Id", "Name", "State"], rows)


def host_info(host: HostInfo) -> str:
    return fields(
        [
            ("Hostname", host.hostname),
            ("UUID", host.uuid),
            ("Version", host.version),
            ("QEMU version", host.qemu_version or "-"),
            ("Features", " ".join(host.features) or "-"),
        ]
    )


def domain_info(dom: DomainInfo) -> str:
    pairs: list[tuple[str, object]] = [
        ("Id", "-" if dom.id is None else dom.id),
        ("Name", dom.name),
        ("UUID", dom.uuid),
    ]
    if dom.title:
        pairs.append(("Title", dom.title))
    pairs += [
        ("Type", dom.domain_type),
        ("State", state_text(dom.state)),
        ("Reason", dom.reason or "-"),
        ("CPU(s)", dom.vcpus),
        ("Max memory", f"{dom.max_memory_kib} KiB"),
        ("Used memory", f"{dom.memory_kib} KiB"),
        ("Persistent", _yes_no(dom.persistent)),
        ("Autostart", "enable" if dom.autostart else "disable"),  # virsh's words
    ]
    job = dom.job
    if job.job != "none":
        pairs.append(("Job", f"{job.job} ({job.job_owner_api})" if job.job_owner_api else job.job))
    if job.async_job != "none":
        owner = f", {job.async_owner_api}" if job.async_owner_api else ""
        pairs.append(("Async job", f"{job.async_job} (phase {job.phase}{owner})"))
    return fields(pairs)


def domain_state(info: DomainStateInfo, *, reason: bool = False) -> str:
    text = state_text(info.state)
    return f"{text} ({info.reason})" if reason and info.reason else text


def _words(text: str) -> str:
    """``migration-canceled`` -> ``Migration canceled``, as virsh capitalises details."""
    text = text.replace("-", " ").replace("_", " ")
    return text[:1].upper() + text[1:]


def event_line(event: Event, *, timestamp: bool = False) -> str:
    """
    One event as virsh prints it:
    ``event 'lifecycle' for domain 'vm1': Started Booted``.
    """
    if event.type in _LIFECYCLE:
        head = f"event 'lifecycle' for domain '{event.domain}': {_words(event.type)}"
        text = f"{head} {_words(event.reason)}" if event.reason else head
    else:
        text = f"event '{event.type}' for domain '{event.domain}'"
        details = [f"{key}: '{value}'" for key, value in event.detail.items()]
        if not details and event.reason:
            details = [_words(event.reason)]
        if details:
            text += ": " + ", ".join(details)
    if timestamp:
        when = datetime.datetime.fromtimestamp(event.timestamp, datetime.UTC)
        text = f"{when.strftime('%Y-%m-%d %H:%M:%S.%f')[:-3]}+0000: {text}"
    return text
