"""Hostile or broken HTTP clients against a real vmferryd (issue 11, part 4).

Errors are ``{code, message}`` with no Python text, bodies are limited before
they are buffered, silent connections and TLS handshakes time out, busy
listeners refuse cleanly, a 500 keeps the connection, repeated errors are
logged once per interval, and long-lived streams outlive the idle timeout.
"""

from __future__ import annotations

import http.client
import json
import logging
import socket
import ssl
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from vmferry.client import Client
from vmferry.daemon.guard import RateLimitFilter
from vmferry.failpoints import ENV_VAR
from vmferry.pki import init_pki
from vmferry.testguest import guest_xml
from vmferry.testing import Host, allocate_ports

IDLE_S = 1.5


class LimitedHost(Host):
    """A host with short timeouts and a few client slots."""

    limits = f"[limits]\nidle_timeout = {IDLE_S}\nhandshake_timeout = {IDLE_S}\nmax_clients = 40\n"

    def write_config(self) -> Path:
        cfg = super().write_config()
        cfg.write_text(cfg.read_text() + self.limits + "error_log_interval = 1.0\n")
        return cfg


@pytest.fixture(scope="module")
def pki_dir() -> Path:
    pki = Path(tempfile.mkdtemp(prefix="vfpki", dir="/tmp"))
    init_pki(pki)
    return pki


@pytest.fixture
def host(pki_dir: Path, request: pytest.FixtureRequest) -> Iterator[LimitedHost]:
    root = Path(tempfile.mkdtemp(prefix="vf", dir="/tmp"))
    port = allocate_ports()
    h = LimitedHost(root / "h0", "host0", port, pki_dir=pki_dir, tls_port=port + 15)
    h.extra_env = dict(getattr(request, "param", {}))
    h.root.mkdir()
    try:
        h.start()
        yield h
    finally:
        h.cleanup()


class UnixHTTPConnection(http.client.HTTPConnection):
    """One keep-alive HTTP/1.1 connection over the daemon's unix socket."""

    def __init__(self, path: Path) -> None:
        super().__init__("localhost", timeout=10)
        self.path = path

    def connect(self) -> None:
        sock = socket.socket(socket.AF_UNIX)
        sock.settimeout(10)
        sock.connect(str(self.path))
        self.sock = sock


def call(
    conn: http.client.HTTPConnection, method: str, url: str, body: str | None = None
) -> tuple[int, dict[str, str], str]:
    headers = {"content-type": "application/json"} if body is not None else {}
    conn.request(method, url, body=body, headers=headers)
    resp = conn.getresponse()
    data = resp.read().decode()
    return resp.status, {k.lower(): v for k, v in resp.getheaders()}, data


def assert_clean_error(status: int, body: str, expected_status: int, code: str) -> dict[str, str]:
    assert status == expected_status, body
    data = json.loads(body)
    assert set(data) == {"code", "message"}, data
    assert data["code"] == code
    for python_text in ("Traceback", "Error(", "detail", "<class", 'File "'):
        assert python_text not in data["message"], data
    return data


def test_every_error_is_code_and_message(host: LimitedHost) -> None:
    big = "9" * 5000
    conn = UnixHTTPConnection(host.socket)
    with host.client() as c:
        c.define(guest_xml("g"))
    cases = [
        ("GET", "/nope", None, 404, "no-support"),
        ("DELETE", "/v1/host", None, 405, "no-support"),
        ("POST", "/v1/domains", '{"xml": 5}', 400, "invalid-arg"),
        ("POST", "/v1/domains", "{bad", 400, "invalid-arg"),
        ("POST", "/v1/domains/g/migrate/begin", f'{{"flags": {big}}}', 400, "invalid-arg"),
        (
            "POST",
            "/v1/migrate/prepare",
            f'{{"xml": "<domain/>", "flags": {big}}}',
            400,
            "invalid-arg",
        ),
        ("GET", f"/v1/domains/g/console?offset={big}", None, 400, "invalid-arg"),
        (
            "POST",
            "/v1/domains/g/migrate/begin",
            '{"flags": 1, "params": {"bandwidth_mib_s": "fast"}}',
            400,
            "invalid-arg",
        ),
        (
            "POST",
            "/v1/domains/g/migrate/begin",
            '{"flags": 1, "params": {"timeout_suspend_s": [1]}}',
            400,
            "invalid-arg",
        ),
    ]
    for method, url, body, status, code in cases:
        got, _, text = call(conn, method, url, body)
        assert_clean_error(got, text, status, code)
    # The same connection served every one of them.
    got, _, text = call(conn, "GET", "/v1/host")
    assert got == 200 and json.loads(text)["hostname"] == "host0"


def test_malformed_http_gets_json_400(host: LimitedHost) -> None:
    for request in (
        b"GET /v1/host HTTP/1.1\r\nhost: x\r\ncontent-length: abc\r\n\r\n",
        b"GET /v1/host HTTP/1.1\r\nhost: x\r\nx-big: " + b"a" * 16500,  # never ends, past 16 KiB
        b"NOT HTTP AT ALL\r\n\r\n",
    ):
        with socket.socket(socket.AF_UNIX) as s:
            s.settimeout(5)
            s.connect(str(host.socket))
            for start in range(0, len(request), 4096):  # as a slow client would send it
                s.sendall(request[start : start + 4096])
                time.sleep(0.01)
            reply = b""
            while chunk := s.recv(65536):
                reply += chunk
        head, _, body = reply.decode().partition("\r\n\r\n")
        assert head.startswith("HTTP/1.1 400"), (request[:60], head)
        assert_clean_error(400, body, 400, "invalid-arg")


def test_body_limit_is_enforced_before_buffering(host: LimitedHost) -> None:
    # Announce 100 MB and send nothing: the answer comes at once, nothing is read.
    with socket.socket(socket.AF_UNIX) as s:
        s.settimeout(5)
        s.connect(str(host.socket))
        s.sendall(
            b"POST /v1/domains HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\n"
            b"content-length: 100000000\r\n\r\n"
        )
        reply = b""
        while chunk := s.recv(65536):  # the daemon closes the connection after the answer
            reply += chunk
    head, _, body = reply.decode().partition("\r\n\r\n")
    assert head.startswith("HTTP/1.1 413")
    assert "connection: close" in head.lower()
    assert_clean_error(413, body, 413, "invalid-arg")

    # Chunked (no length): refused once it grows past the limit.
    def chunks() -> Iterator[bytes]:
        for _ in range(6):
            yield b"x" * (1 << 20)

    with httpx.Client(transport=httpx.HTTPTransport(uds=str(host.socket)), timeout=10) as c:
        r = c.post("http://d/v1/domains", content=chunks())
        assert_clean_error(r.status_code, r.text, 413, "invalid-arg")
        assert c.get("http://d/v1/host").status_code == 200


@pytest.mark.parametrize("host", [{ENV_VAR: "status-write=bug"}], indirect=True)
def test_500_is_generic_keeps_the_connection_and_logs_once(host: LimitedHost) -> None:
    conn = UnixHTTPConnection(host.socket)
    got, _, text = call(conn, "POST", "/v1/domains", json.dumps({"xml": guest_xml("g")}))
    assert got == 200
    ids = []
    started = time.monotonic()
    for _ in range(30):
        got, headers, text = call(conn, "POST", "/v1/domains/g/start")
        data = assert_clean_error(got, text, 500, "internal-error")
        assert "simulated bug" not in data["message"]  # details only in the log
        assert headers.get("connection", "") != "close"
        ids.append(data["message"].rsplit(" ", 1)[-1])
    took = time.monotonic() - started
    got, _, text = call(conn, "GET", "/v1/domains/g/state")  # still the same connection
    assert got == 200 and json.loads(text)["state"] == "shutoff"
    # The daemon logs an error before it answers: the log holds every one it let through.
    log = host.log.read_text()
    assert f"internal error {ids[0]}" in log and "simulated bug" in log
    # 30 identical errors: one logged per interval (1 s) they spanned; a loaded machine may
    # stretch the 30 calls past a second, so count the windows they took rather than assume one.
    logged = [i for i, error_id in enumerate(ids) if f"internal error {error_id}" in log]
    assert 1 <= len(logged) <= 1 + int(took / 1.0), (logged, took)
    time.sleep(1.2)
    call(conn, "POST", "/v1/domains/g/start")
    # The first after a quiet interval carries the count of those held back since the last.
    held = len(ids) - 1 - logged[-1]
    tail = host.log.read_text()[len(log) :]
    if held:
        assert f"[{held} more like this in the last" in tail, tail[-2000:]
    else:  # the 30th call itself opened a new interval: nothing was held back after it
        assert "more like this" not in tail, tail[-2000:]


def _silent(host: LimitedHost, count: int) -> list[socket.socket]:
    socks = []
    for _ in range(count):
        u = socket.socket(socket.AF_UNIX)
        u.connect(str(host.socket))
        t = socket.create_connection(("127.0.0.1", host.tls_port))
        socks += [u, t]
    return socks


def _closed(sock: socket.socket) -> bool:
    sock.settimeout(0)
    try:
        return sock.recv(1) == b""
    except BlockingIOError:
        return False
    except OSError:
        return True


def test_silent_connections_cannot_block_the_daemon(host: LimitedHost, pki_dir: Path) -> None:
    socks = _silent(host, 150)
    try:
        time.sleep(0.3)
        for uri, kwargs in ((host.uri, {}), (host.tls_uri, {"pki_dir": pki_dir})):
            start = time.monotonic()
            with Client(uri, **kwargs) as c:  # type: ignore[arg-type]
                assert c.host().hostname == "host0"
            # Served without waiting on the silent ones: a daemon that waited on a few of them
            # in turn would take IDLE_S each (all 150: minutes). Not tighter: a loaded machine
            # alone may take a second or two to answer.
            assert time.monotonic() - start < 5 * IDLE_S, uri
        # Every silent connection is gone after the idle / handshake timeout (the deadline is
        # generous: 300 of them, on a machine that may be running two QEMU tests besides).
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and not all(_closed(s) for s in socks):
            time.sleep(0.2)
        assert all(_closed(s) for s in socks)
    finally:
        for s in socks:
            s.close()


def test_idle_tls_connection_after_handshake_is_dropped(host: LimitedHost, pki_dir: Path) -> None:
    ctx = ssl.create_default_context(cafile=str(pki_dir / "ca.pem"))
    ctx.check_hostname = False
    ctx.load_cert_chain(pki_dir / "client.pem", pki_dir / "client-key.pem")
    # Before connecting: the daemon's idle timer cannot start earlier, so the time measured is
    # never shorter than its timeout, however late this process gets to run after the handshake.
    start = time.monotonic()
    raw = socket.create_connection(("127.0.0.1", host.tls_port))
    with ctx.wrap_socket(raw) as tls:
        tls.settimeout(30)  # a deadline only: the close comes after IDLE_S
        assert tls.recv(1) == b""  # closed by the daemon, having sent nothing
        assert time.monotonic() - start >= IDLE_S * 0.8


def test_busy_clients_get_503_and_streams_outlive_the_idle_timeout(host: LimitedHost) -> None:
    transport = httpx.HTTPTransport(uds=str(host.socket))
    with httpx.Client(transport=transport, timeout=15) as c:
        streams = [c.stream("GET", "http://d/v1/events") for _ in range(39)]
        opened = [s.__enter__() for s in streams]
        try:
            session = httpx.Client(transport=httpx.HTTPTransport(uds=str(host.socket)), timeout=15)
            with session.stream("GET", "http://d/v1/session") as sess:
                lines = sess.iter_lines()
                assert "session" in next(lines)
                # 40 busy connections: a newcomer is refused cleanly.
                with httpx.Client(transport=httpx.HTTPTransport(uds=str(host.socket))) as extra:
                    r = extra.get("http://d/v1/host")
                    assert_clean_error(r.status_code, r.text, 503, "operation-failed")
                time.sleep(IDLE_S * 2)  # the streams are past the idle timeout
                with httpx.Client(transport=httpx.HTTPTransport(uds=str(host.socket))) as extra:
                    r = extra.get("http://d/v1/host")  # busy streams are never evicted
                    assert_clean_error(r.status_code, r.text, 503, "operation-failed")
                events = opened[0].iter_lines()
                assert next(events) == ""  # the subscription line
                opened[-1].close()  # one slot frees up
                time.sleep(0.2)
                with host.client() as admin:
                    admin.define(guest_xml("g"))
                event = json.loads(next(events))
                assert (event["type"], event["domain"]) == ("defined", "g")
                assert next(lines) == ""  # the session's keepalive still arrives
            session.close()
        finally:
            for s in streams:
                s.__exit__(None, None, None)


def test_rate_limit_filter_counts_what_it_holds_back() -> None:
    flt = RateLimitFilter(interval=60)

    def record(msg: str, *args: object, level: int = logging.ERROR) -> logging.LogRecord:
        return logging.LogRecord("x", level, __file__, 1, msg, args, None)

    assert flt.filter(record("internal error %s on port %d", "0123456789ab", 1))
    # Only numbers and ids differ: the same error, held back.
    assert not any(
        flt.filter(record("internal error %s on port %d", f"{i:012x}", i)) for i in range(100)
    )
    assert flt.filter(record("domain %s is corrupt", "a"))
    assert flt.filter(record("domain %s is corrupt", "b"))  # another domain: its own line
    assert flt.filter(record("internal error %s", "x", level=logging.INFO))  # info passes
    key = next(k for k in flt._seen if k[2].startswith("internal error # on port"))
    flt._seen[key] = (time.monotonic() - 61, flt._seen[key][1])
    again = record("internal error %s on port %d", "fedcba987654", 7)
    assert flt.filter(again)
    assert "[100 more like this" in again.getMessage()
