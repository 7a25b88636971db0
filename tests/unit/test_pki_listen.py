"""PKI generation, mutual TLS and the daemon's listeners (vmferry.pki, vmferry.daemon.listen)."""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import shutil
import signal
import socket
import ssl
import stat
import tempfile
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import httpx
import pytest
from cryptography import x509
from cryptography.x509.oid import ExtendedKeyUsageOID
from fastapi import FastAPI, Request
from fastapi.responses import StreamingResponse

from vmferry import pki
from vmferry.daemon.listen import ListenSpec, parse_listen_uri, serve
from vmferry.errors import ErrorCode, VmferryError


@pytest.fixture(scope="module")
def pki_dir() -> Iterator[Path]:
    root = Path(tempfile.mkdtemp(prefix="vf", dir="/tmp"))
    pki.init_pki(root / "pki", server_names=["peer.example", "192.0.2.7", "[2001:db8::1]"])
    yield root / "pki"
    shutil.rmtree(root, ignore_errors=True)


@pytest.fixture(scope="module")
def other_pki_dir() -> Iterator[Path]:
    root = Path(tempfile.mkdtemp(prefix="vf", dir="/tmp"))
    pki.init_pki(root / "pki")
    yield root / "pki"
    shutil.rmtree(root, ignore_errors=True)


def make_app() -> tuple[FastAPI, list[str]]:
    """A tiny app that records every request it actually handled."""
    app = FastAPI()
    hits: list[str] = []

    @app.get("/ping")
    async def ping(request: Request) -> dict[str, str]:
        hits.append(request.url.scheme)
        return {"pong": "yes", "scheme": request.url.scheme}

    return app, hits


@contextlib.asynccontextmanager
async def running(
    app: FastAPI, specs: list[ListenSpec], pki_dir: Path | None = None
) -> AsyncIterator[list[str]]:
    stop, ready = asyncio.Event(), asyncio.Event()
    addresses: list[str] = []
    task = asyncio.create_task(
        serve(app, specs, pki_dir=pki_dir, stop=stop, ready=ready, addresses=addresses)
    )
    ready_task = asyncio.create_task(ready.wait())
    try:
        await asyncio.wait([task, ready_task], timeout=10, return_when=asyncio.FIRST_COMPLETED)
        if task.done():
            task.result()  # raises serve()'s error
        assert ready.is_set(), "listeners did not come up"
        yield addresses
    finally:
        ready_task.cancel()
        stop.set()
        await asyncio.wait_for(task, 10)


def port_of(address: str) -> int:
    return int(address.rsplit(":", 1)[1])


def tls_spec() -> ListenSpec:
    return ListenSpec("tls", host="127.0.0.1", port=0)


# --- PKI ---------------------------------------------------------------------------------------


def test_init_pki_files_modes_and_sans(pki_dir: Path) -> None:
    assert stat.S_IMODE(pki_dir.stat().st_mode) == 0o700
    for name in ("ca-key.pem", "server-key.pem", "client-key.pem"):
        assert stat.S_IMODE((pki_dir / name).stat().st_mode) == 0o600, name
    assert not [p.name for p in pki_dir.iterdir() if p.name.startswith(".")]

    server = x509.load_pem_x509_certificate((pki_dir / "server.pem").read_bytes())
    san = server.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    dns = san.get_values_for_type(x509.DNSName)
    ips = san.get_values_for_type(x509.IPAddress)
    assert {"localhost", socket.gethostname().lower(), "peer.example"} <= set(dns)
    assert {ipaddress.ip_address(a) for a in ("127.0.0.1", "::1", "192.0.2.7", "2001:db8::1")} <= (
        set(ips)
    )
    assert "192.0.2.7" not in dns  # an IP must not become a DNS name
    eku = server.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert ExtendedKeyUsageOID.SERVER_AUTH in eku

    ca = x509.load_pem_x509_certificate((pki_dir / "ca.pem").read_bytes())
    client = x509.load_pem_x509_certificate((pki_dir / "client.pem").read_bytes())
    assert client.issuer == ca.subject == server.issuer
    client.verify_directly_issued_by(ca)
    server.verify_directly_issued_by(ca)


def test_init_pki_refuses_to_overwrite_ca(tmp: Path) -> None:
    pki.init_pki(tmp / "p")
    before = (tmp / "p" / "ca.pem").read_bytes()
    with pytest.raises(VmferryError) as err:
        pki.init_pki(tmp / "p")
    assert err.value.code == ErrorCode.INVALID_ARG
    assert "--force" in err.value.message
    assert (tmp / "p" / "ca.pem").read_bytes() == before
    pki.init_pki(tmp / "p", force=True)
    assert (tmp / "p" / "ca.pem").read_bytes() != before


def test_missing_pki_files(tmp: Path) -> None:
    for make in (pki.server_ssl_context, pki.client_ssl_context):
        with pytest.raises(VmferryError) as err:
            make(tmp)
        assert err.value.code == ErrorCode.INVALID_ARG
        assert f"vmferry pki init {tmp}" in err.value.message


def test_ssl_contexts(pki_dir: Path) -> None:
    server = pki.server_ssl_context(pki_dir)
    assert server.verify_mode == ssl.CERT_REQUIRED
    assert server.minimum_version >= ssl.TLSVersion.TLSv1_2
    client = pki.client_ssl_context(pki_dir)
    assert client.check_hostname and client.verify_mode == ssl.CERT_REQUIRED


# --- TLS listener ------------------------------------------------------------------------------


async def get_once(url: str, ctx: ssl.SSLContext, sni: str | None = None) -> httpx.Response:
    """One request on a fresh connection (a pooled one would skip the TLS handshake)."""
    extensions = {"sni_hostname": sni} if sni else None
    async with httpx.AsyncClient(verify=ctx) as client:
        return await client.get(url, extensions=extensions)


async def test_tls_round_trip_with_client_cert(pki_dir: Path) -> None:
    app, hits = make_app()
    ctx = pki.client_ssl_context(pki_dir)
    async with running(app, [tls_spec()], pki_dir) as addresses:
        url = f"https://127.0.0.1:{port_of(addresses[0])}/ping"
        answer = await get_once(url, ctx)  # checked against the IP SAN 127.0.0.1
        assert answer.status_code == 200
        assert answer.json() == {"pong": "yes", "scheme": "https"}
        # A name from server_names, checked against the DNS SANs.
        assert (await get_once(url, ctx, sni="peer.example")).status_code == 200
        # A name the certificate does not carry.
        with pytest.raises(httpx.ConnectError, match="CERTIFICATE_VERIFY_FAILED"):
            await get_once(url, ctx, sni="intruder.example")
    assert hits == ["https", "https"]


async def test_tls_refuses_client_without_cert(pki_dir: Path) -> None:
    app, hits = make_app()
    no_cert = ssl.create_default_context(cafile=str(pki_dir / "ca.pem"))
    async with running(app, [tls_spec()], pki_dir) as addresses:
        async with httpx.AsyncClient(verify=no_cert) as client:
            with pytest.raises(httpx.TransportError):
                await client.get(f"https://127.0.0.1:{port_of(addresses[0])}/ping")
    assert hits == []


async def test_tls_refuses_cert_of_another_ca(pki_dir: Path, other_pki_dir: Path) -> None:
    app, hits = make_app()
    # Trusts our server, but presents the client certificate of another CA.
    foreign = ssl.create_default_context(cafile=str(pki_dir / "ca.pem"))
    foreign.load_cert_chain(other_pki_dir / "client.pem", other_pki_dir / "client-key.pem")
    async with running(app, [tls_spec()], pki_dir) as addresses:
        url = f"https://127.0.0.1:{port_of(addresses[0])}/ping"
        async with httpx.AsyncClient(verify=foreign) as client:
            with pytest.raises(httpx.TransportError):
                await client.get(url)
        # And a client of the other CA does not trust our server.
        async with httpx.AsyncClient(verify=pki.client_ssl_context(other_pki_dir)) as client:
            with pytest.raises(httpx.ConnectError, match="CERTIFICATE_VERIFY_FAILED"):
                await client.get(url)
    assert hits == []


async def test_tls_needs_pki_dir() -> None:
    app, _ = make_app()
    with pytest.raises(VmferryError) as err:
        await serve(app, [tls_spec()], pki_dir=None, stop=asyncio.Event())
    assert err.value.code == ErrorCode.INVALID_ARG
    assert "pki" in err.value.message


# --- unix listener -----------------------------------------------------------------------------


async def test_unix_listener_mode_and_serves(tmp: Path) -> None:
    app, hits = make_app()
    path = tmp / "d.sock"
    async with running(app, [ListenSpec("unix", path=path)]) as addresses:
        assert addresses == [f"unix://{path}"]
        st = path.lstat()
        assert stat.S_ISSOCK(st.st_mode)
        assert stat.S_IMODE(st.st_mode) == 0o600
        transport = httpx.AsyncHTTPTransport(uds=str(path))
        async with httpx.AsyncClient(transport=transport) as client:
            answer = await client.get("http://vmferryd/ping")
        assert answer.json()["pong"] == "yes"
    assert hits == ["http"]
    assert not path.exists()  # removed at shutdown


async def test_unix_stale_socket_replaced_live_one_refused(tmp: Path) -> None:
    path = tmp / "d.sock"
    stale = socket.socket(socket.AF_UNIX)
    stale.bind(str(path))
    stale.close()  # the file stays, nobody listens: a daemon that died
    app, hits = make_app()
    async with running(app, [ListenSpec("unix", path=path)]):
        with pytest.raises(VmferryError) as err:
            await serve(app, [ListenSpec("unix", path=path)], pki_dir=None, stop=asyncio.Event())
        assert err.value.code == ErrorCode.OPERATION_FAILED
        assert "another vmferryd" in err.value.message
        assert path.exists()  # the refused second daemon must not remove the live socket
        transport = httpx.AsyncHTTPTransport(uds=str(path))
        async with httpx.AsyncClient(transport=transport) as client:
            assert (await client.get("http://vmferryd/ping")).status_code == 200
    assert hits == ["http"]


async def test_unix_refuses_non_socket(tmp: Path) -> None:
    path = tmp / "file"
    path.write_text("precious")
    app, _ = make_app()
    with pytest.raises(VmferryError, match="not a socket"):
        await serve(app, [ListenSpec("unix", path=path)], pki_dir=None, stop=asyncio.Event())
    assert path.read_text() == "precious"


# --- several listeners, errors, signals --------------------------------------------------------


async def test_several_listeners_at_once(tmp: Path, pki_dir: Path) -> None:
    app, hits = make_app()
    specs = [
        ListenSpec("unix", path=tmp / "d.sock"),
        tls_spec(),
        parse_listen_uri("tcp://[::1]:0", insecure=True),
    ]
    async with running(app, specs, pki_dir) as addresses:
        assert addresses[1].startswith("tls://127.0.0.1:")
        assert addresses[2].startswith("tcp://[::1]:")
        async with httpx.AsyncClient(
            transport=httpx.AsyncHTTPTransport(uds=str(tmp / "d.sock"))
        ) as client:
            assert (await client.get("http://vmferryd/ping")).status_code == 200
        async with httpx.AsyncClient(verify=pki.client_ssl_context(pki_dir)) as client:
            tls_url = f"https://127.0.0.1:{port_of(addresses[1])}/ping"
            plain_url = f"http://[::1]:{port_of(addresses[2])}/ping"
            answers = await asyncio.gather(client.get(tls_url), client.get(plain_url))
        assert [a.status_code for a in answers] == [200, 200]
    assert sorted(hits) == ["http", "http", "https"]


async def test_bind_error_is_reported_and_cleans_up(tmp: Path) -> None:
    busy = socket.socket()
    busy.bind(("127.0.0.1", 0))
    busy.listen()
    try:
        port = busy.getsockname()[1]
        app, _ = make_app()
        specs = [
            ListenSpec("unix", path=tmp / "d.sock"),
            ListenSpec("tcp", host="127.0.0.1", port=port),
        ]
        with pytest.raises(VmferryError) as err:
            await serve(app, specs, pki_dir=None, stop=asyncio.Event())
        assert err.value.code == ErrorCode.OPERATION_FAILED
        assert str(port) in err.value.message
        assert not (tmp / "d.sock").exists()  # the first listener was undone
    finally:
        busy.close()


async def test_stop_ends_open_streams_as_disconnects(
    tmp: Path, caplog: pytest.LogCaptureFixture
) -> None:
    app, _ = make_app()
    closed: list[str] = []

    @app.get("/stream")
    async def stream() -> StreamingResponse:
        async def lines() -> AsyncIterator[bytes]:
            try:
                yield b"first\n"
                await asyncio.sleep(3600)
            finally:
                closed.append("closed")

        return StreamingResponse(lines())

    path = tmp / "d.sock"
    stop, ready = asyncio.Event(), asyncio.Event()
    task = asyncio.create_task(
        serve(
            app,
            [ListenSpec("unix", path=path)],
            pki_dir=None,
            stop=stop,
            ready=ready,
            graceful_timeout=0.3,
        )
    )
    await asyncio.wait_for(ready.wait(), 10)
    try:
        transport = httpx.AsyncHTTPTransport(uds=str(path))
        async with httpx.AsyncClient(transport=transport) as client:
            async with client.stream("GET", "http://vmferryd/stream") as answer:
                lines = answer.aiter_lines()
                assert await anext(lines) == "first"
                stop.set()
                started = time.monotonic()
                await asyncio.wait_for(task, 5)
                assert time.monotonic() - started < 2
                with pytest.raises(httpx.TransportError):
                    await anext(lines)
    finally:
        stop.set()
        await asyncio.wait_for(task, 10)
    assert closed == ["closed"]
    assert "Exception in ASGI application" not in caplog.text


async def test_serve_leaves_signal_handlers_alone(tmp: Path) -> None:
    before = {sig: signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGTERM)}
    app, _ = make_app()
    async with running(app, [ListenSpec("unix", path=tmp / "d.sock")]):
        during = {sig: signal.getsignal(sig) for sig in before}
    assert during == before


# --- listen URIs -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("uri", "insecure", "expected"),
    [
        ("unix:///run/vf/d.sock", False, ListenSpec("unix", path=Path("/run/vf/d.sock"))),
        ("tls://0.0.0.0:16514", False, ListenSpec("tls", host="0.0.0.0", port=16514)),
        ("tls://[::]:16514", False, ListenSpec("tls", host="::", port=16514)),
        ("tls://host.example:1", False, ListenSpec("tls", host="host.example", port=1)),
        ("tcp://127.0.0.1:8080", True, ListenSpec("tcp", host="127.0.0.1", port=8080)),
        ("tcp://[::1]:8080", True, ListenSpec("tcp", host="::1", port=8080)),
        ("tcp://localhost:8080", True, ListenSpec("tcp", host="localhost", port=8080)),
    ],
)
def test_parse_listen_uri(uri: str, insecure: bool, expected: ListenSpec) -> None:
    spec = parse_listen_uri(uri, insecure=insecure)
    assert spec == expected
    assert parse_listen_uri(str(spec), insecure=insecure) == spec


@pytest.mark.parametrize(
    ("uri", "insecure", "words"),
    [
        ("tcp://127.0.0.1:8080", False, "plain TCP"),
        ("tcp://0.0.0.0:8080", True, "plain TCP"),
        ("tcp://192.0.2.1:8080", True, "loopback"),
        ("unix://run/d.sock", False, "three slashes"),
        ("unix:relative.sock", False, "absolute"),
        ("unix:///" + "x" * 120, False, "107 bytes"),
        ("tls://0.0.0.0", False, "port is required"),
        ("tls://:16514", False, "host is required"),
        ("tls://0.0.0.0:99999", False, "99999"),
        ("tls://0.0.0.0:16514/v1", False, "no path"),
        ("http://0.0.0.0:80", False, "tls://HOST:PORT"),
    ],
)
def test_parse_listen_uri_errors(uri: str, insecure: bool, words: str) -> None:
    with pytest.raises(VmferryError) as err:
        parse_listen_uri(uri, insecure=insecure)
    assert err.value.code == ErrorCode.INVALID_ARG
    assert words in err.value.message
