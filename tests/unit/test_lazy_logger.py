"""vmferry.logs.get_logger: records reach logging as before, without importing it for nothing."""

from __future__ import annotations

import logging
import os
import subprocess
import sys
from pathlib import Path

import pytest

from vmferry.logs import get_logger

SRC = Path(__file__).resolve().parents[2] / "src"


def _fresh(code: str) -> subprocess.CompletedProcess[str]:
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(SRC), os.environ.get("PYTHONPATH", "")]),
    }
    return subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120
    )


def test_info_without_logging_loaded_imports_nothing() -> None:
    done = _fresh(
        "import sys\n"
        "from vmferry.logs import get_logger\n"
        "get_logger('vmferry.x').info('quiet %s', 1)\n"
        "get_logger('vmferry.x').debug('quiet')\n"
        "print('logging' in sys.modules)\n"
    )
    assert (done.returncode, done.stdout, done.stderr) == (0, "False\n", "")


def test_a_warning_always_goes_out() -> None:
    # Nothing configured: logging's last resort prints it on stderr, as a plain logger would.
    done = _fresh(
        "from vmferry.logs import get_logger\n"
        "get_logger('vmferry.x').warning('guest %s left paused', 'g1')\n"
    )
    assert (done.returncode, done.stderr) == (0, "guest g1 left paused\n")


def test_with_logging_configured_every_record_goes_through(
    caplog: pytest.LogCaptureFixture,
) -> None:
    log = get_logger("vmferry.test.lazy")
    with caplog.at_level(logging.DEBUG, logger="vmferry.test.lazy"):
        log.debug("d %d", 1)
        log.info("i %s", "x")
        log.error("e")
    got = [(r.levelname, r.getMessage(), r.funcName) for r in caplog.records]
    assert got == [
        ("DEBUG", "d 1", "test_with_logging_configured_every_record_goes_through"),
        ("INFO", "i x", "test_with_logging_configured_every_record_goes_through"),
        ("ERROR", "e", "test_with_logging_configured_every_record_goes_through"),
    ]


def test_levels_still_filter(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING, logger="vmferry.test.lazy2"):
        get_logger("vmferry.test.lazy2").info("dropped")
    assert caplog.records == []
