"""Monitor.execute_all / execute_each against a minimal QMP server on a unix socket."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from vmferry.errors import ErrorCode, VmferryError
from vmferry.qemu.monitor import Monitor

GREETING = {"QMP": {"version": {"qemu": {"micro": 0, "minor": 0, "major": 10}, "package": ""},
                    "capabilities": []}}  # fmt: skip


async def _messages(reader: asyncio.StreamReader) -> AsyncIterator[dict[str, Any]]:
    """The client's JSON objects as they come (QMP clients send no line breaks)."""
    decoder, buf = json.JSONDecoder(), ""
    while chunk := await reader.read(4096):
        buf += chunk.decode()
        while buf.strip():
            try:
                msg, end = decoder.raw_decode(buf.lstrip())
            except json.JSONDecodeError:
                break  # incomplete: wait for more
            buf = buf.lstrip()[end:]
            yield msg


async def _serve(path: Path, batch: int, got: list[str]) -> asyncio.Server:
    """Answers nothing after negotiation until *batch* commands arrived: a client waiting for
    each answer before sending the next would hang."""

    async def client(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(json.dumps(GREETING).encode() + b"\n")
        pending: list[dict[str, Any]] = []
        async for msg in _messages(reader):
            if msg["execute"] == "qmp_capabilities":  # sent without an id
                writer.write(json.dumps({"return": {}}).encode() + b"\n")
                continue
            got.append(msg["execute"])
            pending.append(msg)
            if len(pending) < batch:
                continue
            for m in pending:
                if m["execute"] == "bad":
                    out = {"error": {"class": "GenericError", "desc": "refused"}, "id": m["id"]}
                else:
                    out = {"return": {"ran": m["execute"]}, "id": m["id"]}
                writer.write(json.dumps(out).encode() + b"\n")
            pending = []
            await writer.drain()

    return await asyncio.start_unix_server(client, path=str(path))


def test_execute_all_sends_every_command_before_any_answer(tmp_path: Path) -> None:
    got: list[str] = []

    async def go() -> list[Any]:
        server = await _serve(tmp_path / "qmp.sock", 3, got)
        mon = await Monitor.connect(tmp_path / "qmp.sock", name="t", timeout=5)
        try:
            return await mon.execute_all([("a", None), ("b", {"x": 1}), ("c", None)], timeout=5)
        finally:
            await mon.close()
            server.close()

    assert asyncio.run(go()) == [{"ran": "a"}, {"ran": "b"}, {"ran": "c"}]
    assert got == ["a", "b", "c"]  # in order


def test_execute_all_raises_the_first_error_after_all_ran(tmp_path: Path) -> None:
    got: list[str] = []

    async def go() -> list[Any]:
        server = await _serve(tmp_path / "qmp.sock", 3, got)
        mon = await Monitor.connect(tmp_path / "qmp.sock", name="t", timeout=5)
        try:
            each = await mon.execute_each([("a", None), ("bad", None), ("c", None)], timeout=5)
            with pytest.raises(VmferryError, match="'bad' failed: refused") as err:
                await mon.execute_all([("a", None), ("bad", None), ("c", None)], timeout=5)
            assert err.value.code is ErrorCode.QEMU_FAILED
            return each
        finally:
            await mon.close()
            server.close()

    each = asyncio.run(go())
    assert each[0] == {"ran": "a"} and each[2] == {"ran": "c"}
    assert isinstance(each[1], VmferryError)
    assert got == ["a", "bad", "c"] * 2
