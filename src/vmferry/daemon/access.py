"""Who may call what: roles, per-route permissions, and the audit log.

Every connection gets a :class:`Caller` from its listener (never from
anything the client sends): a unix socket's peer credentials, a TLS
client certificate's subject, and the listener's ``?ro=1`` cap
(see :mod:`vmferry.daemon.peer`).  :class:`AccessMiddleware` maps each
request to one permission through :data:`PERMISSIONS`, refuses it with
``403 access-denied`` unless the caller's role holds that permission, and
writes one audit line for every call that is not a read (and for the reads
of :data:`AUDITED_READS`, which hand out a guest's data).
"""

from __future__ import annotations

import datetime
import fnmatch
import json
import logging
import os
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from enum import StrEnum
from pathlib import Path
from typing import Any

from fastapi import FastAPI
from starlette.responses import JSONResponse
from starlette.routing import compile_path
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from vmferry.errors import ErrorCode, VmferryError

audit_log = logging.getLogger("vmferry.audit")

#: The ASGI scope key the listener puts the connection's :class:`Caller` under.
CALLER_KEY = "vmferry.caller"


class Role(StrEnum):
    READ_ONLY = "read-only"
    ADMIN = "admin"


@dataclass(frozen=True)
class Caller:
    """
    The peer of one connection, as its listener saw it.

    :param role: ``None`` if a TLS certificate is in no allow-list: every
        request of the connection is refused.
    """

    role: Role | None
    transport: str  # "unix", "tls" or "tcp"
    uid: int | None = None
    gid: int | None = None
    pid: int | None = None
    subject: str = ""  # TLS: the certificate's subject, RFC 4514
    address: str = ""  # TCP/TLS: host:port of the peer

    def identity(self) -> str:
        """A one-line description for logs: ``unix uid=0 gid=0 pid=42``, ``tls CN=...``."""
        if self.transport == "unix":
            return f"unix uid={self.uid} gid={self.gid} pid={self.pid}"
        if self.transport == "tls":
            return f"tls {self.subject} from {self.address}"
        return f"{self.transport} {self.address}"


#: The permission of every route: (method, path template) -> permission.
#: HEAD counts as GET.  A route missing here makes the daemon refuse to start.
PERMISSIONS: dict[tuple[str, str], str] = {
    ("GET", "/openapi.json"): "api.read",
    ("GET", "/docs"): "api.read",
    ("GET", "/docs/oauth2-redirect"): "api.read",
    ("GET", "/redoc"): "api.read",
    ("GET", "/metrics"): "metrics.read",
    ("GET", "/v1/host"): "host.read",
    ("GET", "/v1/cluster"): "cluster.read",
    ("GET", "/v1/events"): "events.read",
    ("GET", "/v1/domains"): "domain.read",
    ("GET", "/v1/domains/{name}"): "domain.read",
    ("GET", "/v1/domains/{name}/state"): "domain.read",
    ("GET", "/v1/domains/{name}/xml"): "domain.read",
    ("GET", "/v1/domains/{name}/jobinfo"): "domain.read",
    ("GET", "/v1/domains/{name}/migrate/maxdowntime"): "domain.read",
    ("GET", "/v1/domains/{name}/migrate/speed"): "domain.read",
    ("GET", "/v1/domains/{name}/interfaces"): "domain.read",
    ("GET", "/v1/domains/{name}/vncdisplay"): "domain.read",
    ("GET", "/v1/domstats"): "domain.read",
    ("GET", "/v1/domains/{name}/console"): "domain.console",
    ("POST", "/v1/domains"): "domain.define",
    ("POST", "/v1/domains/create"): "domain.create",
    ("DELETE", "/v1/domains/{name}"): "domain.undefine",
    ("POST", "/v1/domains/{name}/start"): "domain.start",
    ("POST", "/v1/domains/{name}/shutdown"): "domain.shutdown",
    ("POST", "/v1/domains/{name}/destroy"): "domain.destroy",
    ("POST", "/v1/domains/{name}/suspend"): "domain.suspend",
    ("POST", "/v1/domains/{name}/resume"): "domain.resume",
    ("POST", "/v1/domains/{name}/reboot"): "domain.reboot",
    ("POST", "/v1/domains/{name}/reset"): "domain.reset",
    ("PUT", "/v1/domains/{name}/autostart"): "domain.autostart",
    ("PUT", "/v1/domains/{name}/memory"): "domain.memory",
    ("PUT", "/v1/domains/{name}/maxmemory"): "domain.memory",
    ("POST", "/v1/domains/{name}/jobabort"): "domain.jobabort",
    # A session holds prepared incoming migrations open: not a read.
    ("GET", "/v1/session"): "migrate.session",
    ("POST", "/v1/migrate/prepare"): "migrate.prepare",
    ("POST", "/v1/domains/{name}/migrate/begin"): "migrate.begin",
    ("POST", "/v1/domains/{name}/migrate/perform"): "migrate.perform",
    ("POST", "/v1/domains/{name}/migrate/perform2"): "migrate.perform",
    ("POST", "/v1/domains/{name}/migrate/finish"): "migrate.finish",
    ("POST", "/v1/domains/{name}/migrate/confirm"): "migrate.confirm",
    # the tunnelled stream of a prepared incoming migration: as powerful as Prepare
    ("POST", "/v1/domains/{name}/migrate/tunnel"): "migrate.prepare",
    ("POST", "/v1/domains/{name}/migrate"): "migrate.p2p",
    ("POST", "/v1/domains/{name}/migrate/postcopy"): "migrate.postcopy",
    ("PUT", "/v1/domains/{name}/migrate/maxdowntime"): "migrate.tune",
    ("PUT", "/v1/domains/{name}/migrate/speed"): "migrate.tune",
    ("GET", "/v1/domains/{name}/blklist"): "domain.read",
    ("GET", "/v1/pools"): "storage.read",
    ("GET", "/v1/pools/{pool}/volumes"): "storage.read",
    ("GET", "/v1/pools/{pool}/volumes/{volume}"): "storage.read",
    ("POST", "/v1/pools/{pool}/volumes"): "storage.create",
    ("DELETE", "/v1/pools/{pool}/volumes/{volume}"): "storage.delete",
    ("PUT", "/v1/pools/{pool}/volumes/{volume}/data"): "storage.upload",
    # A volume's content is the guest's data: not a read the read-only role gets by default.
    ("GET", "/v1/pools/{pool}/volumes/{volume}/data"): "storage.download",
    ("GET", "/v1/host/maintenance"): "host.read",
    ("PUT", "/v1/host/maintenance"): "host.maintenance",
    ("GET", "/v1/evacuate"): "host.read",
    ("POST", "/v1/evacuate"): "host.evacuate",
}

ALL_PERMISSIONS = frozenset(PERMISSIONS.values())
#: Reads that are audited all the same: they hand out a guest's data.
AUDITED_READS = frozenset({"storage.download"})

#: What the read-only role may do unless ``[access] readonly_permissions`` says otherwise.
READ_ONLY_DEFAULT = (
    "api.read",
    "host.read",
    "cluster.read",
    "domain.read",
    "domain.console",
    "events.read",
    "storage.read",
    "metrics.read",
)
#: Certificates made by ``vmferry pki`` (``init``, ``client``) and ``client --read-only``.
TLS_ADMIN_DEFAULT = ("CN=*,O=vmferry",)
TLS_READONLY_DEFAULT = ("CN=*,OU=read-only,O=vmferry",)

_SAN_PREFIXES = ("DNS:", "IP:", "email:", "URI:")
# One character of an RFC 4514 attribute value: an escape pair or anything but , + and \.
_VALUE_CHAR = r"(?:\\.|[^,+\\])"


_CONTROL = re.compile(r"[\x00-\x1f\x7f]")


def printable(text: str) -> str:
    """*text* with control characters escaped, so a path or name cannot forge log lines."""
    return _CONTROL.sub(lambda m: f"\\x{ord(m.group()):02x}", text)


def _dn_regex(pattern: str) -> re.Pattern[str]:
    parts = [re.escape(p) for p in pattern.split("*")]
    return re.compile(f"{_VALUE_CHAR}*".join(parts), re.DOTALL)


def cert_matches(pattern: str, subject: str, sans: Sequence[str]) -> bool:
    """
    Whether a certificate matches one allow-list *pattern*.

    ``*`` alone matches every certificate (the CA signed it).  A pattern
    starting ``DNS:``, ``IP:``, ``email:`` or ``URI:`` matches a subject
    alternative name (shell wildcards).  Anything else matches the subject
    as RFC 4514 text (``CN=alice,OU=read-only,O=vmferry``) where ``*``
    stands for part of one attribute value, never for a ``,``: so
    ``CN=*,O=vmferry`` does not match ``CN=bob,OU=read-only,O=vmferry``.
    """
    if pattern == "*":
        return True
    if pattern.startswith(_SAN_PREFIXES):
        return any(fnmatch.fnmatchcase(san, pattern) for san in sans)
    return _dn_regex(pattern).fullmatch(subject) is not None


def _expand(where: str, patterns: Sequence[str]) -> frozenset[str]:
    granted: set[str] = set()
    for pattern in patterns:
        hits = {p for p in ALL_PERMISSIONS if fnmatch.fnmatchcase(p, pattern)}
        if not hits:
            raise VmferryError(
                ErrorCode.INVALID_ARG,
                f"[access] {where}: {pattern!r} names no permission "
                f"(known: {', '.join(sorted(ALL_PERMISSIONS))})",
            )
        granted |= hits
    return frozenset(granted)


@dataclass
class AccessPolicy:
    """The daemon's ``[access]`` settings, checked and expanded."""

    tls_admin: Sequence[str] = TLS_ADMIN_DEFAULT
    tls_readonly: Sequence[str] = TLS_READONLY_DEFAULT
    admin_permissions: Sequence[str] = ("*",)
    readonly_permissions: Sequence[str] = READ_ONLY_DEFAULT
    readonly_socket_group: str = ""
    #: JSON lines of the audit trail; None: the ``vmferry.audit`` logger only.
    audit_file: Path | None = None
    granted: dict[Role, frozenset[str]] = field(init=False)

    def __post_init__(self) -> None:
        self.granted = {
            Role.ADMIN: _expand("admin_permissions", self.admin_permissions),
            Role.READ_ONLY: _expand("readonly_permissions", self.readonly_permissions),
        }

    def role_for_cert(self, subject: str, sans: Sequence[str]) -> Role | None:
        """The role of a client certificate; read-only wins if both lists match."""
        if any(cert_matches(p, subject, sans) for p in self.tls_readonly):
            return Role.READ_ONLY
        if any(cert_matches(p, subject, sans) for p in self.tls_admin):
            return Role.ADMIN
        return None

    def allows(self, role: Role, permission: str) -> bool:
        return permission in self.granted[role]


# Templates without parameters first, so /v1/domains/create is not taken for {name}.
_COMPILED = [
    (method, compile_path(path)[0], perm, path)
    for (method, path), perm in sorted(PERMISSIONS.items(), key=lambda item: "{" in item[0][1])
]


def route_permission(method: str, path: str) -> tuple[str | None, str]:
    """The permission of a request and the domain it names; None for no known route."""
    method = "GET" if method == "HEAD" else method
    for route_method, regex, perm, _ in _COMPILED:
        if route_method == method and (match := regex.match(path)):
            return perm, match.groupdict().get("name", "")
    return None, ""


def route_template(method: str, path: str) -> str | None:
    """The route *path* is a call of (``/v1/domains/{name}``); None for no known route."""
    method = "GET" if method == "HEAD" else method
    for route_method, regex, _, template in _COMPILED:
        if route_method == method and regex.match(path):
            return template
    return None


def check_routes(app: FastAPI) -> None:
    """Refuse an app with a route that has no entry in :data:`PERMISSIONS`."""
    routes = {
        (method.upper(), path)
        for path, item in app.openapi().get("paths", {}).items()
        for method in item
    }
    app.openapi_schema = None  # built again when asked, after any later change to the app
    for route in app.routes:  # the documentation routes, outside the schema
        path = getattr(route, "path", None)
        for method in getattr(route, "methods", None) or ():
            if path is not None and method != "HEAD":
                routes.add((method, path))
    missing = sorted(routes - PERMISSIONS.keys())
    if missing:
        raise AssertionError(f"no permission declared for {missing}")


def install_access(app: FastAPI, policy: AccessPolicy) -> None:
    """Check every request of *app* against *policy* (and audit); call after adding routes."""
    check_routes(app)
    app.add_middleware(AccessMiddleware, policy=policy)


def _denied(message: str) -> JSONResponse:
    err = VmferryError(ErrorCode.ACCESS_DENIED, message)
    return JSONResponse(status_code=err.http_status, content=err.to_dict())


def refused_connection(caller: Caller) -> JSONResponse:
    """The answer to every request of a TLS client that is in no allow-list."""
    return _denied(
        f"certificate {caller.subject!r} is in neither [access] tls_admin nor tls_readonly "
        "of this daemon"
    )


class AccessMiddleware:
    """Checks each request's permission and audits every call that is not a read."""

    def __init__(self, app: ASGIApp, *, policy: AccessPolicy) -> None:
        self.app = app
        self.policy = policy

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        caller: Caller | None = scope.get(CALLER_KEY)
        permission, _ = route_permission(scope["method"], scope["path"])
        target: ASGIApp = self.app
        if caller is None or caller.role is None:
            target = _denied("no caller identity: requests must come through a vmferryd listener")
        elif permission is None and caller.role != Role.ADMIN:
            # Not a known route: only an admin learns whether it exists (404/405).
            target = _denied(
                f"{scope['method']} {scope['path']} is no call of role {caller.role!s}"
            )
        elif permission is not None and not self.policy.allows(caller.role, permission):
            target = _denied(
                f"permission {permission!r} is denied to role {caller.role!s} "
                f"(caller: {caller.identity()})"
            )
        await run_audited(target, self.policy, scope, receive, send)


# Enough for the JSON of a domain or an error; longer answers are not inspected.
_KEEP = 64 * 1024


async def run_audited(
    app: ASGIApp, policy: AccessPolicy, scope: Scope, receive: Receive, send: Send
) -> None:
    """Run *app*; unless the request is a read, write its audit line with the outcome."""
    if scope["method"] in ("GET", "HEAD") and (
        route_permission(scope["method"], scope["path"])[0] not in AUDITED_READS
    ):
        await app(scope, receive, send)
        return
    status = 0
    body = bytearray()
    done = False

    async def recording_send(message: Message) -> None:
        nonlocal status, done
        if message["type"] == "http.response.start":
            status = message["status"]
        elif message["type"] == "http.response.body":
            if len(body) < _KEEP:
                body.extend(message.get("body", b"")[: _KEEP - len(body)])
            if not message.get("more_body", False) and not done:
                # Recorded before the client has the whole answer.
                done = True
                _audit(policy, scope, status, body)
        await send(message)

    try:
        await app(scope, receive, recording_send)
    except BaseException:
        if not done:
            _audit(policy, scope, status or 500, body)
        raise
    if not done:
        _audit(policy, scope, status, body)


def _audit(policy: AccessPolicy, scope: Scope, status: int, body: bytearray) -> None:
    caller: Caller | None = scope.get(CALLER_KEY)
    _, domain = route_permission(scope["method"], scope["path"])
    code = ""
    try:
        reply = json.loads(body) if body else None
    except ValueError:
        reply = None
    if isinstance(reply, dict):
        if not domain and isinstance(reply.get("name"), str):
            domain = reply["name"]  # define and create: the name is in the answer
        if status >= 400 and isinstance(reply.get("code"), str):
            code = reply["code"]
    entry = {
        "time": datetime.datetime.now(datetime.UTC).isoformat(timespec="milliseconds"),
        "caller": caller.identity() if caller else "unknown",
        "uid": caller.uid if caller else None,
        "pid": caller.pid if caller else None,
        "subject": caller.subject if caller else "",
        "role": str(caller.role) if caller and caller.role else "none",
        "method": scope["method"],
        "path": scope["path"],
        "domain": domain,
        "status": status,
        "code": code,
    }
    audit_log.info(
        "%s %s domain=%s status=%s%s role=%s caller=%s",
        printable(str(entry["method"])),
        printable(str(entry["path"])),
        printable(domain) or "-",
        status,
        f" code={code}" if code else "",
        entry["role"],
        entry["caller"],
    )
    if policy.audit_file is not None:
        write_audit_line(policy.audit_file, entry)


def write_audit_line(path: Path, entry: dict[str, Any]) -> None:
    """Append one JSON line; a failure is logged, never fails the call already made."""
    line = json.dumps(entry, separators=(",", ":")) + "\n"
    try:
        fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            os.write(fd, line.encode())
        finally:
            os.close(fd)
    except OSError as exc:
        audit_log.error("cannot write the audit log %s: %s", path, exc.strerror)
