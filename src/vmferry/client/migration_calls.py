"""The requests of the migration APIs (``/v1/.../migrate/...``), described once."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from vmferry.client.calls import Call, domain_path, lazy_model

if TYPE_CHECKING:
    from vmferry.api.models import (
        BeginReply,
        CookieBody,
        DowntimeBody,
        JobStats,
        MigrationResult,
        PrepareReply,
        SpeedBody,
        StepReply,
    )

# The bodies are plain dicts (the daemon validates them against vmferry.api.models),
# the answers pydantic models imported when parsed: `vmferry migrate` reads the
# answers' JSON with fetch() and never imports pydantic (docs/cli.md).

SESSION_PATH = "/v1/session"
SESSION_HEADER = "X-Vmferry-Session"
# Perform runs as long as QEMU needs to move the guest: no fixed deadline is right,
# so give it a day; the session's keepalive tells a dead daemon apart.
LONG_CALL = 24 * 3600.0


def _session(session: str) -> dict[str, str] | None:
    return {SESSION_HEADER: session} if session else None


def begin(name: str, flags: int, params: dict[str, Any], session: str) -> Call[BeginReply]:
    return Call(
        "POST",
        domain_path(name, "/migrate/begin"),
        lazy_model("BeginReply"),
        body={"flags": flags, "params": params},
        headers=_session(session),
    )


def prepare(
    xml: str, cookie: str | None, flags: int, params: dict[str, Any], session: str
) -> Call[PrepareReply]:
    return Call(
        "POST",
        "/v1/migrate/prepare",
        lazy_model("PrepareReply"),
        body={"xml": xml, "cookie": cookie, "flags": flags, "params": params},
        headers=_session(session),
    )


def perform(name: str, cookie: str, uri: str, peer_uri: str = "") -> Call[CookieBody]:
    return Call(
        "POST",
        domain_path(name, "/migrate/perform"),
        lazy_model("CookieBody"),
        body={"cookie": cookie, "uri": uri, "peer_uri": peer_uri},
        min_timeout=LONG_CALL,
    )


def tunnel(name: str, session: str, stream: str = "") -> Call[CookieBody]:
    """A tunnel of the destination's incoming *name*, which *session* prepared (an Upgrade).

    *stream*: "" the migration stream, ``nbd`` one more NBD connection (storage).
    """
    headers = {"X-Vmferry-Session": session}
    if stream:
        headers["X-Vmferry-Stream"] = stream
    path = domain_path(name, "/migrate/tunnel")
    return Call("POST", path, lazy_model("CookieBody"), headers=headers)


def perform2(
    name: str, uri: str, flags: int, params: dict[str, Any], peer_uri: str = ""
) -> Call[CookieBody]:
    return Call(
        "POST",
        domain_path(name, "/migrate/perform2"),
        lazy_model("CookieBody"),
        body={"uri": uri, "flags": flags, "params": params, "peer_uri": peer_uri},
        min_timeout=LONG_CALL,
    )


def finish(name: str, cookie: str | None, cancelled: bool, v3: bool) -> Call[StepReply]:
    return Call(
        "POST",
        domain_path(name, "/migrate/finish"),
        lazy_model("StepReply"),
        body={"cookie": cookie, "cancelled": cancelled, "v3": v3},
        min_timeout=300.0,
    )


def confirm(name: str, cookie: str, cancelled: bool) -> Call[StepReply]:
    return Call(
        "POST",
        domain_path(name, "/migrate/confirm"),
        lazy_model("StepReply"),
        body={"cookie": cookie, "cancelled": cancelled},
    )


def migrate_p2p(
    name: str, dest_uri: str, flags: int, params: dict[str, Any]
) -> Call[MigrationResult]:
    return Call(
        "POST",
        domain_path(name, "/migrate"),
        lazy_model("MigrationResult"),
        body={"dest_uri": dest_uri, "flags": flags, "params": params},
        min_timeout=LONG_CALL,
    )


def jobinfo(name: str, completed: bool = False) -> Call[JobStats]:
    return Call(
        "GET",
        domain_path(name, "/jobinfo"),
        lazy_model("JobStats"),
        params={"completed": "true" if completed else "false"},
    )


def jobabort(name: str, postcopy: bool = False) -> Call[CookieBody]:
    """Abort the migration; with *postcopy* pause a post-copy migration instead (resumable)."""
    return Call(
        "POST",
        domain_path(name, "/jobabort"),
        lazy_model("CookieBody"),
        params={"postcopy": "true"} if postcopy else None,
    )


def start_postcopy(name: str) -> Call[CookieBody]:
    """Switch the running outgoing migration to post-copy (``migrate-postcopy``)."""
    return Call("POST", domain_path(name, "/migrate/postcopy"), lazy_model("CookieBody"))


def get_maxdowntime(name: str) -> Call[DowntimeBody]:
    return Call("GET", domain_path(name, "/migrate/maxdowntime"), lazy_model("DowntimeBody"))


def set_maxdowntime(name: str, downtime_ms: int) -> Call[DowntimeBody]:
    return Call(
        "PUT",
        domain_path(name, "/migrate/maxdowntime"),
        lazy_model("DowntimeBody"),
        body={"downtime_ms": downtime_ms},  # the daemon validates
    )


def get_speed(name: str) -> Call[SpeedBody]:
    return Call("GET", domain_path(name, "/migrate/speed"), lazy_model("SpeedBody"))


def set_speed(name: str, bandwidth_mib_s: int) -> Call[SpeedBody]:
    return Call(
        "PUT",
        domain_path(name, "/migrate/speed"),
        lazy_model("SpeedBody"),
        body={"bandwidth_mib_s": bandwidth_mib_s},  # the daemon validates
    )
