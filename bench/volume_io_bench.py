"""vol-upload / vol-download through a vmferryd against a plain copy, and a chain's resolve time.

    .venv/bin/python bench/volume_io_bench.py [--mib N] [--rounds R]

One daemon (vmferry.testing) on a unix socket; a raw volume of N MiB in its
default pool. Each round uploads N MiB of random data with the Python client
(1 MiB chunks, streamed), downloads it back (checked byte for byte), and
copies the same file with shutil.copyfile as the floor. Then Pools.resolve of a
3-image qcow2 chain (qemu-img info per layer: the time a volume disk adds to a
QEMU start). Medians, MiB/s.
"""

from __future__ import annotations

import argparse
import io
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

from vmferry.domain import parse_domain_xml
from vmferry.storage import Pool, Pools
from vmferry.testing import hosts

MiB = 1 << 20


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--mib", type=int, default=256)
    p.add_argument("--rounds", type=int, default=3)
    args = p.parse_args()
    data = os.urandom(args.mib * MiB)
    up, down, floor = [], [], []
    work = Path(tempfile.mkdtemp(prefix="vfvb", dir="/tmp"))
    try:
        src = work / "src.bin"
        src.write_bytes(data)
        with hosts(1) as (h,), h.client() as c:
            c.vol_create("default", "v", args.mib * MiB, "raw")
            for _ in range(args.rounds):
                t = time.perf_counter()
                with src.open("rb") as f:
                    c.vol_upload("default", "v", f)
                up.append(time.perf_counter() - t)
                out = io.BytesIO()
                t = time.perf_counter()
                c.vol_download("default", "v", out)
                down.append(time.perf_counter() - t)
                if out.getvalue() != data:
                    print("download differs from the upload", file=sys.stderr)
                    return 1
                t = time.perf_counter()
                shutil.copyfile(src, work / "copy.bin")
                os.sync()
                floor.append(time.perf_counter() - t)
        pool = Pool("P", work / "pool")
        pool.ensure()
        pool.create_volume("b", MiB, "raw")
        pool.create_volume("m", MiB, "qcow2", backing=("b", "raw"))
        pool.create_volume("t", MiB, "qcow2", backing=("m", "qcow2"))
        d = parse_domain_xml(
            "<domain type='qemu'><name>g</name><memory>65536</memory><os><type>hvm</type></os>"
            "<devices><disk type='volume'><driver name='qemu' type='qcow2'/>"
            "<source pool='P' volume='t'/><target dev='vda'/></disk></devices></domain>"
        )
        pools = Pools([pool])
        resolve = []
        for _ in range(10):
            t = time.perf_counter()
            pools.resolve(d)
            resolve.append(time.perf_counter() - t)
    finally:
        shutil.rmtree(work, ignore_errors=True)

    def rate(times: list[float]) -> str:
        med = statistics.median(times)
        return f"{args.mib / med:7.1f} MiB/s (median {med:.2f} s of {len(times)})"

    print(f"vol-upload   {rate(up)}")
    print(f"vol-download {rate(down)}")
    print(f"plain copy   {rate(floor)}  (shutil.copyfile + sync: the floor)")
    print(f"resolve of a 3-image chain: median {statistics.median(resolve) * 1000:.0f} ms")
    return 0


if __name__ == "__main__":
    sys.exit(main())
