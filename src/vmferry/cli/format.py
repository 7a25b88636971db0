"""Text and JSON output of the ``vmferry`` command, laid out like virsh's.

The domain and host layouts take the daemon's JSON as it came (a dict, see
docs/api.md), so that the fast commands never import the API's pydantic
models (docs/cli.md); they, and :func:`to_json`, also take the models.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from vmferry.api.models import Event

#: vmferry.domain.state.ErrorReason's values (importing vmferry.domain would load its XML
#: code; a unit test keeps the two equal).
ERROR_REASONS = frozenset({"status-corrupt", "monitor-lost"})

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


def plain(value: Any) -> Any:
    """JSON data as is; a pydantic model (or a list of them) as its JSON data."""
    if hasattr(value, "model_dump"):  # a pydantic model
        return value.model_dump(mode="json")
    if isinstance(value, list | tuple):
        return [plain(item) for item in value]
    return value


def to_json(value: Any, *, indent: int | None = 2) -> str:
    """One JSON document for JSON data, a model, or a list of either."""
    import json

    return json.dumps(plain(value), indent=indent)


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


def _listed_state(d: Mapping[str, Any]) -> str:
    # A domain the daemon could not fully load says why, even without --reason.
    if d.get("reason") in ERROR_REASONS:
        return f"{state_text(d['state'])} ({d['reason']})"
    return state_text(d["state"])


def domain_list(domains: Iterable[Mapping[str, Any]]) -> str:
    """``vmferry list``'s table of ``GET /v1/domains``' answer (or of DomainInfo models)."""
    domains = plain(list(domains))
    rows = [
        ["-" if d.get("id") is None else str(d["id"]), str(d["name"]), _listed_state(d)]
        for d in domains
    ]
    return table(["Id", "Name", "State"], rows)


def host_info(host: Mapping[str, Any]) -> str:
    host = plain(host)
    return fields(
        [
            ("Hostname", host["hostname"]),
            ("UUID", host["uuid"]),
            ("Version", host["version"]),
            ("QEMU version", host.get("qemu_version") or "-"),
            ("Features", " ".join(host.get("features") or []) or "-"),
        ]
    )


def domain_info(dom: Mapping[str, Any]) -> str:
    """``vmferry dominfo``'s lines of one domain (``GET /v1/domains/NAME``, or a DomainInfo)."""
    dom = plain(dom)
    pairs: list[tuple[str, object]] = [
        ("Id", "-" if dom.get("id") is None else dom["id"]),
        ("Name", dom["name"]),
        ("UUID", dom["uuid"]),
    ]
    if dom.get("title"):
        pairs.append(("Title", dom["title"]))
    pairs += [
        ("Type", dom.get("domain_type", "qemu")),
        ("State", state_text(dom["state"])),
        ("Reason", dom.get("reason") or "-"),
        ("CPU(s)", dom["vcpus"]),
        ("Max memory", f"{dom['max_memory_kib']} KiB"),
        ("Used memory", f"{dom['memory_kib']} KiB"),
        ("Persistent", _yes_no(bool(dom["persistent"]))),
        ("Autostart", "enable" if dom.get("autostart") else "disable"),  # virsh's words
    ]
    job: Mapping[str, Any] = dom.get("job") or {}
    sync_job, owner = job.get("job", "none"), job.get("job_owner_api", "")
    if sync_job != "none":
        pairs.append(("Job", f"{sync_job} ({owner})" if owner else sync_job))
    if job.get("async_job", "none") != "none":
        owner = f", {job['async_owner_api']}" if job.get("async_owner_api") else ""
        pairs.append(("Async job", f"{job['async_job']} (phase {job.get('phase')}{owner})"))
    return fields(pairs)


def domain_state(info: Mapping[str, Any], *, reason: bool = False) -> str:
    info = plain(info)
    text = state_text(info["state"])
    return f"{text} ({info['reason']})" if reason and info.get("reason") else text


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
        import datetime

        when = datetime.datetime.fromtimestamp(event.timestamp, datetime.UTC)
        text = f"{when.strftime('%Y-%m-%d %H:%M:%S.%f')[:-3]}+0000: {text}"
    return text
