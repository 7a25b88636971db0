"""The access model as logic: certificate patterns, roles, permissions, listen URIs.

tests/e2e/test_access.py checks it on real daemons.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from vmferry.daemon.access import (
    PERMISSIONS,
    AccessPolicy,
    Role,
    cert_matches,
    route_permission,
)
from vmferry.daemon.listen import ListenSpec, parse_listen_uri
from vmferry.errors import ErrorCode, VmferryError


@pytest.mark.parametrize(
    ("pattern", "subject", "sans", "expected"),
    [
        ("*", "CN=x,O=other", [], True),
        ("CN=*,O=vmferry", "CN=vmferry client,O=vmferry", [], True),
        # * never spans an attribute: a read-only certificate is not an admin one
        ("CN=*,O=vmferry", "CN=bob,OU=read-only,O=vmferry", [], False),
        # nor an escaped comma inside a CN that imitates another attribute
        ("CN=*,O=vmferry", r"CN=x\,O=vmferry,O=evil", [], False),
        ("CN=*,OU=read-only,O=vmferry", "CN=bob,OU=read-only,O=vmferry", [], True),
        ("CN=admin-*,O=vmferry", "CN=admin-7,O=vmferry", [], True),
        ("CN=admin-*,O=vmferry", "CN=adm,O=vmferry", [], False),
        ("DNS:*.example.org", "CN=h,O=x", ["DNS:a.example.org"], True),
        ("DNS:*.example.org", "CN=h,O=x", ["IP:192.0.2.1"], False),
    ],
)
def test_cert_patterns(pattern: str, subject: str, sans: list[str], expected: bool) -> None:
    assert cert_matches(pattern, subject, sans) is expected


def test_policy_roles_and_permissions() -> None:
    policy = AccessPolicy()
    assert policy.role_for_cert("CN=vmferry client,O=vmferry", []) == Role.ADMIN
    assert policy.role_for_cert("CN=bob,OU=read-only,O=vmferry", []) == Role.READ_ONLY
    assert policy.role_for_cert("CN=bob,O=elsewhere", []) is None
    # read-only wins when both lists match
    both = AccessPolicy(tls_admin=["*"])
    assert both.role_for_cert("CN=bob,OU=read-only,O=vmferry", []) == Role.READ_ONLY
    assert all(policy.allows(Role.ADMIN, p) for p in PERMISSIONS.values())
    assert not policy.allows(Role.READ_ONLY, "domain.define")
    assert AccessPolicy(readonly_permissions=["domain.*"]).allows(Role.READ_ONLY, "domain.start")
    with pytest.raises(VmferryError) as err:
        AccessPolicy(readonly_permissions=["domain.reed"])
    assert err.value.code == ErrorCode.INVALID_ARG and "domain.reed" in err.value.message


def test_every_route_gets_its_own_permission() -> None:
    # No template shadows another: each concrete path maps back to its own entry.
    for (method, template), perm in PERMISSIONS.items():
        assert route_permission(method, template.replace("{name}", "web1")) == (
            perm,
            "web1" if "{name}" in template else "",
        )
    assert route_permission("HEAD", "/v1/host") == ("host.read", "")
    assert route_permission("PATCH", "/v1/host") == (None, "")


def test_listen_uri_ro() -> None:
    spec = parse_listen_uri("unix:///run/vf/ro.sock?ro=1", insecure=False)
    assert spec == ListenSpec("unix", path=Path("/run/vf/ro.sock"), readonly=True)
    assert parse_listen_uri(str(spec), insecure=False) == spec
    assert parse_listen_uri("tls://0.0.0.0:1?ro=1", insecure=False).readonly
    with pytest.raises(VmferryError, match=r"\?ro=1"):
        parse_listen_uri("unix:///run/vf/ro.sock?role=admin", insecure=False)
