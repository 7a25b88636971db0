"""TLS of the migration stream: the negotiation rules, the cookie part, QEMU's private copy."""

from __future__ import annotations

import base64
import os
import shutil
import stat
import subprocess
from pathlib import Path

import pytest

from vmferry.errors import ErrorCode, VmferryError
from vmferry.migration import tls
from vmferry.migration.cookie import MigrationCookie, parse_cookie
from vmferry.migration.flags import MigrateFlags as F
from vmferry.migration.params import MigrationParams, compression_method
from vmferry.pki import init_pki
from vmferry.qemu import tls_creds

UUID = "11111111-2222-3333-4444-555555555555"
HOST_A = "aaaaaaaa-2222-3333-4444-555555555555"
HOST_B = "bbbbbbbb-2222-3333-4444-555555555555"


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("pki")
    init_pki(path)
    return path


def setup(mode: str, pki_dir: Path | None) -> tls.TlsSetup:
    return tls.TlsSetup(mode=mode, pki_dir=pki_dir)


def offered(mode: str, pki_dir: Path | None, flags: F = F.LIVE) -> MigrationCookie:
    cookie = MigrationCookie(name="g", uuid=UUID, hostname="a", hostuuid=HOST_A)
    tls.offer(setup(mode, pki_dir), flags, cookie)
    # through XML, as the destination gets it
    return parse_cookie(cookie.to_xml(), name="g", uuid=UUID, local_hostuuid=HOST_B)


@pytest.mark.parametrize(
    ("src", "dst", "flags", "expected"),
    [
        (("off", True), ("off", True), F.LIVE, False),  # libvirt's default: only when asked
        (("off", True), ("off", True), F.LIVE | F.TLS, True),
        (("on", True), ("off", True), F.LIVE, True),  # "on" on either side, both with a PKI
        (("off", True), ("on", True), F.LIVE, True),
        (("on", False), ("on", True), F.LIVE, False),  # the source has no PKI
        (("required", True), ("off", True), F.LIVE, True),
        (("off", True), ("required", True), F.LIVE, True),
        (("required", True), ("required", True), F.LIVE | F.TUNNELLED, False),  # daemons' TLS
    ],
)
def test_decide(
    pki: Path, src: tuple[str, bool], dst: tuple[str, bool], flags: F, expected: bool
) -> None:
    cookie = offered(src[0], pki if src[1] else None, flags)
    assert tls.decide(setup(dst[0], pki if dst[1] else None), flags, cookie) is expected


def test_required_refuses_in_both_directions(pki: Path) -> None:
    # into a host that requires TLS, from a source without a PKI
    with pytest.raises(VmferryError) as err:
        tls.decide(setup("required", pki), F.LIVE, offered("off", None))
    assert err.value.code == ErrorCode.TLS_REQUIRED
    assert "destination" in err.value.message
    # out of a host that requires TLS, to a destination without a PKI
    with pytest.raises(VmferryError) as err:
        tls.decide(setup("off", None), F.LIVE, offered("required", pki))
    assert err.value.code == ErrorCode.TLS_REQUIRED
    assert "source" in err.value.message
    # a required source without a PKI refuses at Begin
    with pytest.raises(VmferryError) as err:
        offered("required", None)
    assert err.value.code == ErrorCode.TLS_REQUIRED
    # v2 (no cookie): --tls alone decides
    with pytest.raises(VmferryError) as err:
        tls.decide(setup("required", pki), F.LIVE, None)
    assert err.value.code == ErrorCode.TLS_REQUIRED
    assert tls.decide(setup("required", pki), F.LIVE | F.TLS, None) is True


def test_follow_checks_the_answer(pki: Path) -> None:
    answer = MigrationCookie(name="g", uuid=UUID, hostname="b", hostuuid=HOST_B, tls_use=False)
    answer = parse_cookie(answer.to_xml(), name="g", uuid=UUID, local_hostuuid=HOST_A)
    assert answer.tls_use is False
    assert tls.follow(setup("off", pki), F.LIVE, answer) is False
    with pytest.raises(VmferryError) as err:
        tls.follow(setup("required", pki), F.LIVE, answer)
    assert err.value.code == ErrorCode.TLS_REQUIRED
    with pytest.raises(VmferryError):
        tls.follow(setup("off", pki), F.LIVE | F.TLS, answer)  # asked, but not prepared
    answer.tls_use = True
    assert tls.follow(setup("off", pki), F.LIVE, answer) is True
    with pytest.raises(VmferryError) as err:
        tls.follow(setup("off", None), F.LIVE, answer)
    assert err.value.code == ErrorCode.OPERATION_INVALID


def test_tls_flag_needs_a_pki(tmp_path: Path) -> None:
    with pytest.raises(VmferryError) as err:
        offered("off", tmp_path, F.LIVE | F.TLS)  # a directory without the files
    assert err.value.code == ErrorCode.OPERATION_INVALID
    assert "pki init" in err.value.message


@pytest.mark.parametrize("bad", ["<tls use='maybe'/>", "<tls mode='always'/>", "<tls pki=''/>"])
def test_malformed_tls_cookie_part(bad: str) -> None:
    text = MigrationCookie(name="g", uuid=UUID, hostname="a", hostuuid=HOST_A).to_xml()
    text = text.replace("</qemu-migration>", bad + "</qemu-migration>")
    with pytest.raises(VmferryError) as err:
        parse_cookie(text, name="g", uuid=UUID, local_hostuuid=HOST_B)
    assert err.value.code == ErrorCode.INVALID_ARG


def test_staged_copy_holds_only_the_endpoint_files(pki: Path, tmp_path: Path) -> None:
    base = tmp_path / "qemu-tls"
    server = tls_creds.stage(pki, base, "s", "server", None)
    client = tls_creds.stage(pki, base, "c", "client", None)
    assert sorted(os.listdir(server)) == [
        "ca-cert.pem",
        "dh-params.pem",  # QEMU would generate its own, 0.5-1.2 s per migration
        "server-cert.pem",
        "server-key.pem",
    ]
    assert sorted(os.listdir(client)) == ["ca-cert.pem", "client-cert.pem", "client-key.pem"]
    assert stat.S_IMODE(server.stat().st_mode) == 0o700
    assert stat.S_IMODE((server / "server-key.pem").stat().st_mode) == 0o400
    assert (server / "server-key.pem").read_bytes() == (pki / "server-key.pem").read_bytes()
    assert not (client / "ca-key.pem").exists() and not (server / "ca-key.pem").exists()
    with pytest.raises(VmferryError) as err:
        tls_creds.stage(tmp_path / "nopki", base, "x", "server", None)
    assert err.value.code == ErrorCode.OPERATION_FAILED
    assert not (base / "x").exists()
    tls_creds.sweep(base)
    assert not base.exists()


def test_compression_methods() -> None:
    assert compression_method(F.LIVE, MigrationParams()) == ""
    assert compression_method(F.LIVE | F.COMPRESSED, MigrationParams()) == "xbzrle"
    assert compression_method(F.LIVE | F.COMPRESSED | F.PARALLEL, MigrationParams()) == "zstd"
    with pytest.raises(VmferryError):
        MigrationParams.from_dict({"compression": "lz4"})
    with pytest.raises(VmferryError):
        MigrationParams(compression="zstd").validate(F.LIVE)  # without --compressed


def test_encrypted_stream_gets_the_destinations_channels(pki: Path) -> None:
    dst = tls.TlsSetup(mode="off", pki_dir=pki, channels=3)
    assert tls.channels(dst, F.LIVE | F.TLS, True, 4) == 3  # the smaller of both hosts'
    assert tls.channels(dst, F.LIVE | F.TLS, True, 2) == 2
    assert tls.channels(dst, F.LIVE | F.TLS, True, None) == 0  # an older source: one stream
    assert tls.channels(dst, F.LIVE, False, 2) == 0  # plain: as the client asked
    for own in (F.PARALLEL, F.POSTCOPY, F.COMPRESSED, F.OFFLINE):
        assert tls.channels(dst, F.LIVE | F.TLS | own, True, 2) == 0, own
    assert tls.channels(tls.TlsSetup(pki_dir=pki, channels=0), F.LIVE | F.TLS, True, 2) == 0
    # Begin offers the source's count, through XML as the destination gets it
    assert offered("off", pki).tls_channels == 2
    cookie = MigrationCookie(name="g", uuid=UUID, hostname="a", hostuuid=HOST_A)
    tls.offer(tls.TlsSetup(pki_dir=pki, channels=0), F.LIVE, cookie)
    assert cookie.tls_channels is None
    params = MigrationParams(bandwidth_mib_s=5)
    flags, shaped = tls.shape(F.LIVE | F.TLS, params, 3)
    assert flags == F.LIVE | F.TLS | F.PARALLEL
    assert shaped.parallel_connections == 3 and shaped.bandwidth_mib_s == 5
    assert params.parallel_connections == 0  # the request's own parameters stay as they were
    shaped.validate(flags)
    assert tls.shape(F.LIVE | F.TLS, params, None) == (F.LIVE | F.TLS, params)
    # the client's own --parallel N wins over whatever a cookie says
    own = MigrationParams(parallel_connections=4)
    assert tls.shape(F.LIVE | F.TLS | F.PARALLEL, own, 2) == (F.LIVE | F.TLS | F.PARALLEL, own)


def test_source_follows_no_more_channels_than_it_offered(pki: Path) -> None:
    src = tls.TlsSetup(pki_dir=pki, channels=2)
    answer = MigrationCookie(name="g", uuid=UUID, hostname="b", hostuuid=HOST_B, tls_channels=2)
    assert tls.answered_channels(src, answer, True) == 2
    assert tls.answered_channels(src, answer, False) is None  # a plain stream: one
    answer.tls_channels = 3  # a client's forgery, or a destination not following the rules
    with pytest.raises(VmferryError) as err:
        tls.answered_channels(src, answer, True)
    assert err.value.code == ErrorCode.OPERATION_FAILED
    answer.tls_channels = None
    assert tls.answered_channels(src, answer, True) is None


def test_channels_travel_in_the_answer() -> None:
    answer = MigrationCookie(
        name="g", uuid=UUID, hostname="b", hostuuid=HOST_B, tls_use=True, tls_channels=2
    )
    assert "channels='2'" in answer.to_xml() or 'channels="2"' in answer.to_xml()
    parsed = parse_cookie(answer.to_xml(), name="g", uuid=UUID, local_hostuuid=HOST_A)
    assert parsed.tls_channels == 2
    answer.tls_channels = None
    parsed = parse_cookie(answer.to_xml(), name="g", uuid=UUID, local_hostuuid=HOST_A)
    assert parsed.tls_channels is None  # an older destination: one stream


@pytest.mark.parametrize("bad", ["0", "17", "255", "-1", "2x", ""])
def test_channels_beyond_the_bound_are_refused(bad: str) -> None:
    text = MigrationCookie(name="g", uuid=UUID, hostname="a", hostuuid=HOST_A).to_xml()
    text = text.replace("</qemu-migration>", f"<tls use='yes' channels='{bad}'/></qemu-migration>")
    with pytest.raises(VmferryError) as err:
        parse_cookie(text, name="g", uuid=UUID, local_hostuuid=HOST_B)
    assert err.value.code == ErrorCode.INVALID_ARG


def _der_integers(der: bytes) -> list[int]:
    """The INTEGERs of a DER SEQUENCE (PKCS #3 DHParameter: p, g)."""

    def length(at: int) -> tuple[int, int]:
        first = der[at]
        if first < 0x80:
            return first, at + 1
        count = first & 0x7F
        return int.from_bytes(der[at + 1 : at + 1 + count], "big"), at + 1 + count

    assert der[0] == 0x30
    _, at = length(1)
    out = []
    while at < len(der):
        assert der[at] == 0x02
        size, at = length(at + 1)
        out.append(int.from_bytes(der[at : at + size], "big"))
        at += size
    return out


def test_dh_params_are_rfc7919_ffdhe3072() -> None:
    """The server's DH group: 3072 bits, generator 2, the RFC's prime (as OpenSSL knows it)."""
    body = b"".join(tls_creds.FFDHE3072_PEM.strip().splitlines()[1:-1])
    p, g = _der_integers(base64.b64decode(body))
    assert g == 2 and p.bit_length() == 3072
    # RFC 7919 primes begin and end with 64 one bits
    ones = (1 << 64) - 1
    assert p >> (3072 - 64) == ones and p & ones == ones
    openssl = shutil.which("openssl")
    if openssl is None:
        pytest.skip("no openssl to compare with")
    out = subprocess.run(
        [openssl, "genpkey", "-genparam", "-algorithm", "DH", "-pkeyopt", "dh_param:ffdhe3072"],
        capture_output=True,
        check=True,
    ).stdout
    assert out == tls_creds.FFDHE3072_PEM


class _RecordingMonitor:
    """Answers the calls of add_x509 as QEMU does and keeps what they asked."""

    connected = True

    def __init__(self) -> None:
        self.calls: list[tuple[str, dict[str, object]]] = []

    async def execute_with_fd(self, cmd: str, args: dict[str, object], fd: int) -> object:
        self.calls.append((cmd, dict(args)))
        return {"fdset-id": 3, "fd": 42}

    async def execute(self, cmd: str, args: dict[str, object] | None = None) -> object:
        self.calls.append((cmd, dict(args or {})))
        return {}


def test_credentials_prefer_aes_128_gcm(pki: Path, tmp_path: Path) -> None:
    import asyncio
    from typing import cast

    from vmferry.qemu.monitor import Monitor

    mon = _RecordingMonitor()
    asyncio.run(tls_creds.add_x509(cast(Monitor, mon), pki, tmp_path, "o", "server", None))
    added = [args for cmd, args in mon.calls if cmd == "object-add"]
    assert len(added) == 1
    assert added[0]["priority"] == tls_creds.PRIORITY
    assert added[0]["verify-peer"] is True


def _gnutls_ciphers(priority: str) -> list[str]:
    """The ciphers, in order of preference, that gnutls makes of *priority*."""
    import ctypes
    import ctypes.util

    name = ctypes.util.find_library("gnutls")
    if name is None:
        pytest.skip("no libgnutls (QEMU's TLS library) to parse the priority string")
    lib = ctypes.CDLL(name)
    lib.gnutls_cipher_get_name.restype = ctypes.c_char_p
    prio, err = ctypes.c_void_p(), ctypes.c_char_p()
    assert lib.gnutls_priority_init(ctypes.byref(prio), priority.encode(), ctypes.byref(err)) == 0
    ids = ctypes.POINTER(ctypes.c_uint)()
    n = lib.gnutls_priority_cipher_list(prio, ctypes.byref(ids))
    names = [lib.gnutls_cipher_get_name(ids[i]).decode() for i in range(n)]
    lib.gnutls_priority_deinit(prio)
    return names


def test_priority_only_reorders_qemus_default() -> None:
    # the same ciphers as QEMU's default NORMAL, none added or dropped; AES-128-GCM first
    mine, normal = _gnutls_ciphers(tls_creds.PRIORITY), _gnutls_ciphers("NORMAL")
    assert sorted(mine) == sorted(normal)
    assert mine[0] == "AES-128-GCM"
    assert [c for c in mine if c != "AES-128-GCM"] == [c for c in normal if c != "AES-128-GCM"]
