"""QEMU spawn to QMP ready, as the daemon logs it ("ready in X s"), over N create/destroy rounds.

    PYTHONPATH=src python bench/spawn_bench.py [-n 20] [--tree DIR] [--config-extra TOML]

``--tree`` runs the daemon of another checkout (e.g. the main branch, for a before/after);
``--config-extra`` is appended to the daemon's config (``{guest}`` is the guest directory).
"""

from __future__ import annotations

import argparse
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from vmferry.client import Client
from vmferry.testguest import guest_paths, guest_xml


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("-n", type=int, default=20)
    p.add_argument("--tree", type=Path, default=Path(__file__).resolve().parents[1])
    p.add_argument("--config-extra", default='[paths]\nroots = ["{guest}"]\n')
    args = p.parse_args()
    root = Path(tempfile.mkdtemp(prefix="vfspawn", dir="/tmp"))
    cfg = root / "vmferryd.toml"
    cfg.write_text(args.config_extra.replace("{guest}", str(guest_paths()[0].parent)))
    sock, log = root / "d.sock", root / "vmferryd.log"
    env = {**os.environ, "PYTHONPATH": str(args.tree / "src")}
    argv = [sys.executable, "-m", "vmferry.daemon.main", "--state-dir", str(root / "state")]
    argv += ["--listen", f"unix://{sock}", "--config", str(cfg)]
    with log.open("wb") as out:
        daemon = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT, env=env)
    try:
        deadline = time.monotonic() + 20
        while not sock.exists() and time.monotonic() < deadline:
            time.sleep(0.05)
        time.sleep(0.3)
        with Client(f"unix://{sock}") as c:
            for _ in range(args.n):
                c.create(guest_xml("spawn"))
                c.destroy("spawn")
    finally:
        daemon.terminate()
        daemon.wait()
    ms = [1000 * float(x) for x in re.findall(r"ready in ([0-9.]+) s", log.read_text())]
    print(
        f"{args.tree}: n={len(ms)} median={statistics.median(ms):.1f} ms "
        f"min={min(ms):.1f} ms max={max(ms):.1f} ms"
    )


if __name__ == "__main__":
    main()
