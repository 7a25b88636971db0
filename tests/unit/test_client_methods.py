"""The request methods written once (vmferry.client.methods) and the two clients made of them.

Both clients must send, for every method, the request ClientMethods builds, with the
caller's ``request_timeout``; the asyncio client's methods must stay coroutines with
the same signature and docstring as the blocking client's.
"""

from __future__ import annotations

import inspect
from typing import Any

import pytest
from pydantic import ValidationError

from vmferry.api.models import EvacuateRequest
from vmferry.client.aio import AsyncClient, awaited
from vmferry.client.calls import Call
from vmferry.client.methods import ClientMethods, request_of
from vmferry.client.sync import Client

URI = "unix:///nonexistent/vmferry-test.sock"  # nothing is sent: run() is replaced below

# An argument for each parameter name of the request methods.
SAMPLES: dict[str, Any] = {
    "name": "vm 1",
    "pool": "default",
    "xml": "<domain/>",
    "all": True,
    "on": True,
    "reason": "why",
    "request": EvacuateRequest(dry_run=True),
    "timeout": 5.0,
    "offset": 3,
    "enabled": False,
    "size_kib": 65536,
    "live": True,
    "config": True,
    "names": ("vm1",),
    "groups": ("state",),
    "completed": True,
    "postcopy": True,
    "downtime_ms": 300,
    "bandwidth_mib_s": 64,
    "capacity": 1 << 20,
    "fmt": "qcow2",
    "backing_vol": "base.raw",
    "backing_format": "raw",
    "migratable": True,
    "inactive": True,
}

METHODS = sorted(
    name
    for name, member in vars(ClientMethods).items()
    if not name.startswith("_") and callable(member)
)


def arguments(name: str) -> dict[str, Any]:
    params = list(inspect.signature(getattr(ClientMethods, name)).parameters)[1:]
    return {p: SAMPLES[p] for p in params if p != "request_timeout"}


def shape(call: Call[Any]) -> tuple[Any, ...]:
    return (call.method, call.path, call.params, call.json_body(), call.headers, call.min_timeout)


class SyncRecorder(Client):
    def run(self, call: Call[Any], *, request_timeout: float | None = None) -> Any:
        return call, request_timeout


class AsyncRecorder(AsyncClient):
    async def run(self, call: Call[Any], *, request_timeout: float | None = None) -> Any:
        return call, request_timeout


def test_there_are_request_methods() -> None:
    assert len(METHODS) >= 40 and "host" in METHODS and "domblklist" in METHODS


@pytest.mark.parametrize("name", METHODS)
async def test_both_clients_send_the_method_s_request(name: str) -> None:
    kwargs = arguments(name)
    call, timeout = request_of(getattr(ClientMethods, name), **kwargs, request_timeout=7.5)
    assert timeout == 7.5
    assert call.path.startswith(("/v1/", "/metrics"))
    sent = getattr(SyncRecorder(URI), name)(**kwargs, request_timeout=7.5)
    assert (shape(sent[0]), sent[1]) == (shape(call), 7.5)
    async with AsyncRecorder(URI) as client:
        sent = await getattr(client, name)(**kwargs, request_timeout=7.5)
        assert (shape(sent[0]), sent[1]) == (shape(call), 7.5)
        sent = await getattr(client, name)(**kwargs)
        assert sent[1] is None


@pytest.mark.parametrize("name", METHODS)
def test_async_methods_are_coroutines_of_the_same_signature(name: str) -> None:
    method, sync = getattr(AsyncClient, name), getattr(Client, name)
    assert inspect.iscoroutinefunction(method) and not inspect.iscoroutinefunction(sync)
    assert inspect.signature(method) == inspect.signature(sync)
    assert inspect.getdoc(method) == inspect.getdoc(sync) and inspect.getdoc(method)
    assert method.__qualname__ == f"AsyncClient.{name}"


def test_answers_are_shaped_by_the_method() -> None:
    get_speed, _ = request_of(ClientMethods.get_speed, "vm1")
    assert get_speed.parse({"bandwidth_mib_s": 64}) == 64
    maxdowntime, _ = request_of(ClientMethods.get_maxdowntime, "vm1")
    assert maxdowntime.parse({"downtime_ms": 300}) == 300
    # an answer the method drops is still checked
    abort, _ = request_of(ClientMethods.jobabort, "vm1")
    assert abort.parse({"cookie": ""}) is None
    with pytest.raises(ValidationError):
        abort.parse({"cookie": 5})
    with pytest.raises(ValidationError):
        get_speed.parse({"bandwidth_mib_s": "fast"})


def count(self: ClientMethods, *, request_timeout: float | None = None) -> int:
    """A method that changes its answer: it would send one thing blocking, another awaited."""
    return len(self._send(Call("GET", "/v1/domains", list), request_timeout))


async def test_a_method_that_changes_its_answer_is_refused() -> None:
    with pytest.raises(TypeError, match="does not return its _send"):
        request_of(count)
    async with AsyncRecorder(URI) as client:
        with pytest.raises(TypeError, match="does not return its _send"):
            await awaited(count)(client)
