"""Hostile migration requests against real daemons: endpoints, flags, parameters, timeouts.

Each test is a regression test of a finding of issue 11 (migration endpoints and the
migration part of "robust daemon").
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import socket
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from vmferry.client import AsyncClient
from vmferry.client import migration_calls as mc
from vmferry.client.migrate import (
    migrate,
    migrate_p2p,
)
from vmferry.errors import ErrorCode, VmferryError
from vmferry.migration.flags import MigrateFlags
from vmferry.migration.params import MigrationParams
from vmferry.testguest import Heartbeat, check_continuity, guest_xml
from vmferry.testing import Host, hosts, wait_heartbeat
from vmferry.testing.steps import migration_steps

pytestmark = pytest.mark.qemu

LIVE = MigrateFlags.LIVE


def _destroy(host: Host, name: str) -> None:
    with host.client() as c:
        if name in [d.name for d in c.list_domains(all=True)]:
            c.destroy(name)


def _running_here(host: Host, name: str, before: Heartbeat, state: str = "running") -> Heartbeat:
    """*name* is on *host* in *state*, no job left, its guest still alive and intact."""
    with host.client() as c:
        info = c.dominfo(name)
        assert (info.state, info.job.async_job) == (state, "none"), info
        if state == "paused":
            c.resume(name)
        after = wait_heartbeat(c, name, after=before)
        check_continuity(before, after)
        return after


def _nothing_on(host: Host, name: str) -> None:
    with host.client() as c:
        assert name not in [d.name for d in c.list_domains(all=True)]
    assert host.qemu_pids() == []


def _raw(host: Host, method: str, path: str, body: bytes) -> httpx.Response:
    """A request as a hostile client may send it (bypassing the client's own checks)."""
    transport = httpx.HTTPTransport(uds=str(host.socket))
    with httpx.Client(transport=transport, base_url="http://vmferryd", timeout=30) as http:
        return http.request(
            method, path, content=body, headers={"Content-Type": "application/json"}
        )


# -- Perform's uri: only tcp, only to allowed networks -------------------------------------------


def test_perform_refuses_exec_file_unix_and_foreign_tcp(
    pair: tuple[Host, Host], tmp_path: Path
) -> None:
    """``exec:`` ran a command as root, ``file:`` wrote guest memory anywhere: both refused."""
    a, b = pair
    hb = a.boot_guest("uri")
    marker, dump, sock = tmp_path / "ran", tmp_path / "memory", tmp_path / "q.sock"
    listener = socket.socket(socket.AF_UNIX)
    listener.bind(str(sock))
    listener.listen()
    listener.settimeout(0.5)
    refused = {
        f"exec:touch {marker}": (ErrorCode.INVALID_ARG, "scheme 'exec' is not allowed"),
        f"file:{dump}": (ErrorCode.INVALID_ARG, "scheme 'file' is not allowed"),
        f"unix:{sock}": (ErrorCode.INVALID_ARG, "scheme 'unix' is not allowed"),
        "fd:3": (ErrorCode.INVALID_ARG, "scheme 'fd' is not allowed"),
        "tcp:192.0.2.1:49152": (ErrorCode.OPERATION_INVALID, "allowed_networks"),
        "tcp:127.0.0.1:99999": (ErrorCode.INVALID_ARG, "port must be"),
    }

    async def run() -> None:
        async with migration_steps(a, b) as (s, _, src, dst):
            for uri, (code, words) in refused.items():
                xml, cookie = await src.begin("uri", LIVE, MigrationParams())
                _, cookie = await dst.prepare(xml, cookie, LIVE, MigrationParams())
                with pytest.raises(VmferryError) as err:
                    await src.perform("uri", cookie, uri)
                assert (err.value.code, words in err.value.message) == (code, True), err
                # the source job ended with the refused Perform; the client cancels Finish
                await dst.finish("uri", None, cancelled=True, v3=True)
                assert (await s.dominfo("uri")).job.async_job == "none"

    asyncio.run(run())
    assert not marker.exists() and not dump.exists()
    with pytest.raises(TimeoutError):
        listener.accept()  # QEMU never connected to the unix socket
    listener.close()
    _running_here(a, "uri", hb)
    _nothing_on(b, "uri")
    _destroy(a, "uri")


def test_migrate_uri_and_perform2_uri_checked(pair: tuple[Host, Host], tmp_path: Path) -> None:
    """``migrate_uri`` (v3 and v2, client-managed and p2p) goes through the same check."""
    a, b = pair
    hb = a.boot_guest("mig2")
    marker = tmp_path / "ran2"

    async def run() -> None:
        async with AsyncClient(a.uri) as s, AsyncClient(b.uri) as d:
            for version in (2, 3):
                with pytest.raises(VmferryError) as err:
                    params = MigrationParams(migrate_uri="tcp:192.0.2.1:49152")
                    await migrate(s, d, "mig2", LIVE, params, version=version)
                assert "allowed_networks" in err.value.message
            # a raw perform2, skipping the client's own parameter check
            with pytest.raises(VmferryError) as err:
                await s.run(mc.perform2("mig2", f"exec:touch {marker}", int(LIVE), {}))
            assert err.value.code == ErrorCode.INVALID_ARG
            with pytest.raises(VmferryError) as err:
                await s.run(
                    mc.migrate_p2p(
                        "mig2", b.uri, int(LIVE), {"migrate_uri": f"exec:touch {marker}"}
                    )
                )
            assert err.value.code == ErrorCode.INVALID_ARG

    asyncio.run(run())
    assert not marker.exists()
    _running_here(a, "mig2", hb)
    _nothing_on(b, "mig2")
    _destroy(a, "mig2")


# -- peers: tls:// unless --insecure, within the allowed networks --------------------------------


def test_p2p_peer_must_be_tls_without_insecure() -> None:
    with hosts(2) as (a, b):
        a.kill()
        a.insecure = False
        a.start()
        hb = a.boot_guest("p2p")

        async def run() -> None:
            async with AsyncClient(a.uri) as s:
                for dest, words in (
                    (b.uri, "scheme 'unix' is not allowed"),
                    ("tcp://127.0.0.1:16509", "scheme 'tcp' is not allowed"),
                    ("tls://192.0.2.1:16514", "allowed_networks"),
                ):
                    with pytest.raises(VmferryError) as err:
                        await migrate_p2p(s, dest, "p2p", LIVE)
                    assert err.value.code == ErrorCode.OPERATION_INVALID
                    assert words in err.value.message
                # a client-managed Perform naming a unix peer is refused too
                async with AsyncClient(b.uri) as d:
                    with pytest.raises(VmferryError) as err:
                        await migrate(s, d, "p2p", LIVE)
                    assert "scheme 'unix' is not allowed" in err.value.message

        asyncio.run(run())
        _running_here(a, "p2p", hb)
        _nothing_on(b, "p2p")


# -- Prepare: listen address, flags, parameters --------------------------------------------------


def test_prepare_refuses_listen_address_not_allowed(pair: tuple[Host, Host]) -> None:
    a, b = pair
    hb = a.boot_guest("listen")

    async def run() -> None:
        async with AsyncClient(a.uri) as s, AsyncClient(b.uri) as d:
            for address in ("0.0.0.0", "::", "192.0.2.1", "example.org"):
                with pytest.raises(VmferryError) as err:
                    await migrate(s, d, "listen", LIVE, MigrationParams(listen_address=address))
                assert err.value.code == ErrorCode.OPERATION_INVALID
                assert "allowed_listen_addresses" in err.value.message
                assert b.qemu_pids() == []
            # the default address, named explicitly, is allowed
            await migrate(s, d, "listen", LIVE, MigrationParams(listen_address="127.0.0.1"))

    asyncio.run(run())
    _running_here(b, "listen", hb)
    _destroy(b, "listen")


@pytest.mark.parametrize("step", ["begin", "prepare", "perform2", "p2p"])
def test_unknown_flags_refused(pair: tuple[Host, Host], step: str) -> None:
    a, b = pair
    name = f"flag{step}"
    with a.client() as c:
        c.create(guest_xml(name))
    xml = guest_xml(name)
    for bits in (1 << 25, 1 << 31, -1):  # no libvirt flag has 1 << 25 (yet)
        body: dict[str, object] = {"flags": bits, "params": {}}
        if step == "begin":
            r = _raw(a, "POST", f"/v1/domains/{name}/migrate/begin", json.dumps(body).encode())
        elif step == "prepare":
            body["xml"] = xml
            r = _raw(b, "POST", "/v1/migrate/prepare", json.dumps(body).encode())
        elif step == "perform2":
            body["uri"] = "tcp:127.0.0.1:1"
            r = _raw(a, "POST", f"/v1/domains/{name}/migrate/perform2", json.dumps(body).encode())
        else:
            body["dest_uri"] = b.uri
            r = _raw(a, "POST", f"/v1/domains/{name}/migrate", json.dumps(body).encode())
        assert r.status_code == 400, r.text
        assert r.json()["code"] == "invalid-arg"
        assert "flags" in r.json()["message"]
    with a.client() as c:
        assert c.dominfo(name).job.async_job == "none"
    _nothing_on(b, name)
    _destroy(a, name)


@pytest.mark.parametrize(
    "params",
    [
        b'{"bandwidth_mib_s": "fast"}',
        b'{"bandwidth_mib_s": -5}',
        b'{"bandwidth_mib_s": ' + b"9" * 4000 + b"}",
        b'{"postcopy_bandwidth_mib_s": ' + b"9" * 5000 + b"}",
        b'{"downtime_limit_ms": 1e400}',
        b'{"timeout_suspend_s": NaN}',
        b'{"deadline_s": Infinity}',
        b'{"dname": {"x": 1}}',
        b'{"dname": "../x"}',
        b'{"postcopy_autoresume": "no"}',
    ],
)
def test_absurd_parameters_refused_not_500(pair: tuple[Host, Host], params: bytes) -> None:
    """Ill-typed values reached Python arithmetic and came back as 500 with Python text."""
    a, b = pair
    name = "params"
    with a.client() as c:
        if name not in [d.name for d in c.list_domains()]:
            c.create(guest_xml(name))
    begin = b'{"flags": 1, "params": ' + params + b"}"
    prepare = b'{"flags": 1, "xml": ' + json.dumps(guest_xml("pp")).encode() + b', "params": '
    for host, path, body in (
        (a, f"/v1/domains/{name}/migrate/begin", begin),
        (b, "/v1/migrate/prepare", prepare + params + b"}"),
    ):
        r = _raw(host, "POST", path, body)
        assert r.status_code == 400, r.text
        if len(params) < 4300:
            assert r.json()["code"] == "invalid-arg", r.text
        # else Python's JSON decoder refuses the body before any model (its body's shape is
        # the generic error handler's business)
        assert "Traceback" not in r.text and len(r.text) < 600
    with a.client() as c:
        assert c.dominfo(name).job.async_job == "none"
    _nothing_on(b, "pp")


def test_tuning_values_bounded(pair: tuple[Host, Host]) -> None:
    """migrate-setspeed/-setmaxdowntime: absurd values are invalid-arg, not a QEMU error."""
    a, _ = pair
    with a.client() as c:
        c.create(guest_xml("tune"))
    for path, body in (
        ("speed", b'{"bandwidth_mib_s": ' + b"9" * 4000 + b"}"),
        ("speed", b'{"bandwidth_mib_s": -1}'),
        ("maxdowntime", b'{"downtime_ms": ' + b"9" * 30 + b"}"),
        ("maxdowntime", b'{"downtime_ms": 0}'),
    ):
        r = _raw(a, "PUT", f"/v1/domains/tune/migrate/{path}", body)
        assert (r.status_code, r.json()["code"]) == (400, "invalid-arg"), r.text
    r = _raw(a, "PUT", "/v1/domains/tune/migrate/speed", b'{"bandwidth_mib_s": 100}')
    assert r.status_code == 200, r.text
    _destroy(a, "tune")


# -- item 4: unclaimed Prepare, Perform timeout, abort, a paused guest -----------------------------


def _port_free(port: int) -> bool:
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
        return True


def test_prepare_without_session_is_reaped() -> None:
    """Sessionless Prepares piled up (21 QEMUs after 65 s, the port range used up)."""
    with hosts(2) as (a, b):
        b.kill()
        b.extra_config = "prepare_timeout = 2.0\n"
        b.start()

        async def prepare(name: str) -> str:
            async with AsyncClient(b.uri) as d:
                reply = await d.run(mc.prepare(guest_xml(name), None, int(LIVE), {}, ""))
                return reply.uri

        # Each checked right after its own Prepare: under load the next Prepares (a QEMU start
        # each) may take longer than the 2 s after which the reaper destroys the first one.
        qemus: set[int] = set()
        ports = []
        for i in range(3):
            uri = asyncio.run(prepare(f"stray{i}"))
            ports.append(int(uri.rsplit(":", 1)[1]))
            new = set(b.qemu_pids()) - qemus
            assert len(new) == 1, new  # its incoming QEMU
            assert not _port_free(ports[-1])  # listening for the stream
            qemus |= new
        prepared = time.monotonic()
        deadline = time.monotonic() + 60
        while b.qemu_pids() and time.monotonic() < deadline:
            time.sleep(0.2)
        assert b.qemu_pids() == []
        took = time.monotonic() - prepared
        print(f"\n3 unclaimed Prepares reaped {took:.1f} s after (limit 2 s, v2: +5 s)")
        with b.client() as c:
            assert [d.name for d in c.list_domains(all=True)] == []
        assert all(_port_free(p) for p in ports)
        # a prepared migration that is claimed in time is unaffected
        hb = a.boot_guest("claimed")

        async def run() -> None:
            async with AsyncClient(a.uri) as s, AsyncClient(b.uri) as d:
                await migrate(s, d, "claimed", LIVE)

        asyncio.run(run())
        time.sleep(3)
        _running_here(b, "claimed", hb)


@contextlib.contextmanager
def _stalled_destination(b: Host) -> Iterator[None]:
    """The destination's QEMU stops reading (SIGSTOP) until the block ends."""
    pids = b.qemu_pids()
    assert pids
    for pid in pids:
        os.kill(pid, signal.SIGSTOP)
    try:
        yield
    finally:
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGCONT)


async def _perform_to_stalled(
    a: Host, b: Host, name: str, flags: MigrateFlags, *, abort_after: float | None
) -> tuple[VmferryError, float]:
    """Begin, Prepare, stall the destination, Perform (aborted after *abort_after* s)."""
    async with migration_steps(a, b) as (s, _, src, dst):
        xml, cookie = await src.begin(name, flags, MigrationParams())
        uri, cookie = await dst.prepare(xml, cookie, flags, MigrationParams())
        with _stalled_destination(b):
            started = time.monotonic()
            task = asyncio.create_task(src.perform(name, cookie, uri))
            if abort_after is not None:
                # Perform pauses the guest, then starts the stream: seconds under load. Abort a
                # stream stalled for *abort_after* s, not a Perform still setting up.
                deadline = time.monotonic() + 60
                while (await s.run(mc.jobinfo(name))).stats.get("status") != "active":
                    assert time.monotonic() < deadline and not task.done(), task
                    await asyncio.sleep(0.1)
                await asyncio.sleep(abort_after)
                # not live: paused for the migration (or by the user before)
                assert (await s.domstate(name)).state == "paused"
                await s.run(mc.jobabort(name))
            with pytest.raises(VmferryError) as err:
                await asyncio.wait_for(task, 60)
            took = time.monotonic() - started
        # the incoming QEMU may already have quit on the broken stream (then: no domain)
        with contextlib.suppress(VmferryError):
            await dst.finish(name, None, cancelled=True, v3=True)
        return err.value, took


def test_perform_to_a_stalled_destination_times_out() -> None:
    """A destination that never reads left the guest paused with no timeout."""
    with hosts(2) as (a, b):
        a.kill()
        a.extra_config = "perform_stall_timeout = 3.0\n"
        a.start()
        hb = a.boot_guest("stall")
        # not live: the source pauses the guest first, as a final stage would
        err, took = asyncio.run(
            _perform_to_stalled(a, b, "stall", MigrateFlags(0), abort_after=None)
        )
        assert err.code == ErrorCode.OPERATION_TIMEOUT, err
        assert "perform_stall_timeout" in err.message
        assert took < 20
        print(f"\nPerform to a SIGSTOPped destination failed after {took:.1f} s (stall limit 3 s)")
        _running_here(a, "stall", hb)
        _nothing_on(b, "stall")


@pytest.mark.parametrize("paused_before", [False, True])
def test_domjobabort_resumes_source_of_stalled_perform(
    pair: tuple[Host, Host], paused_before: bool
) -> None:
    """domjobabort always gets the source back; a guest the user paused stays paused."""
    a, b = pair
    name = f"abort{int(paused_before)}"
    hb = a.boot_guest(name)
    if paused_before:
        with a.client() as c:
            c.suspend(name)
    err, _ = asyncio.run(_perform_to_stalled(a, b, name, MigrateFlags(0), abort_after=2.0))
    assert err.code == ErrorCode.OPERATION_ABORTED, err
    with a.client() as c:
        state = c.domstate(name)
    assert (state.state, state.reason) == (
        ("paused", "user") if paused_before else ("running", "migration-canceled")
    )
    _running_here(a, name, hb, state="paused" if paused_before else "running")
    _nothing_on(b, name)
    _destroy(a, name)


def test_paused_guest_stays_paused_after_failed_perform(pair: tuple[Host, Host]) -> None:
    """A guest suspended before Begin must not be resumed by a failed migration."""
    a, b = pair
    hb = a.boot_guest("susp")
    with a.client() as c:
        c.suspend("susp")

    async def run() -> None:
        async with AsyncClient(a.uri) as s, AsyncClient(b.uri) as d:
            for flags in (LIVE, MigrateFlags(0)):
                with pytest.raises(VmferryError):
                    params = MigrationParams(migrate_uri="tcp:127.0.0.1:1")  # refused
                    await migrate(s, d, "susp", flags, params)
                state = await s.domstate("susp")
                assert (state.state, state.reason) == ("paused", "user")

    asyncio.run(run())
    _running_here(a, "susp", hb, state="paused")
    _nothing_on(b, "susp")
    _destroy(a, "susp")
