"""The migration URI parser, the address allow-list, flag and parameter checks (pure logic)."""

from __future__ import annotations

import asyncio
import math

import pytest

from vmferry.daemon.config import load_config
from vmferry.daemon.peer_client import check_peer_uri
from vmferry.errors import ErrorCode, VmferryError
from vmferry.migration.flags import KNOWN_FLAGS, MigrateFlags, parse_flags
from vmferry.migration.params import MigrationParams
from vmferry.migration.uri import (
    TcpUri,
    checked_stream_uri,
    parse_migration_uri,
    parse_networks,
)

LOOPBACK = parse_networks(["127.0.0.0/8", "::1/128"])


@pytest.mark.parametrize(
    ("uri", "host", "port"),
    [
        ("tcp:127.0.0.1:49152", "127.0.0.1", 49152),
        ("tcp://127.0.0.1:49152", "127.0.0.1", 49152),
        ("tcp://127.0.0.1:49152/", "127.0.0.1", 49152),
        ("tcp:[::1]:1", "::1", 1),
        ("tcp:localhost:65535", "localhost", 65535),
        ("tcp:host-b.example.org:4000", "host-b.example.org", 4000),
    ],
)
def test_tcp_uris_parse(uri: str, host: str, port: int) -> None:
    parsed = parse_migration_uri(uri)
    assert parsed == TcpUri(host, port)
    assert parse_migration_uri(str(parsed)) == parsed


@pytest.mark.parametrize(
    "scheme_uri",
    [
        "exec:touch /tmp/x",
        "EXEC:cat > /tmp/x",
        "file:/tmp/guest-memory",
        "unix:/run/vmferry/vmferryd.sock",
        "fd:3",
        "rdma:127.0.0.1:4000",
        "vsock:2:4000",
        "http://127.0.0.1:80",
    ],
)
def test_non_network_schemes_refused_by_name(scheme_uri: str) -> None:
    with pytest.raises(VmferryError) as err:
        parse_migration_uri(scheme_uri)
    assert err.value.code == ErrorCode.INVALID_ARG
    scheme = scheme_uri.split(":", 1)[0]
    assert f"scheme '{scheme}' is not allowed" in err.value.message


@pytest.mark.parametrize(
    "uri",
    [
        "",
        "tcp",
        "tcp:127.0.0.1",
        "tcp:127.0.0.1:0",
        "tcp:127.0.0.1:65536",
        "tcp:127.0.0.1:-1",
        "tcp:127.0.0.1:+80",
        "tcp:127.0.0.1:0x50",
        "tcp:127.0.0.1:" + "9" * 5000,
        "tcp:::1:4000",
        "tcp:[127.0.0.1]:4000",
        "tcp:[::1:4000",
        "tcp:127.0.0.1:4000,ipv4=on",
        "tcp:bad host:4000",
        "tcp:-x:4000",
        "tcp:user@host:4000",
        "tcp:" + "a" * 400 + ":1",
        "tcp:fe80::1%eth0:4000",
    ],
)
def test_malformed_tcp_uris_refused(uri: str) -> None:
    with pytest.raises(VmferryError) as err:
        parse_migration_uri(uri)
    assert err.value.code == ErrorCode.INVALID_ARG
    assert len(err.value.message) < 300


@pytest.mark.parametrize("value", [None, 5, ["tcp:127.0.0.1:1"], b"tcp:127.0.0.1:1"])
def test_non_string_uri_refused(value: object) -> None:
    with pytest.raises(VmferryError) as err:
        parse_migration_uri(value)
    assert err.value.code == ErrorCode.INVALID_ARG


def test_stream_uri_checked_against_allowed_networks() -> None:
    run = asyncio.run
    assert run(checked_stream_uri("tcp://127.0.0.2:5000", LOOPBACK)) == "tcp:127.0.0.2:5000"
    assert run(checked_stream_uri("tcp:[::1]:5000", LOOPBACK)) == "tcp:[::1]:5000"
    # a name is resolved and QEMU gets the checked literal
    assert run(checked_stream_uri("tcp:localhost:5000", LOOPBACK)) in (
        "tcp:127.0.0.1:5000",
        "tcp:[::1]:5000",
    )
    for outside in ("tcp:10.1.2.3:5000", "tcp:0.0.0.0:5000", "tcp:[::ffff:10.1.2.3]:5000"):
        with pytest.raises(VmferryError) as err:
            run(checked_stream_uri(outside, LOOPBACK))
        assert err.value.code == ErrorCode.OPERATION_INVALID
        assert "allowed_networks" in err.value.message
    # an IPv4-mapped loopback address is the loopback address
    assert run(checked_stream_uri("tcp:[::ffff:127.0.0.1]:5000", LOOPBACK))
    wide = parse_networks(["10.0.0.0/8"])
    assert run(checked_stream_uri("tcp:10.1.2.3:5000", wide)) == "tcp:10.1.2.3:5000"


def test_peer_uri_rules() -> None:
    def check(uri: str, *, insecure: bool) -> str:
        return asyncio.run(check_peer_uri(uri, LOOPBACK, insecure=insecure))

    assert check("tls://127.0.0.1:16514", insecure=False) == "tls://127.0.0.1:16514"
    for plain in ("tcp://127.0.0.1:16509", "unix:///run/other/daemon.sock"):
        with pytest.raises(VmferryError) as err:
            check(plain, insecure=False)
        assert err.value.code == ErrorCode.OPERATION_INVALID
        assert "--insecure" in err.value.message
        assert check(plain, insecure=True) == plain
    with pytest.raises(VmferryError) as err:
        check("tls://192.0.2.7:16514", insecure=True)
    assert "allowed_networks" in err.value.message


def test_unknown_flag_bits_refused() -> None:
    assert parse_flags(int(MigrateFlags.LIVE | MigrateFlags.POSTCOPY)) == (
        MigrateFlags.LIVE | MigrateFlags.POSTCOPY
    )
    assert parse_flags(KNOWN_FLAGS) == MigrateFlags(KNOWN_FLAGS)
    for bad in (1 << 9, 1 << 30, 1 << 64, -1, True, "1", 1.0, 10**5000):
        with pytest.raises(VmferryError) as err:
            parse_flags(bad)
        assert err.value.code == ErrorCode.INVALID_ARG
        assert len(err.value.message) < 200


@pytest.mark.parametrize(
    ("params", "words"),
    [
        ({"bandwidth_mib_s": -1}, "bandwidth_mib_s"),
        ({"bandwidth_mib_s": 10**5000}, "between 0 and"),
        ({"bandwidth_mib_s": "fast"}, "must be an integer"),
        ({"bandwidth_mib_s": 1.5}, "must be an integer"),
        ({"bandwidth_mib_s": True}, "must be an integer"),
        ({"downtime_limit_ms": 3_000_000}, "downtime_limit_ms"),
        ({"parallel_connections": 256}, "parallel_connections"),
        ({"timeout_suspend_s": math.nan}, "timeout_suspend_s"),
        ({"deadline_s": math.inf}, "deadline_s"),
        ({"deadline_s": -1}, "deadline_s"),
        ({"deadline_s": 10**400}, "deadline_s"),
        ({"postcopy_autoresume": "yes"}, "true or false"),
        ({"dname": ["x"]}, "must be a string"),
        ({"dname": "../../etc/passwd"}, "valid domain name"),
        ({"migrate_uri": "exec:touch /tmp/x"}, "scheme 'exec'"),
        ({"listen_address": "0.0.0.0 -S"}, "listen address"),
        ({"policy": "x" * 70_000}, "longer than"),
        ({"bogus": 1}, "unknown migration parameter"),
    ],
)
def test_bad_parameters_refused(params: dict[str, object], words: str) -> None:
    with pytest.raises(VmferryError) as err:
        MigrationParams.from_dict(params)
    assert err.value.code == ErrorCode.INVALID_ARG
    assert words in err.value.message
    assert len(err.value.message) < 300


def test_good_parameters_round_trip() -> None:
    params = MigrationParams(
        bandwidth_mib_s=100,
        downtime_limit_ms=300,
        timeout_suspend_s=2,
        migrate_uri="tcp:127.0.0.1:5000",
        listen_address="127.0.0.1",
        dname="other-name",
        deadline_s=30.5,
    )
    assert MigrationParams.from_dict(params.to_dict()) == params
    assert MigrationParams.from_dict({"downtime_limit_ms": None}).downtime_limit_ms is None


def test_parameters_are_a_record_without_dataclasses() -> None:
    # A plain record (the CLI does not import dataclasses): copy, equality, no unknown field.
    params = MigrationParams(dname="a", bandwidth_mib_s=5)
    copied = params.copy(dname="b")
    assert (copied.dname, copied.bandwidth_mib_s, params.dname) == ("b", 5, "a")
    assert params.copy() == params != copied
    assert params != params.to_dict()
    assert "dname='a'" in repr(params)
    assert list(params.to_dict())[:2] == ["bandwidth_mib_s", "downtime_limit_ms"]
    with pytest.raises(TypeError, match="migrate_urix"):
        MigrationParams(migrate_urix="tcp:h:1")  # type: ignore[call-arg]
    with pytest.raises(TypeError):
        hash(params)  # mutable, as a dataclass


def test_config_keys(tmp_path: object) -> None:
    from pathlib import Path

    path = Path(str(tmp_path)) / "c.toml"
    config = load_config(None)
    assert config.migration.allowed_networks == ["127.0.0.0/8", "::1/128"]
    assert config.migration.allowed_listen_addresses == []
    assert config.migration.prepare_timeout == 60.0
    path.write_text(
        '[migration]\nallowed_networks = ["10.0.0.0/8"]\nallowed_listen_addresses = ["10.0.0.2"]\n'
        "prepare_timeout = 5\nperform_stall_timeout = 2.5\nperform_timeout = 600\n"
    )
    mig = load_config(path).migration
    assert (mig.allowed_networks, mig.allowed_listen_addresses) == (["10.0.0.0/8"], ["10.0.0.2"])
    assert (mig.prepare_timeout, mig.perform_stall_timeout, mig.perform_timeout) == (5, 2.5, 600)
    for bad in (
        'allowed_networks = ["10.0.0.0/33"]',
        'allowed_listen_addresses = ["a b"]',
        "prepare_timeout = 0",
        "perform_stall_timeout = -1",
        "perform_timeout = -1",
    ):
        path.write_text(f"[migration]\n{bad}\n")
        with pytest.raises(VmferryError) as err:
            load_config(path)
        assert err.value.code == ErrorCode.INVALID_ARG
