"""A command's table entry (:class:`Command`) and what it works with (:class:`Context`)."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from vmferry.client import Client
from vmferry.errors import ErrorCode, VmferryError

URI_ENV = "VMFERRY_URI"


@dataclass(frozen=True)
class Arg:
    """One ``add_argument`` call, kept as data so commands fit in a table."""

    flags: tuple[str, ...]
    options: dict[str, Any]


def arg(*flags: str, **options: Any) -> Arg:
    return Arg(flags, options)


@dataclass(frozen=True)
class Command:
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


@dataclass
class Context:
    """The global options, and the clients a command opened (closed when it ends)."""

    uri: str | None
    pki_dir: Path | None = None
    _clients: list[Client] = field(default_factory=list, init=False)
    _client: Client | None = field(default=None, init=False)

    @property
    def client(self) -> Client:
        """The client of ``-c URI``, connected on first use."""
        if self._client is None:
            if not self.uri:
                raise VmferryError(
                    ErrorCode.INVALID_ARG, f"no vmferryd URI: use -c URI or set ${URI_ENV}"
                )
            self._client = self.connect(self.uri)
        return self._client

    def connect(self, uri: str) -> Client:
        """A client for another daemon (e.g. a migration's destination)."""
        client = Client(uri, pki_dir=self.pki_dir)
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
