"""docs/api.md lists every route of the daemon's app (and no other); the clients are documented."""

from __future__ import annotations

import inspect
import re
from pathlib import Path
from types import SimpleNamespace
from typing import Any, cast

from vmferry.client import AsyncClient, Client
from vmferry.daemon.api import create_app
from vmferry.daemon.config import DaemonConfig
from vmferry.daemon.migrate import MigrationService

API_MD = Path(__file__).resolve().parents[2] / "docs" / "api.md"
ROW = re.compile(r"^\| (GET|POST|PUT|DELETE|PATCH) \| (/\S+?)(?:\?\S*)? \|", re.M)


def app_routes() -> set[tuple[str, str]]:
    # The routes are declared without touching the driver beyond its config.
    driver = SimpleNamespace(config=DaemonConfig(), domains=lambda: iter(()))
    service = cast(MigrationService, SimpleNamespace(driver=driver, observe=SimpleNamespace()))
    paths: dict[str, dict[str, Any]] = create_app(service).openapi()["paths"]
    return {(method.upper(), path) for path, ops in paths.items() for method in ops}


def test_every_route_is_in_docs_api_md() -> None:
    routes = app_routes()
    documented = {(m, p) for m, p in ROW.findall(API_MD.read_text())}
    assert len(routes) >= 30  # domains, events, sessions and every migration step
    assert not routes - documented, f"add to docs/api.md: {sorted(routes - documented)}"
    assert not documented - routes, f"not routes of the app: {sorted(documented - routes)}"


def test_every_public_client_method_has_a_docstring() -> None:
    missing = [
        f"{cls.__name__}.{name}"
        for cls in (Client, AsyncClient)
        for name, member in ((n, getattr(cls, n)) for n in dir(cls))  # inherited ones too
        if not name.startswith("_")
        and callable(getattr(member, "fget", member))
        and not inspect.getdoc(getattr(member, "fget", member))
    ]
    assert not missing, f"without a docstring: {missing}"
