"""The migration client of a fault-matrix case, run as its own process so it can be killed.

``python -m tests.faults.client MODE SRC_URI DST_URI NAME`` migrates *NAME*
live from the daemon at *SRC_URI* to the one at *DST_URI*: MODE ``v3`` and
``v2`` run the protocol here (client-managed), ``p2p`` asks the source to run
it (*DST_URI* is then the destination as the source daemon reaches it).
``v3-postcopy`` is ``v3`` with ``--postcopy``, a bandwidth cap the fast-dirtying
guest of that mode outruns, the switch forced once the first pass is over, and
a post-copy bandwidth cap that keeps the post-copy phase a few seconds long.
``v3-storage`` is ``v3`` with ``--copy-storage-all``.
Prints one JSON line ``{"ok": bool, "error": str, "wall_s": float}``; exits 0
on success.
"""

from __future__ import annotations

import asyncio
import json
import sys

from vmferry.client import AsyncClient
from vmferry.client.migrate import migrate, migrate_p2p
from vmferry.errors import VmferryError
from vmferry.migration.flags import MigrateFlags
from vmferry.migration.params import MigrationParams

MODES = ("v3", "p2p", "v2", "v3-postcopy", "v3-storage")
#: Pre-copy cap (MiB/s): the v3-postcopy guest re-dirties its buffer faster than this.
PRECOPY_MIB_S = 32
#: Post-copy cap (MiB/s): a post-copy phase of a few seconds, long enough to break it.
POSTCOPY_MIB_S = 16


async def run(mode: str, src_uri: str, dst_uri: str, name: str) -> float:
    """Migrate once; return the wall time."""
    async with AsyncClient(src_uri) as src:
        if mode == "p2p":
            return (await migrate_p2p(src, dst_uri, name, MigrateFlags.LIVE)).wall_s
        async with AsyncClient(dst_uri) as dst:
            if mode == "v3-postcopy":
                params = MigrationParams(
                    bandwidth_mib_s=PRECOPY_MIB_S,
                    postcopy_after_precopy=True,
                    postcopy_bandwidth_mib_s=POSTCOPY_MIB_S,
                )
                flags = MigrateFlags.LIVE | MigrateFlags.POSTCOPY
                return (await migrate(src, dst, name, flags, params, version=3)).wall_s
            if mode == "v3-storage":
                flags = MigrateFlags.LIVE | MigrateFlags.NON_SHARED_DISK
                return (await migrate(src, dst, name, flags, version=3)).wall_s
            version = 3 if mode == "v3" else 2
            return (await migrate(src, dst, name, MigrateFlags.LIVE, version=version)).wall_s


def main(argv: list[str]) -> int:
    mode, src_uri, dst_uri, name = argv
    if mode not in MODES:
        print(f"mode must be one of {', '.join(MODES)}", file=sys.stderr)
        return 2
    try:
        wall = asyncio.run(run(mode, src_uri, dst_uri, name))
    except VmferryError as err:
        print(json.dumps({"ok": False, "error": str(err), "wall_s": 0.0}), flush=True)
        return 1
    print(json.dumps({"ok": True, "error": "", "wall_s": wall}), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
