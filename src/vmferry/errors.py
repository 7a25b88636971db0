"""The one error type of vmferry, with stable codes like libvirt's VIR_ERR_*.

A :class:`VmferryError` raised in the daemon travels to the client as
``{"code": ..., "message": ...}`` and is raised again there unchanged, so the
CLI prints exactly what the daemon said.
"""

from __future__ import annotations

from enum import StrEnum
from typing import Any


class ErrorCode(StrEnum):
    INTERNAL_ERROR = "internal-error"
    NO_DOMAIN = "no-domain"
    DOMAIN_EXISTS = "domain-exists"
    OPERATION_INVALID = "operation-invalid"
    OPERATION_FAILED = "operation-failed"
    OPERATION_TIMEOUT = "operation-timeout"
    OPERATION_ABORTED = "operation-aborted"
    OPERATION_UNSUPPORTED = "operation-unsupported"
    INVALID_ARG = "invalid-arg"
    XML_ERROR = "xml-error"
    CONFIG_UNSUPPORTED = "config-unsupported"
    MIGRATE_UNSAFE = "migrate-unsafe"
    MIGRATE_FINISH_OK = "migrate-finish-ok"
    NO_SUPPORT = "no-support"
    AUTH_FAILED = "auth-failed"
    # the caller's role lacks the permission of the call (vmferry.daemon.access), or a path or
    # program lies outside what the host's configuration allows (vmferry.qemu.confine)
    ACCESS_DENIED = "access-denied"
    CONNECT_FAILED = "connect-failed"
    # the connection broke after the request was sent: it may or may not have been carried out
    RPC_FAILED = "rpc-failed"
    NO_FREE_PORT = "no-free-port"
    QEMU_FAILED = "qemu-failed"
    # [migration] tls = "required" and the migration would not be encrypted (migrate_tls_force)
    TLS_REQUIRED = "tls-required"
    # storage pools and volumes (vmferry.storage), libvirt's VIR_ERR_NO_STORAGE_POOL/VOL
    NO_STORAGE_POOL = "no-storage-pool"
    NO_STORAGE_VOL = "no-storage-vol"
    STORAGE_VOL_EXISTS = "storage-vol-exists"
    # the pool's file system has no room for what was asked (a volume, an upload)
    STORAGE_FULL = "storage-full"
    # another host of the cluster holds the domain's lease: it runs there (vmferry.daemon.lease)
    LEASE_HELD = "lease-held"
    # the host is in maintenance (vmferry maintenance HOST on): no incoming migration, no new domain
    HOST_MAINTENANCE = "host-maintenance"


# HTTP status the daemon answers with for each code; the body carries the code.
HTTP_STATUS: dict[ErrorCode, int] = {
    ErrorCode.NO_DOMAIN: 404,
    ErrorCode.DOMAIN_EXISTS: 409,
    ErrorCode.NO_STORAGE_POOL: 404,
    ErrorCode.NO_STORAGE_VOL: 404,
    ErrorCode.STORAGE_VOL_EXISTS: 409,
    ErrorCode.STORAGE_FULL: 409,
    ErrorCode.OPERATION_INVALID: 409,
    # a guest or a lock that did not give way in time: the request conflicts with the state
    ErrorCode.OPERATION_TIMEOUT: 409,
    ErrorCode.INVALID_ARG: 400,
    ErrorCode.XML_ERROR: 400,
    ErrorCode.CONFIG_UNSUPPORTED: 400,
    ErrorCode.AUTH_FAILED: 403,
    ErrorCode.ACCESS_DENIED: 403,
    ErrorCode.TLS_REQUIRED: 409,
    ErrorCode.LEASE_HELD: 409,
    ErrorCode.HOST_MAINTENANCE: 409,
}


class VmferryError(Exception):
    """An error with a stable :class:`ErrorCode` and a message a user can act on."""

    def __init__(self, code: ErrorCode | str, message: str) -> None:
        super().__init__(message)
        self.code = ErrorCode(code) if code in ErrorCode._value2member_map_ else code
        self.message = message

    def __str__(self) -> str:
        return f"error: {self.message} [{self.code}]"

    @property
    def http_status(self) -> int:
        return (
            HTTP_STATUS.get(ErrorCode(self.code), 500) if isinstance(self.code, ErrorCode) else 500
        )

    def to_dict(self) -> dict[str, str]:
        return {"code": str(self.code), "message": self.message}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> VmferryError:
        return cls(str(data.get("code", ErrorCode.INTERNAL_ERROR)), str(data.get("message", "")))
