"""The ``/v1`` HTTP API of vmferryd (FastAPI), a thin skin over :class:`Driver`.

Routes only translate: every rule lives in the driver and the layers below.
Errors leave as ``{"code": ..., "message": ...}`` with the driver's text unchanged.
"""

from __future__ import annotations

import logging
import re
from collections.abc import AsyncIterator

from fastapi import APIRouter, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse

from vmferry import __version__
from vmferry.api.models import (
    ERROR_RESPONSES,
    ClusterInfo,
    ConsoleOutput,
    DomainInfo,
    DomainStateInfo,
    HostInfo,
    ShutdownRequest,
    XmlBody,
)
from vmferry.daemon.access import AccessPolicy, install_access
from vmferry.daemon.driver import Driver
from vmferry.daemon.evacuate import Evacuations
from vmferry.daemon.evacuate_api import evacuation_routes
from vmferry.daemon.guard import GuardMiddleware, install_error_handlers, validation_message
from vmferry.daemon.metrics import Metrics, add_metrics_route, time_requests
from vmferry.daemon.migrate import MigrationService
from vmferry.daemon.migrate_api import migration_routes
from vmferry.daemon.storage import StorageService
from vmferry.daemon.storage_api import UPLOAD_PATH, storage_routes
from vmferry.daemon.verbs import DomainVerbs
from vmferry.daemon.verbs_api import verb_routes
from vmferry.errors import ErrorCode, VmferryError

log = logging.getLogger(__name__)


def _error_response(err: VmferryError) -> JSONResponse:
    return JSONResponse(status_code=err.http_status, content=err.to_dict())


def create_app(
    migration: MigrationService,
    access: AccessPolicy | None = None,
    evacuations: Evacuations | None = None,
) -> FastAPI:
    """The daemon's app; *access* decides who may call what (defaults if None)."""
    driver = migration.driver
    app = FastAPI(title="vmferryd", version=__version__)
    app.state.driver = driver

    @app.exception_handler(VmferryError)
    async def _vmferry_error(request: Request, err: VmferryError) -> JSONResponse:
        return _error_response(err)

    @app.exception_handler(RequestValidationError)
    async def _bad_request(request: Request, err: RequestValidationError) -> JSONResponse:
        return _error_response(
            VmferryError(ErrorCode.INVALID_ARG, validation_message(list(err.errors())))
        )

    # 404/405 as {code, message}; 413, 408 and a generic 500 that keeps the connection.
    install_error_handlers(app)
    limits = driver.config.limits
    app.add_middleware(
        GuardMiddleware,
        max_body_bytes=limits.max_body_bytes,
        idle_timeout=limits.idle_timeout,
        streamed_uploads=re.compile(UPLOAD_PATH),
    )

    # One registry per app: several daemons in one process keep their own figures.
    metrics = Metrics()
    app.state.metrics = metrics
    metrics.domains = driver.domains
    driver.on_job_wait = metrics.job_waited
    migration.observe.metrics = metrics

    app.include_router(domain_routes(driver))
    app.include_router(migration_routes(migration))
    app.include_router(storage_routes(StorageService(driver)))
    add_metrics_route(app, metrics)
    app.include_router(verb_routes(DomainVerbs(driver)))
    app.include_router(evacuation_routes(evacuations or Evacuations(migration)))
    install_access(app, access or AccessPolicy())
    time_requests(app, metrics)
    return app


def domain_routes(driver: Driver) -> APIRouter:
    r = APIRouter(prefix="/v1", responses=ERROR_RESPONSES)

    @r.get("/host")
    async def host() -> HostInfo:
        return driver.host_info()

    @r.get("/cluster")
    async def cluster() -> ClusterInfo:
        return await driver.cluster_info()

    @r.get("/domains")
    async def list_domains(all: bool = False) -> list[DomainInfo]:
        return [driver.info(d) for d in driver.domains() if all or d.active]

    @r.post("/domains")
    async def define(body: XmlBody) -> DomainInfo:
        return driver.info(await driver.define(body.xml))

    @r.post("/domains/create")
    async def create(body: XmlBody) -> DomainInfo:
        return driver.info(await driver.create(body.xml))

    @r.get("/domains/{name}")
    async def dominfo(name: str) -> DomainInfo:
        return driver.info(driver.lookup(name))

    @r.delete("/domains/{name}")
    async def undefine(name: str) -> DomainInfo:
        return driver.info(await driver.undefine(driver.lookup(name)))

    @r.post("/domains/{name}/start")
    async def start(name: str) -> DomainInfo:
        return driver.info(await driver.start(driver.lookup(name)))

    @r.post("/domains/{name}/shutdown")
    async def shutdown(name: str, body: ShutdownRequest | None = None) -> DomainInfo:
        timeout = (body or ShutdownRequest()).timeout
        return driver.info(await driver.shutdown(driver.lookup(name), timeout))

    @r.post("/domains/{name}/destroy")
    async def destroy(name: str) -> DomainInfo:
        return driver.info(await driver.destroy(driver.lookup(name)))

    @r.post("/domains/{name}/suspend")
    async def suspend(name: str) -> DomainInfo:
        return driver.info(await driver.suspend(driver.lookup(name)))

    @r.post("/domains/{name}/resume")
    async def resume(name: str) -> DomainInfo:
        return driver.info(await driver.resume(driver.lookup(name)))

    @r.get("/domains/{name}/state")
    async def domstate(name: str) -> DomainStateInfo:
        dom = driver.lookup(name)
        return DomainStateInfo(state=str(dom.state), reason=dom.reason)

    @r.get("/domains/{name}/xml")
    async def dumpxml(name: str, migratable: bool = False, inactive: bool = False) -> XmlBody:
        dom = driver.lookup(name)
        return XmlBody(xml=driver.dumpxml(dom, migratable=migratable, inactive=inactive))

    @r.get("/domains/{name}/console")
    async def console(name: str, offset: int = 0) -> ConsoleOutput:
        return driver.console(driver.lookup(name), offset)

    @r.get("/events")
    async def events(request: Request) -> StreamingResponse:
        async def stream() -> AsyncIterator[bytes]:
            async with driver.events.subscribe() as queue:
                yield b"\n"  # lets the client know the subscription is in place
                while True:
                    event = await queue.get()
                    yield event.model_dump_json().encode() + b"\n"

        return StreamingResponse(stream(), media_type="application/x-ndjson")

    return r
