"""The Python client (vmferry.client) against a small stand-in daemon on a unix socket.

The stand-in implements a few routes of docs/api.md with the real models and
the daemon's error convention; it tests client logic (URIs, requests, error
mapping, event streaming), not the daemon.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import os
import re
import socket
import ssl
import threading
import time
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from errno import ENOENT
from pathlib import Path
from typing import Any

import pytest
import uvicorn
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, PlainTextResponse, StreamingResponse

from vmferry.api.models import (
    ConsoleOutput,
    DomainInfo,
    DomainStateInfo,
    Event,
    HostInfo,
    ShutdownRequest,
    XmlBody,
)
from vmferry.client import AsyncClient, Client, calls, parse_uri, resolve_pki_dir
from vmferry.client.aio import timeout_for
from vmferry.client.calls import Call, model
from vmferry.errors import ErrorCode, VmferryError

CONSOLE = "SeaBIOS\nbooting...\nlogin: "


# -- the stand-in daemon ---------------------------------------------------------------------


@dataclass
class Standin:
    """State of the stand-in daemon, shared with the tests."""

    domains: dict[str, DomainInfo] = field(default_factory=dict)
    subscribers: list[asyncio.Queue[str | None]] = field(default_factory=list)
    seen: list[tuple[str, str, Any]] = field(default_factory=list)  # method, path+query, body
    events_error: VmferryError | None = None
    loop: asyncio.AbstractEventLoop | None = None

    def publish(self, line: str | None) -> None:
        """Send an NDJSON line (``None`` ends the streams); callable from any thread."""
        if self.loop is None:
            return  # no request yet, so no subscriber
        for queue in list(self.subscribers):
            self.loop.call_soon_threadsafe(queue.put_nowait, line)


def _domain(name: str, state: str = "shutoff", reason: str = "unknown") -> DomainInfo:
    return DomainInfo(
        name=name,
        uuid=f"00000000-0000-4000-8000-{len(name):012d}",
        id=1 if state == "running" else None,
        state=state,
        reason=reason,
        persistent=True,
        max_memory_kib=131072,
        memory_kib=131072,
        vcpus=1,
    )


def make_app(standin: Standin) -> FastAPI:
    app = FastAPI()

    @app.exception_handler(VmferryError)
    async def _error(request: Request, err: VmferryError) -> JSONResponse:
        return JSONResponse(status_code=err.http_status, content=err.to_dict())

    @app.middleware("http")
    async def _record(request: Request, call_next: Any) -> Any:
        standin.loop = asyncio.get_running_loop()
        body = await request.body()
        path = request.scope["raw_path"].decode()  # as sent, not unquoted
        path += f"?{request.url.query}" if request.url.query else ""
        standin.seen.append((request.method, path, body.decode() or None))
        return await call_next(request)

    def lookup(name: str) -> DomainInfo:
        for dom in standin.domains.values():
            if name in (dom.name, dom.uuid):
                return dom
        raise VmferryError(ErrorCode.NO_DOMAIN, f"no domain with matching name '{name}'")

    def event(dom: DomainInfo, type: str, reason: str) -> None:
        ev = Event(type=type, domain=dom.name, uuid=dom.uuid, reason=reason, timestamp=time.time())
        standin.publish(ev.model_dump_json())

    @app.get("/v1/host")
    async def host() -> HostInfo:
        return HostInfo(hostname="standin", uuid="u-1", version="0.1.0", features=["migration-v3"])

    @app.get("/v1/domains")
    async def list_domains(all: bool = False) -> list[DomainInfo]:
        return [d for d in standin.domains.values() if all or d.state != "shutoff"]

    @app.post("/v1/domains")
    async def define(body: XmlBody) -> DomainInfo:
        match = re.search(r"<name>([^<]+)</name>", body.xml)
        if not match:
            raise VmferryError(ErrorCode.XML_ERROR, "missing <name> in domain XML")
        dom = standin.domains[match[1]] = _domain(match[1])
        event(dom, "defined", "added")
        return dom

    @app.get("/v1/domains/{name}")
    async def dominfo(name: str) -> DomainInfo:
        return lookup(name)

    @app.post("/v1/domains/{name}/start")
    async def start(name: str) -> DomainInfo:
        dom = lookup(name)
        if dom.state == "running":
            raise VmferryError(ErrorCode.OPERATION_INVALID, "domain is already running")
        dom.state, dom.reason, dom.id = "running", "booted", 1
        event(dom, "started", "booted")
        return dom

    @app.post("/v1/domains/{name}/shutdown")
    async def shutdown(name: str, body: ShutdownRequest) -> DomainInfo:
        dom = lookup(name)
        dom.state, dom.reason, dom.id = "shutoff", "shutdown", None
        return dom

    @app.get("/v1/domains/{name}/state")
    async def domstate(name: str) -> DomainStateInfo:
        dom = lookup(name)
        return DomainStateInfo(state=dom.state, reason=dom.reason)

    @app.get("/v1/domains/{name}/xml")
    async def dumpxml(name: str, migratable: bool = False, inactive: bool = False) -> XmlBody:
        dom = lookup(name)
        return XmlBody(
            xml=f"<domain migratable='{migratable}' inactive='{inactive}'>"
            f"<name>{dom.name}</name></domain>"
        )

    @app.get("/v1/domains/{name}/console")
    async def console(name: str, offset: int = 0) -> ConsoleOutput:
        lookup(name)
        return ConsoleOutput(offset=offset, next_offset=len(CONSOLE), data=CONSOLE[offset:])

    @app.get("/v1/events")
    async def events() -> StreamingResponse:
        if standin.events_error is not None:
            raise standin.events_error

        async def stream() -> AsyncIterator[bytes]:
            queue: asyncio.Queue[str | None] = asyncio.Queue()
            standin.subscribers.append(queue)
            try:
                yield b"\n"  # subscribed
                while (line := await queue.get()) is not None:
                    yield line.encode() + b"\n\n"  # blank keep-alive lines must be skipped
            finally:
                standin.subscribers.remove(queue)

        return StreamingResponse(stream(), media_type="application/x-ndjson")

    # Answers a daemon should never give, to test the client's handling of them.
    @app.get("/v1/test/plain500")
    async def plain500() -> PlainTextResponse:
        return PlainTextResponse("proxy exploded", status_code=502)

    @app.get("/v1/test/future-code")
    async def future_code() -> JSONResponse:
        return JSONResponse({"code": "shiny-new", "message": "from the future"}, status_code=500)

    @app.get("/v1/test/garbled")
    async def garbled() -> dict[str, int]:
        return {"hostname": 42}

    @app.get("/v1/test/slow")
    async def slow() -> dict[str, str]:
        await asyncio.sleep(1)
        return {}

    return app


class Server:
    """uvicorn in a thread, on a socket we bound ourselves (unix, or TCP with TLS)."""

    def __init__(self, app: FastAPI, sock: socket.socket, **config: Any) -> None:
        self.sock = sock
        self.uvicorn = uvicorn.Server(
            uvicorn.Config(app, log_level="warning", lifespan="off", **config)
        )
        self.uvicorn.config.timeout_graceful_shutdown = 1
        self.thread = threading.Thread(target=self.uvicorn.run, kwargs={"sockets": [sock]})

    def __enter__(self) -> Server:
        self.thread.start()
        deadline = time.monotonic() + 10
        while not self.uvicorn.started:
            assert self.thread.is_alive() and time.monotonic() < deadline, "server did not start"
            time.sleep(0.01)
        return self

    def __exit__(self, *exc: object) -> None:
        self.uvicorn.should_exit = True
        self.thread.join(10)
        self.sock.close()
        assert not self.thread.is_alive()


@pytest.fixture
def standin() -> Standin:
    return Standin(domains={"vm1": _domain("vm1"), "my vm": _domain("my vm")})


@pytest.fixture
def uri(tmp: Path, standin: Standin) -> Iterator[str]:
    """A running stand-in daemon on a unix socket; its URI."""
    path = tmp / "d.sock"
    sock = socket.socket(socket.AF_UNIX)
    sock.bind(str(path))
    with Server(make_app(standin), sock):
        yield f"unix://{path}"


def wait_until(condition: Any, seconds: float = 5) -> None:
    deadline = time.monotonic() + seconds
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.01)


def within(seconds: float, fn: Any, *args: Any) -> Any:
    """Run a blocking call with a deadline, so a broken stream fails instead of hanging."""
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        return pool.submit(fn, *args).result(timeout=seconds)


# -- URIs and settings -----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "scheme", "base_url", "socket_path"),
    [
        ("unix:///run/vmferry/d.sock", "unix", "http://vmferry", "/run/vmferry/d.sock"),
        ("tls://node1.example:16509", "tls", "https://node1.example:16509", ""),
        ("tcp://127.0.0.1:8000", "tcp", "http://127.0.0.1:8000", ""),
        ("tls://[::1]:443", "tls", "https://[::1]:443", ""),
    ],
)
def test_parse_uri(text: str, scheme: str, base_url: str, socket_path: str) -> None:
    endpoint = parse_uri(text)
    assert (endpoint.scheme, endpoint.base_url, endpoint.socket_path) == (
        scheme,
        base_url,
        socket_path,
    )
    assert endpoint.uri == text


@pytest.mark.parametrize(
    "text",
    [
        "unix://relative.sock",  # two slashes: "relative.sock" is a host
        "unix:relative.sock",
        "tls://host",  # no port
        "tcp://host:99999",
        "tcp://:80",
        "http://host:80",
        "/run/vmferry/d.sock",
        "tls://user@host:1",
        "unix:///x.sock?socket=/y",
        "",
    ],
)
def test_bad_uri(text: str) -> None:
    with pytest.raises(VmferryError) as info:
        Client(text)
    assert info.value.code == ErrorCode.INVALID_ARG
    assert repr(text)[1:-1] in info.value.message


def test_pki_dir_resolution(monkeypatch: pytest.MonkeyPatch, tmp: Path) -> None:
    monkeypatch.delenv("VMFERRY_PKI_DIR", raising=False)
    monkeypatch.setenv("HOME", str(tmp))
    assert resolve_pki_dir(None) == tmp / ".config/vmferry/pki"
    monkeypatch.setenv("VMFERRY_PKI_DIR", "/etc/vmferry/pki")
    assert resolve_pki_dir(None) == Path("/etc/vmferry/pki")
    assert resolve_pki_dir(tmp / "mine") == tmp / "mine"


def test_tls_needs_pki_files_but_unix_does_not(monkeypatch: pytest.MonkeyPatch, tmp: Path) -> None:
    monkeypatch.setenv("VMFERRY_PKI_DIR", str(tmp / "nothing"))
    with pytest.raises(VmferryError) as info:
        Client("tls://localhost:1")
    assert info.value.code == ErrorCode.INVALID_ARG
    assert str(tmp / "nothing") in info.value.message
    Client("unix:///nonexistent.sock").close()


def test_request_timeouts() -> None:
    shutdown = calls.shutdown("vm", 300)
    assert timeout_for(shutdown, 120, None).read == 300 + calls.SHUTDOWN_MARGIN
    assert timeout_for(calls.start("vm"), 120, None).read == 120
    assert timeout_for(calls.start("vm"), 120, 5).read == 5
    assert timeout_for(calls.start("vm"), None, None).read is None
    assert timeout_for(None, None, None).connect is not None  # streams still connect in time


# -- requests and answers --------------------------------------------------------------------


def test_sync_calls(uri: str, standin: Standin) -> None:
    with Client(uri) as client:
        assert client.host().features == ["migration-v3"]
        assert client.list_domains() == []
        assert {d.name for d in client.list_domains(all=True)} == {"vm1", "my vm"}

        started = client.start("vm1")
        assert (started.state, started.reason, started.id) == ("running", "booted", 1)
        assert [d.name for d in client.list_domains()] == ["vm1"]
        assert client.domstate("vm1") == DomainStateInfo(state="running", reason="booted")

        # by UUID, and a name that needs quoting in the path
        assert client.dominfo(started.uuid).name == "vm1"
        assert client.dominfo("my vm").name == "my vm"

        off = client.shutdown("vm1", timeout=5)
        assert off.state == "shutoff"
        assert ("POST", "/v1/domains/vm1/shutdown", '{"timeout":5.0}') in standin.seen

        xml = client.dumpxml("vm1", migratable=True)
        assert "migratable='True' inactive='False'" in xml
        assert ("GET", "/v1/domains/vm1/xml?migratable=true&inactive=false", None) in standin.seen

        out = client.console("vm1", offset=8)
        assert (out.offset, out.data, out.next_offset) == (8, CONSOLE[8:], len(CONSOLE))

        defined = client.define("<domain><name>vm2</name></domain>")
        assert defined.name == "vm2" and "vm2" in standin.domains


async def test_async_calls(uri: str, standin: Standin) -> None:
    async with AsyncClient(uri) as client:
        assert (await client.host()).hostname == "standin"
        info = await client.start("my vm")
        assert info.state == "running"
        assert [d.name for d in await client.list_domains()] == ["my vm"]
        assert (await client.domstate("my vm")).reason == "booted"
        assert "inactive='True'" in await client.dumpxml("my vm", inactive=True)
        assert (await client.console("my vm")).data == CONSOLE
        assert (await client.shutdown("my vm")).state == "shutoff"
        assert ("POST", "/v1/domains/my%20vm/shutdown", '{"timeout":60.0}') in standin.seen


# -- errors ----------------------------------------------------------------------------------


def test_daemon_errors_arrive_unchanged(uri: str) -> None:
    with Client(uri) as client:
        with pytest.raises(VmferryError) as info:
            client.dominfo("ghost")
        assert info.value.code == ErrorCode.NO_DOMAIN
        assert info.value.message == "no domain with matching name 'ghost'"
        assert str(info.value) == "error: no domain with matching name 'ghost' [no-domain]"

        client.start("vm1")
        with pytest.raises(VmferryError) as info:
            client.start("vm1")
        assert (info.value.code, info.value.message) == (
            ErrorCode.OPERATION_INVALID,
            "domain is already running",
        )

        with pytest.raises(VmferryError) as info:
            client.define("<domain/>")
        assert info.value.code == ErrorCode.XML_ERROR

        # a code this client does not know yet still arrives as the daemon sent it
        with pytest.raises(VmferryError) as info:
            client.run(Call("GET", "/v1/test/future-code", lambda data: data))
        assert (info.value.code, info.value.message) == ("shiny-new", "from the future")


async def test_async_daemon_error(uri: str) -> None:
    async with AsyncClient(uri) as client:
        with pytest.raises(VmferryError) as info:
            await client.suspend("ghost")  # not even routed by the stand-in: 404 without a code
        assert info.value.code == ErrorCode.NO_SUPPORT
        with pytest.raises(VmferryError) as info:
            await client.domstate("ghost")
        assert info.value.code == ErrorCode.NO_DOMAIN


def test_unexpected_answers(uri: str) -> None:
    with Client(uri) as client:
        with pytest.raises(VmferryError) as info:
            client.run(Call("GET", "/v1/test/plain500", lambda data: data))
        assert info.value.code == ErrorCode.INTERNAL_ERROR
        assert "HTTP 502 proxy exploded" in info.value.message

        with pytest.raises(VmferryError) as info:
            client.run(Call("GET", "/v1/test/garbled", model(HostInfo)))
        assert info.value.code == ErrorCode.INTERNAL_ERROR
        assert uri in info.value.message

        with pytest.raises(VmferryError) as info:
            client.run(Call("GET", "/v1/nowhere", lambda data: data))
        assert info.value.code == ErrorCode.NO_SUPPORT
        assert "GET /v1/nowhere" in info.value.message


def test_request_timeout(uri: str) -> None:
    with Client(uri) as client:
        start = time.monotonic()
        with pytest.raises(VmferryError) as info:
            client.run(Call("GET", "/v1/test/slow", lambda d: d), request_timeout=0.2)
        assert info.value.code == ErrorCode.RPC_FAILED
        assert time.monotonic() - start < 1.5
    with Client(uri, timeout=0.2) as client, pytest.raises(VmferryError) as info:
        client.run(Call("GET", "/v1/test/slow", lambda d: d))
    assert info.value.code == ErrorCode.RPC_FAILED


def test_empty_name_is_refused_locally() -> None:
    with Client("unix:///nonexistent.sock") as client, pytest.raises(VmferryError) as info:
        client.start("")
    assert info.value.code == ErrorCode.INVALID_ARG


def test_connect_failures(tmp: Path) -> None:
    missing = f"unix://{tmp}/missing.sock"
    with Client(missing) as client, pytest.raises(VmferryError) as info:
        client.host()
    assert info.value.code == ErrorCode.CONNECT_FAILED
    assert info.value.message == f"cannot connect to vmferryd at {missing}: " + os.strerror(ENOENT)

    # a socket nobody listens on
    path = tmp / "dead.sock"
    dead = socket.socket(socket.AF_UNIX)
    dead.bind(str(path))
    try:
        with Client(f"unix://{path}") as client, pytest.raises(VmferryError) as info:
            client.list_domains()
        assert info.value.code == ErrorCode.CONNECT_FAILED
        assert info.value.message.endswith(": Connection refused")
    finally:
        dead.close()

    # a TCP port nobody listens on (bound, not listening, so nobody else gets it meanwhile)
    with socket.socket() as port:
        port.bind(("127.0.0.1", 0))
        tcp = f"tcp://127.0.0.1:{port.getsockname()[1]}"
        with Client(tcp) as client, pytest.raises(VmferryError) as info:
            client.host()
    assert info.value.code == ErrorCode.CONNECT_FAILED
    assert f"cannot connect to vmferryd at {tcp}" in info.value.message


async def test_async_connect_failure(tmp: Path) -> None:
    async with AsyncClient(f"unix://{tmp}/missing.sock") as client:
        with pytest.raises(VmferryError) as info:
            await client.host()
        assert info.value.code == ErrorCode.CONNECT_FAILED
        with pytest.raises(VmferryError) as info:
            async for _ in client.events():
                pass
        assert info.value.code == ErrorCode.CONNECT_FAILED


# -- events ----------------------------------------------------------------------------------


def test_sync_events(uri: str, standin: Standin) -> None:
    with Client(uri) as client:
        with client.events() as events:
            # entering waited for the subscription: this event cannot be missed
            client.start("vm1")
            first = within(5, next, events)
            assert (first.type, first.domain, first.reason) == ("started", "vm1", "booted")
            client.define("<domain><name>vm3</name></domain>")
            second = within(5, next, events)
            assert (second.type, second.domain) == ("defined", "vm3")
            standin.publish(None)  # the daemon ends the stream
            assert within(5, list, events) == []
        wait_until(lambda: not standin.subscribers)


def test_events_close_unsubscribes(uri: str, standin: Standin) -> None:
    with Client(uri) as client:
        events = client.events().open()
        assert len(standin.subscribers) == 1
        events.close()
        wait_until(lambda: not standin.subscribers)
        assert list(events) == []


def test_garbled_event(uri: str, standin: Standin) -> None:
    with Client(uri) as client, client.events() as events:
        standin.publish('{"type": "started"}')
        with pytest.raises(VmferryError) as info:
            within(5, next, events)
        assert info.value.code == ErrorCode.INTERNAL_ERROR


def test_events_error_answer(uri: str, standin: Standin) -> None:
    standin.events_error = VmferryError(ErrorCode.AUTH_FAILED, "not for you")
    with Client(uri) as client, pytest.raises(VmferryError) as info:
        client.events().open()
    assert (info.value.code, info.value.message) == (ErrorCode.AUTH_FAILED, "not for you")


async def test_async_events(uri: str, standin: Standin) -> None:
    async with AsyncClient(uri) as client:
        async with client.events() as events:
            await client.start("vm1")
            event = await asyncio.wait_for(anext(events), 5)
            assert (event.type, event.domain) == ("started", "vm1")
            standin.publish(None)
            rest = await asyncio.wait_for(_collect(events), 5)
            assert rest == []

        # plain `async for` subscribes by itself
        stream = client.events()
        task = asyncio.create_task(anext(stream))
        await asyncio.to_thread(wait_until, lambda: bool(standin.subscribers))
        await client.start("my vm")
        event = await asyncio.wait_for(task, 5)
        assert event.domain == "my vm"
        await stream.close()


async def _collect(events: AsyncIterator[Event]) -> list[Event]:
    return [event async for event in events]


# -- mutual TLS ------------------------------------------------------------------------------


def test_tls(tmp: Path, standin: Standin, monkeypatch: pytest.MonkeyPatch) -> None:
    from vmferry import pki

    pki.init_pki(tmp / "pki")
    pki.init_pki(tmp / "other")
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    server = Server(
        make_app(standin),
        sock,
        ssl_certfile=str(tmp / "pki/server.pem"),
        ssl_keyfile=str(tmp / "pki/server-key.pem"),
        ssl_ca_certs=str(tmp / "pki/ca.pem"),
        ssl_cert_reqs=ssl.CERT_REQUIRED,
    )
    with server:
        with Client(f"tls://localhost:{port}", pki_dir=tmp / "pki") as client:
            assert client.host().hostname == "standin"
        monkeypatch.setenv("VMFERRY_PKI_DIR", str(tmp / "pki"))
        with Client(f"tls://127.0.0.1:{port}") as client:
            assert client.dominfo("vm1").name == "vm1"
        # another cluster's CA: the daemon's certificate is not trusted
        with Client(f"tls://localhost:{port}", pki_dir=tmp / "other") as client:
            with pytest.raises(VmferryError) as info:
                client.host()
        assert info.value.code == ErrorCode.CONNECT_FAILED
        assert "CERTIFICATE_VERIFY_FAILED" in info.value.message
