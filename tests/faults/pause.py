"""vmferryd with one more failpoint action for the fault matrix: ``pause``.

``name=pause`` blocks the task that reaches failpoint *name* until the file
``$VMFERRY_FAILPOINTS_DIR/<name>.release`` exists, after creating
``<name>.hit`` there; then the daemon carries on as if nothing happened. So
the matrix can stop the protocol at a boundary, apply a fault elsewhere (kill
the other daemon, a QEMU, the client, cut the link) and let it go on.

TEST SHIM: ``vmferry.failpoints`` has no such action yet (exit, hang, error);
this wraps it before the daemon imports the points. Once the action exists
there, start ``vmferry.daemon.main`` directly and drop this module.

Run as ``python -m tests.faults.pause <vmferryd arguments>``.
"""

from __future__ import annotations

import asyncio
import os
import sys
from pathlib import Path

from vmferry import failpoints

DIR_ENV = "VMFERRY_FAILPOINTS_DIR"
POLL_S = 0.05


def install() -> None:
    """Teach :mod:`vmferry.failpoints` ``pause`` (before any module imports ``failpoint``)."""
    if "pause" in failpoints.ACTIONS:
        return  # the real thing landed
    original = failpoints.failpoint
    failpoints.ACTIONS = failpoints.ACTIONS | {"pause"}

    async def failpoint(name: str) -> None:
        if failpoints._enabled.get(name) != "pause":
            await original(name)
            return
        where = Path(os.environ[DIR_ENV])
        failpoints.log.warning("failpoint %s hit: pause", name)
        (where / f"{name}.hit").touch()
        release = where / f"{name}.release"
        # another process makes the file: nothing to wait on but the file system
        while not release.exists():  # noqa: ASYNC110
            await asyncio.sleep(POLL_S)
        failpoints.log.warning("failpoint %s released", name)

    failpoints.failpoint = failpoint


def main() -> int:
    install()
    from vmferry.daemon import main as daemon_main

    return daemon_main.main(sys.argv[1:])


if __name__ == "__main__":
    sys.exit(main())
