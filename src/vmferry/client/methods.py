"""The request methods of both clients, written once.

Each method of :class:`ClientMethods` builds its request (with
:mod:`vmferry.client.calls` and its siblings) and hands it to ``_send`` with
the caller's ``request_timeout``.  The blocking
:class:`~vmferry.client.sync.Client` inherits them and sends at once;
:class:`~vmferry.client.aio.AsyncClient` makes each one a coroutine that
awaits the same request (:func:`request_of`).  So a method's name, arguments,
route, answer and docstring are here only; the clients add the transport.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any, Concatenate, NamedTuple, ParamSpec, TypeVar, cast

from vmferry.client import calls
from vmferry.client import evac_calls as ec
from vmferry.client import migration_calls as mc
from vmferry.client import storage_calls as sc
from vmferry.client import verb_calls as vc
from vmferry.client.calls import Call

if TYPE_CHECKING:
    from vmferry.api.models import (
        ClusterInfo,
        ConsoleOutput,
        DomainInfo,
        DomainStateInfo,
        EvacuateRequest,
        EvacuationInfo,
        HostInfo,
        JobStats,
        MaintenanceInfo,
    )
    from vmferry.api.storage import DiskSource, PoolInfo, VolumeInfo
    from vmferry.api.verbs import InterfaceInfo, VncDisplay

T = TypeVar("T")
U = TypeVar("U")
P = ParamSpec("P")


def _then(call: Call[T], then: Callable[[T], U]) -> Call[U]:
    """*call* whose parsed answer is passed through *then*."""
    parse = call.parse
    untyped: Call[Any] = call  # _replace keeps the tuple's type, and the answer's changes
    return untyped._replace(parse=lambda data: then(parse(data)))


def _no_answer(call: Call[Any]) -> Call[None]:
    """*call* whose answer is checked (parsed), then dropped: the method returns None."""
    return _then(call, lambda _reply: None)


class ClientMethods:
    """The API's request methods, shared by :class:`~vmferry.client.sync.Client` and
    :class:`~vmferry.client.aio.AsyncClient` (the methods of the latter are awaited)."""

    def _send(self, call: Call[T], request_timeout: float | None) -> T:
        """Send *call*, give its parsed answer: the client's transport."""
        raise NotImplementedError

    def metrics(self, *, request_timeout: float | None = None) -> str:
        """The daemon's Prometheus metrics, in the text exposition format."""
        return self._send(calls.metrics(), request_timeout)

    def host(self, *, request_timeout: float | None = None) -> HostInfo:
        """The daemon's host: name, UUID, versions, features."""
        return self._send(calls.host(), request_timeout)

    def maintenance(self, *, request_timeout: float | None = None) -> MaintenanceInfo:
        """Whether the host is in maintenance (no incoming migration, no new domain)."""
        return self._send(ec.maintenance(), request_timeout)

    def set_maintenance(
        self, on: bool, reason: str = "", *, request_timeout: float | None = None
    ) -> MaintenanceInfo:
        """Turn maintenance on or off (persisted by the daemon)."""
        return self._send(ec.set_maintenance(on, reason), request_timeout)

    def evacuate(
        self, request: EvacuateRequest, *, request_timeout: float | None = None
    ) -> EvacuationInfo:
        """Plan (``dry_run``) or start draining the host; the drain runs in the daemon."""
        return self._send(ec.evacuate(request), request_timeout)

    def evacuation(self, *, request_timeout: float | None = None) -> EvacuationInfo:
        """The host's evacuation: plan, per-guest progress and results, ETA."""
        return self._send(ec.evacuation(), request_timeout)

    def cluster(self, *, request_timeout: float | None = None) -> ClusterInfo:
        """The cluster's hosts (name, URI, state, free memory) and where each VM runs."""
        return self._send(calls.cluster(), request_timeout)

    def list_domains(
        self, all: bool = False, *, request_timeout: float | None = None
    ) -> list[DomainInfo]:
        """Running domains, or with *all* also the defined, inactive ones."""
        return self._send(calls.list_domains(all), request_timeout)

    def define(self, xml: str, *, request_timeout: float | None = None) -> DomainInfo:
        """Define (or redefine) a persistent domain from its XML."""
        return self._send(calls.define(xml), request_timeout)

    def create(self, xml: str, *, request_timeout: float | None = None) -> DomainInfo:
        """Create and start a transient domain from its XML."""
        return self._send(calls.create(xml), request_timeout)

    def undefine(self, name: str, *, request_timeout: float | None = None) -> DomainInfo:
        """Remove a domain's definition (a running domain becomes transient)."""
        return self._send(calls.undefine(name), request_timeout)

    def start(self, name: str, *, request_timeout: float | None = None) -> DomainInfo:
        """Start a defined, inactive domain."""
        return self._send(calls.start(name), request_timeout)

    def shutdown(
        self, name: str, timeout: float = 60.0, *, request_timeout: float | None = None
    ) -> DomainInfo:
        """Ask the guest to power off and wait up to *timeout* seconds for it."""
        return self._send(calls.shutdown(name, timeout), request_timeout)

    def destroy(self, name: str, *, request_timeout: float | None = None) -> DomainInfo:
        """Stop a domain at once (kill its QEMU)."""
        return self._send(calls.destroy(name), request_timeout)

    def suspend(self, name: str, *, request_timeout: float | None = None) -> DomainInfo:
        """Pause a running domain's vCPUs."""
        return self._send(calls.suspend(name), request_timeout)

    def resume(self, name: str, *, request_timeout: float | None = None) -> DomainInfo:
        """Let a paused domain run again."""
        return self._send(calls.resume(name), request_timeout)

    def dominfo(self, name: str, *, request_timeout: float | None = None) -> DomainInfo:
        """One domain (by name or UUID)."""
        return self._send(calls.dominfo(name), request_timeout)

    def domstate(self, name: str, *, request_timeout: float | None = None) -> DomainStateInfo:
        """A domain's state and its reason."""
        return self._send(calls.domstate(name), request_timeout)

    def dumpxml(
        self,
        name: str,
        *,
        migratable: bool = False,
        inactive: bool = False,
        request_timeout: float | None = None,
    ) -> str:
        """A domain's XML: live, *inactive* (the definition) or *migratable*."""
        call = calls.dumpxml(name, migratable=migratable, inactive=inactive)
        return self._send(call, request_timeout)

    def console(
        self, name: str, offset: int = 0, *, request_timeout: float | None = None
    ) -> ConsoleOutput:
        """Serial console output captured since the domain started, from *offset* on."""
        return self._send(calls.console(name, offset), request_timeout)

    # The verbs beyond the life cycle: the requests are in vmferry.client.verb_calls.

    def reboot(self, name: str, *, request_timeout: float | None = None) -> DomainInfo:
        """Ask the guest to reboot (ACPI); returns once asked, the guest may ignore it."""
        return self._send(vc.reboot(name), request_timeout)

    def reset(self, name: str, *, request_timeout: float | None = None) -> DomainInfo:
        """Reset the machine at once, like its reset button."""
        return self._send(vc.reset(name), request_timeout)

    def set_autostart(
        self, name: str, enabled: bool = True, *, request_timeout: float | None = None
    ) -> DomainInfo:
        """Start the persistent domain when the daemon starts (once per host boot), or not."""
        return self._send(vc.autostart(name, enabled), request_timeout)

    def set_memory(
        self,
        name: str,
        size_kib: int,
        *,
        live: bool = False,
        config: bool = False,
        request_timeout: float | None = None,
    ) -> DomainInfo:
        """``setmem``: the balloon target (live) and/or ``<currentMemory>`` (config), KiB."""
        call = vc.set_memory(name, size_kib, live=live, config=config)
        return self._send(call, request_timeout)

    def set_max_memory(
        self,
        name: str,
        size_kib: int,
        *,
        live: bool = False,
        config: bool = False,
        request_timeout: float | None = None,
    ) -> DomainInfo:
        """``setmaxmem``: ``<memory>`` in KiB; only of the persistent definition."""
        call = vc.set_max_memory(name, size_kib, live=live, config=config)
        return self._send(call, request_timeout)

    def interfaces(self, name: str, *, request_timeout: float | None = None) -> list[InterfaceInfo]:
        """``domiflist``: the domain's network interfaces."""
        return self._send(vc.interfaces(name), request_timeout)

    def vncdisplay(self, name: str, *, request_timeout: float | None = None) -> VncDisplay:
        """Where the running domain's VNC server listens."""
        return self._send(vc.vncdisplay(name), request_timeout)

    def domstats(
        self,
        names: Sequence[str] = (),
        groups: Sequence[str] = (),
        *,
        request_timeout: float | None = None,
    ) -> dict[str, dict[str, Any]]:
        """Statistics by domain name (all domains if *names* is empty; all groups if empty)."""
        return self._send(vc.domstats(names, groups), request_timeout)

    # Migration jobs: the requests are in vmferry.client.migration_calls.

    def jobinfo(
        self, name: str, completed: bool = False, *, request_timeout: float | None = None
    ) -> JobStats:
        """The domain's running migration job, or with *completed* the last finished one."""
        return self._send(mc.jobinfo(name, completed), request_timeout)

    def jobabort(
        self, name: str, *, postcopy: bool = False, request_timeout: float | None = None
    ) -> None:
        """Cancel the domain's running migration (the guest stays on the source).

        In post-copy a migration cannot be cancelled; with *postcopy* it is
        paused instead, to be resumed with ``--postcopy-resume``.
        """
        return self._send(_no_answer(mc.jobabort(name, postcopy)), request_timeout)

    def start_postcopy(self, name: str, *, request_timeout: float | None = None) -> None:
        """Switch the domain's running outgoing migration to post-copy now."""
        return self._send(_no_answer(mc.start_postcopy(name)), request_timeout)

    def get_maxdowntime(self, name: str, *, request_timeout: float | None = None) -> int:
        """The longest pause (ms) QEMU may take to complete a live migration."""
        call: Call[int] = _then(mc.get_maxdowntime(name), lambda reply: reply.downtime_ms)
        return self._send(call, request_timeout)

    def set_maxdowntime(
        self, name: str, downtime_ms: int, *, request_timeout: float | None = None
    ) -> None:
        """Set the longest pause (ms) QEMU may take to complete a live migration."""
        call = _no_answer(mc.set_maxdowntime(name, downtime_ms))
        return self._send(call, request_timeout)

    def get_speed(self, name: str, *, request_timeout: float | None = None) -> int:
        """The migration bandwidth limit in MiB/s (0: unlimited)."""
        call: Call[int] = _then(mc.get_speed(name), lambda reply: reply.bandwidth_mib_s)
        return self._send(call, request_timeout)

    def set_speed(
        self, name: str, bandwidth_mib_s: int, *, request_timeout: float | None = None
    ) -> None:
        """Limit the migration bandwidth to *bandwidth_mib_s* MiB/s (0: unlimited)."""
        return self._send(_no_answer(mc.set_speed(name, bandwidth_mib_s)), request_timeout)

    def pool_list(self, *, request_timeout: float | None = None) -> list[PoolInfo]:
        """The host's storage pools."""
        return self._send(sc.pool_list(), request_timeout)

    def vol_list(self, pool: str, *, request_timeout: float | None = None) -> list[VolumeInfo]:
        """The volumes of *pool*."""
        return self._send(sc.vol_list(pool), request_timeout)

    def vol_info(self, pool: str, name: str, *, request_timeout: float | None = None) -> VolumeInfo:
        """Format, capacity, allocation and backing chain of a volume."""
        return self._send(sc.vol_info(pool, name), request_timeout)

    def vol_create(
        self,
        pool: str,
        name: str,
        capacity: int,
        fmt: str = "raw",
        backing_vol: str | None = None,
        backing_format: str | None = None,
        *,
        request_timeout: float | None = None,
    ) -> VolumeInfo:
        """Create a volume of *capacity* bytes (qcow2 may have a backing volume)."""
        call = sc.vol_create(pool, name, capacity, fmt, backing_vol, backing_format)
        return self._send(call, request_timeout)

    def vol_delete(self, pool: str, name: str, *, request_timeout: float | None = None) -> None:
        """Delete a volume no defined domain uses."""
        return self._send(_no_answer(sc.vol_delete(pool, name)), request_timeout)

    def domblklist(self, name: str, *, request_timeout: float | None = None) -> list[DiskSource]:
        """The domain's disks and their sources on this host."""
        return self._send(sc.domblklist(name), request_timeout)


class _Request(NamedTuple):
    call: Call[Any]
    timeout: float | None


class _Recorder(ClientMethods):
    """Sends nothing: ``_send`` gives back the request it is handed."""

    def _send(self, call: Call[T], request_timeout: float | None) -> T:
        return cast("T", _Request(call, request_timeout))


_RECORDER = _Recorder()


def request_of(
    method: Callable[Concatenate[ClientMethods, P], T], *args: P.args, **kwargs: P.kwargs
) -> tuple[Call[T], float | None]:
    """The request that *method* (of :class:`ClientMethods`) would send, and its timeout."""
    request = method(_RECORDER, *args, **kwargs)
    if not isinstance(request, _Request):  # a method must return what _send gives, untouched
        raise TypeError(f"{method.__qualname__} does not return its _send()")
    return request.call, request.timeout
