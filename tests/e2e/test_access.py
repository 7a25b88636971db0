"""The access model on real daemons: roles per listener and certificate, CRL, audit log."""

from __future__ import annotations

import asyncio
import grp
import json
import os
import shutil
import socket
import stat
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import pytest
from cryptography import x509
from fastapi import FastAPI

from vmferry import pki
from vmferry.client import Client
from vmferry.client.calls import Call
from vmferry.daemon.access import (
    AUDITED_READS,
    PERMISSIONS,
    READ_ONLY_DEFAULT,
    AccessPolicy,
    route_permission,
)
from vmferry.daemon.config import load_config
from vmferry.daemon.listen import ListenSpec, serve
from vmferry.errors import ErrorCode, VmferryError
from vmferry.testguest import guest_xml
from vmferry.testing import Host, wait_heartbeat


@dataclass
class AccessHost(Host):
    """A vmferryd with a read-only unix socket beside the admin one, and extra config."""

    access_toml: str = ""
    more_listen: list[str] = field(default_factory=list)

    @property
    def ro_socket(self) -> Path:
        return self.root / "ro.sock"

    def write_config(self) -> Path:
        cfg = super().write_config()
        cfg.write_text(cfg.read_text() + self.access_toml)
        return cfg

    def command(self, cfg: Path) -> list[str]:
        extra = ["--listen", f"unix://{self.ro_socket}?ro=1"]
        for uri in self.more_listen:
            extra += ["--listen", uri]
        return [*super().command(cfg), *extra]

    @property
    def audit(self) -> list[dict[str, object]]:
        path = self.state_dir / "log" / "audit.log"
        return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


@pytest.fixture
def root() -> Iterator[Path]:
    path = Path(tempfile.mkdtemp(prefix="vfacc", dir="/tmp"))
    yield path
    shutil.rmtree(path, ignore_errors=True)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def start_host(root: Path, name: str, port: int, **kw: object) -> AccessHost:
    host = AccessHost(root / name, name, port, **kw)  # type: ignore[arg-type]
    host.root.mkdir()
    try:
        host.start()
    except BaseException:
        host.cleanup()
        raise
    return host


def denied(err: pytest.ExceptionInfo[VmferryError], permission: str) -> None:
    assert err.value.code == ErrorCode.ACCESS_DENIED
    assert permission in err.value.message and "read-only" in err.value.message


def cli(*args: str) -> None:
    subprocess.run(
        [sys.executable, "-m", "vmferry.cli.main", *args], check=True, capture_output=True
    )


def request(client: httpx.Client, method: str, path: str) -> httpx.Response:
    return client.request(method, path.replace("{name}", "d1"), json={})


# --- pure logic -------------------------------------------------------------------------------


# --- unix sockets -----------------------------------------------------------------------------


def test_readonly_socket_reads_but_changes_nothing(root: Path) -> None:
    host = start_host(root, "h", free_port())
    try:
        assert stat.S_IMODE(host.ro_socket.stat().st_mode) == 0o666
        assert stat.S_IMODE(host.socket.stat().st_mode) == 0o600
        with Client(host.uri) as admin, Client(f"unix://{host.ro_socket}") as ro:
            admin.define(guest_xml("d1"))
            assert [d.name for d in ro.list_domains(all=True)] == ["d1"]
            assert ro.dominfo("d1").state == "shutoff"
            assert "<name>d1</name>" in ro.dumpxml("d1")
            assert ro.host().hostname == "h"
            # A monitoring agent needs no more than the read-only socket.
            assert 'vmferry_domains{state="shutoff"} 1.0' in ro.metrics()
            with pytest.raises(VmferryError) as err:
                ro.define(guest_xml("d2"))
            denied(err, "domain.define")
            for call, perm in [
                (ro.start, "domain.start"),
                (ro.destroy, "domain.destroy"),
                (ro.undefine, "domain.undefine"),
            ]:
                with pytest.raises(VmferryError) as err:
                    call("d1")
                denied(err, perm)
            assert [d.name for d in admin.list_domains(all=True)] == ["d1"]

        # Every route that is not a read, raw: refused before the body is even looked at.
        transport = httpx.HTTPTransport(uds=str(host.ro_socket))
        with httpx.Client(transport=transport, base_url="http://vmferry") as raw:
            with raw.stream("GET", "/v1/events") as events:
                assert events.status_code == 200
            for (method, path), perm in PERMISSIONS.items():
                r = request(raw, method, path) if path != "/v1/events" else None
                if r is None:
                    continue
                if perm in READ_ONLY_DEFAULT:
                    assert r.status_code != 403, (method, path, r.text)
                    continue
                assert r.status_code == 403, (method, path, r.text)
                assert r.json()["code"] == "access-denied" and perm in r.json()["message"]
            # A name cannot forge a line of the daemon's log.
            assert raw.post("/v1/domains/x%0Aforged%20line/start").status_code == 403
            # A path that is no route: 403 to read-only, an admin learns it does not exist.
            assert raw.post("/v1/nowhere").json()["code"] == "access-denied"
        with Client(host.uri) as admin:
            with pytest.raises(VmferryError) as err:
                admin.run(Call("POST", "/v1/nowhere", parse=lambda _: None))
            assert err.value.code != ErrorCode.ACCESS_DENIED

        # Audit: the admin's define and the refused calls, each with identity and outcome.
        lines = host.audit
        # reads are not audited, but for those that hand out a guest's data (vol-download)
        reads = [line for line in lines if line["method"] == "GET"]
        assert reads and all(
            route_permission("GET", str(line["path"]))[0] in AUDITED_READS for line in reads
        )
        lines = [line for line in lines if line["method"] != "GET"]
        ok = [line for line in lines if line["status"] == 200]
        assert len(ok) == 1
        assert ok[0]["path"] == "/v1/domains" and ok[0]["domain"] == "d1"
        assert ok[0]["role"] == "admin" and ok[0]["uid"] == os.getuid()
        assert ok[0]["pid"] == os.getpid()
        refused = [line for line in lines if line["status"] == 403]
        assert len(refused) == len(lines) - 2 > 10  # and the admin's POST /v1/nowhere
        assert {line["code"] for line in refused} == {"access-denied"}
        assert {line["role"] for line in refused} == {"read-only"}
        assert any(line["domain"] == "d1" and "/start" in str(line["path"]) for line in refused)
        log_text = host.log.read_text()
        assert "domain=d1 status=200" in log_text  # the vmferry.audit logger
        assert "x\\x0aforged line" in log_text
        assert not any(line.startswith("forged") for line in log_text.splitlines())
    finally:
        host.cleanup()


async def test_readonly_socket_group(root: Path) -> None:
    group = grp.getgrgid(os.getgid()).gr_name
    spec = ListenSpec("unix", path=root / "ro.sock", readonly=True)
    stop, ready = asyncio.Event(), asyncio.Event()
    app = FastAPI()
    task = asyncio.create_task(
        serve(
            app,
            [spec],
            pki_dir=None,
            stop=stop,
            ready=ready,
            access=AccessPolicy(readonly_socket_group=group),
        )
    )
    try:
        await asyncio.wait_for(ready.wait(), 10)
        st = spec.path.stat()  # type: ignore[union-attr]
        assert stat.S_IMODE(st.st_mode) == 0o660 and st.st_gid == os.getgid()
    finally:
        stop.set()
        await asyncio.wait_for(task, 10)
    with pytest.raises(VmferryError, match="no group"):
        await serve(
            app, [spec], pki_dir=None, stop=stop, access=AccessPolicy(readonly_socket_group="-x")
        )


@pytest.mark.qemu
def test_readonly_socket_with_running_guest(root: Path) -> None:
    host = start_host(root, "h", free_port())
    try:
        with Client(host.uri) as admin, Client(f"unix://{host.ro_socket}") as ro:
            admin.create(guest_xml("g1"))
            wait_heartbeat(ro, "g1")  # console reads are allowed
            for call, perm in [(ro.destroy, "domain.destroy"), (ro.suspend, "domain.suspend")]:
                with pytest.raises(VmferryError) as err:
                    call("g1")
                denied(err, perm)
            assert ro.domstate("g1").state == "running"
            admin.suspend("g1")
            assert ro.domstate("g1").state == "paused"
            admin.destroy("g1")
            assert ro.list_domains() == []
    finally:
        host.cleanup()


# --- TLS --------------------------------------------------------------------------------------


def test_tls_roles_allow_lists_and_crl(root: Path) -> None:
    ca = root / "pki"
    pki.init_pki(ca)
    # Through the CLI: a read-only certificate, and two more to refuse.
    for out, name, flags in [("ro", "reader", ["--read-only"]), ("bob", "bob", [])]:
        cli("pki", "client", str(ca), str(root / out), name, *flags)
    pki.issue_client(ca, root / "eve", "eve")
    cli("pki", "revoke", str(ca), str(root / "eve" / pki.CLIENT_CERT))
    assert (ca / pki.CRL).exists()
    # Only pki init's client certificate is admin here; bob is in no list.
    access = (
        '[access]\ntls_admin = ["CN=vmferry client,O=vmferry", "CN=eve,O=vmferry"]\n'
        'readonly_permissions = ["host.read", "domain.read"]\n'
    )
    ro_port = free_port()
    host = start_host(
        root,
        "t",
        free_port(),
        pki_dir=ca,
        tls_port=free_port(),
        access_toml=access,
        more_listen=[f"tls://127.0.0.1:{ro_port}?ro=1"],
    )
    try:
        with Client(host.tls_uri, pki_dir=ca) as admin:
            admin.define(guest_xml("d1"))
        with Client(host.tls_uri, pki_dir=root / "ro") as ro:
            assert [d.name for d in ro.list_domains(all=True)] == ["d1"]
            with pytest.raises(VmferryError) as err:
                ro.undefine("d1")
            denied(err, "domain.undefine")
            with pytest.raises(VmferryError) as err:
                ro.console("d1")  # taken away by readonly_permissions
            denied(err, "domain.console")
            with pytest.raises(VmferryError) as err:
                ro.metrics()  # not in this readonly_permissions either
            denied(err, "metrics.read")
        # ?ro=1 caps even an admin certificate.
        with Client(f"tls://127.0.0.1:{ro_port}", pki_dir=ca) as capped:
            assert capped.dominfo("d1").name == "d1"
            with pytest.raises(VmferryError) as err:
                capped.start("d1")
            denied(err, "domain.start")
        with Client(host.tls_uri, pki_dir=root / "bob") as bob:
            with pytest.raises(VmferryError) as err:
                bob.host()
            assert err.value.code == ErrorCode.ACCESS_DENIED
            assert "CN=bob,O=vmferry" in err.value.message
            with pytest.raises(VmferryError) as err:
                bob.undefine("d1")
            assert err.value.code == ErrorCode.ACCESS_DENIED
        # Revoked: refused in the handshake although tls_admin names it.
        with Client(host.tls_uri, pki_dir=root / "eve") as eve:
            with pytest.raises(VmferryError) as err:
                eve.host()
            assert err.value.code in (ErrorCode.CONNECT_FAILED, ErrorCode.RPC_FAILED)
        with Client(host.uri) as local:
            assert [d.name for d in local.list_domains(all=True)] == ["d1"]

        def outcomes(subject: str) -> list[tuple[object, ...]]:
            return [
                (line["path"], line["role"], line["status"], line["domain"])
                for line in host.audit
                if line["subject"] == subject
            ]

        assert outcomes("CN=vmferry client,O=vmferry") == [
            ("/v1/domains", "admin", 200, "d1"),
            ("/v1/domains/d1/start", "read-only", 403, "d1"),  # through the ?ro=1 listener
        ]
        assert outcomes("CN=reader,OU=read-only,O=vmferry") == [
            ("/v1/domains/d1", "read-only", 403, "d1")
        ]
        assert outcomes("CN=bob,O=vmferry") == [("/v1/domains/d1", "none", 403, "d1")]
        assert outcomes("CN=eve,O=vmferry") == []
    finally:
        host.cleanup()


def test_pki_client_and_revoke_refuse_mistakes(root: Path) -> None:
    ca, other = root / "ca", root / "other"
    pki.init_pki(ca)
    pki.init_pki(other)
    pki.issue_client(ca, root / "alice", "alice", read_only=True)
    subject = x509.load_pem_x509_certificate((root / "alice" / pki.CLIENT_CERT).read_bytes())
    assert subject.subject.rfc4514_string() == "CN=alice,OU=read-only,O=vmferry"
    assert not (root / "alice" / pki.CA_KEY).exists()
    with pytest.raises(VmferryError, match="already holds"):
        pki.issue_client(ca, root / "alice", "alice2")
    with pytest.raises(VmferryError, match="not issued by"):
        pki.revoke(ca, other / pki.CLIENT_CERT)
    first = pki.revoke(ca, root / "alice" / pki.CLIENT_CERT)
    second = pki.revoke(ca, ca / pki.CLIENT_CERT)
    crl = x509.load_pem_x509_crl((ca / pki.CRL).read_bytes())
    assert {entry.serial_number for entry in crl} == {first, second}


def test_access_config(root: Path) -> None:
    cfg = root / "d.toml"
    cfg.write_text(
        '[access]\ntls_admin = ["*"]\nreadonly_permissions = ["domain.*"]\naudit_log = false\n'
        '[tls]\ncrl = "crl.pem"\n'
    )
    config = load_config(cfg)
    assert config.access.tls_admin == ["*"] and config.access.audit_log is False
    assert config.tls.crl == root / "crl.pem"
    cfg.write_text('[access]\naudit_log = "yes"\n')
    with pytest.raises(VmferryError, match=r"access\.audit_log must be true or false"):
        load_config(cfg)
    # A permission that does not exist stops the daemon before it listens.
    cfg.write_text('[access]\nreadonly_permissions = ["domain.reed"]\n')
    argv = ["--state-dir", str(root / "s"), "--listen", f"unix://{root}/d.sock"]
    out = subprocess.run(
        [sys.executable, "-m", "vmferry.daemon.main", *argv, "--config", str(cfg)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert out.returncode == 1
    assert "domain.reed" in out.stderr and "[invalid-arg]" in out.stderr
    assert not (root / "d.sock").exists()
