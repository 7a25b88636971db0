"""A command's table entry (:class:`Command`) and what it works with (:class:`Context`).

Plain classes, not dataclasses: ``dataclasses`` imports ``inspect``, which
alone is a tenth of a fast command's budget (docs/cli.md).
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, NamedTuple

from vmferry.errors import ErrorCode, VmferryError

if TYPE_CHECKING:
    from vmferry.client.sync import Client as SyncClient

URI_ENV = "VMFERRY_URI"
PKI_DIR_ENV = "VMFERRY_PKI_DIR"  # as vmferry.client.PKI_DIR_ENV (not imported for --help)


class Arg(NamedTuple):
    """One ``add_argument`` call, kept as data so commands fit in a table."""

    flags: tuple[str, ...]
    options: dict[str, Any]


def arg(*flags: str, **options: Any) -> Arg:
    return Arg(flags, options)


class Command(NamedTuple):
    """
    One ``vmferry`` command.

    :param name: The command line name; ``"pki init"`` makes a subcommand of ``pki``.
    :param run: Does the work; returns the exit status (``None`` means 0) and
        raises :class:`VmferryError` for errors.
    :param json: Adds ``--json`` (the command then prints exactly one JSON document).
    :param connect: Whether it talks to vmferryd (needs ``-c URI`` / ``$VMFERRY_URI``).
    """

    name: str
    help: str
    run: Callable[[Context, argparse.Namespace], int | None]
    args: tuple[Arg, ...] = ()
    json: bool = False
    connect: bool = True


#: The client class (tests put a fake here); None: vmferry.client.sync.Client, imported when used.
Client: type[SyncClient] | None = None


class Context:
    """The global options, and the clients a command opened (closed when it ends)."""

    def __init__(self, uri: str | None, pki_dir: str | None = None) -> None:
        self.uri = uri
        self.pki_dir = pki_dir
        self._clients: list[SyncClient] = []
        self._client: SyncClient | None = None

    @property
    def client(self) -> SyncClient:
        """The client of ``-c URI``, connected on first use."""
        if self._client is None:
            if not self.uri:
                raise VmferryError(
                    ErrorCode.INVALID_ARG, f"no vmferryd URI: use -c URI or set ${URI_ENV}"
                )
            self._client = self.connect(self.uri)
        return self._client

    def connect(self, uri: str) -> SyncClient:
        """A client for another daemon (e.g. a migration's destination)."""
        if Client is not None:
            client = Client(uri, pki_dir=self.pki_dir)
        else:
            from vmferry.client.sync import Client as Default

            client = Default(uri, pki_dir=self.pki_dir)
        self._clients.append(client)
        return client

    def close(self) -> None:
        for client in self._clients:
            client.close()
        self._clients.clear()
        self._client = None

    def out(self, text: str = "", *, end: str = "\n") -> None:
        """Print *text* on stdout at once (output is often piped while following)."""
        sys.stdout.write(text + end)
        sys.stdout.flush()
