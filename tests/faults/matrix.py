"""``python -m tests.faults.matrix``: run the fault matrix and print it as a table.

Usage::

    python -m tests.faults.matrix                 # every case; writes docs/faults.md,
                                                  # docs/faults-postcopy.md, faults-storage.md
    python -m tests.faults.matrix --subset ci     # the CI subset only; prints the table
    python -m tests.faults.matrix -k v2/ -k p2p/src-perform3   # cases whose id contains ...
    python -m tests.faults.matrix -k v3-postcopy --output docs/faults-postcopy.md
    python -m tests.faults.matrix -k v3-storage --output docs/faults-storage.md

Needs root (network namespaces), QEMU and the built test guest (``make guest``).
Logs of failed cases are kept under ``build/faults/<case>/``. Exit status 1
when any case failed.
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Callable, Sequence
from datetime import UTC, datetime
from pathlib import Path

from tests.faults.cases import CI_SUBSET, LEASE_SUBSET, Case, Mode, check_subset, full_matrix
from tests.faults.runner import REPO, Result, run_case
from tests.netns import available, netns_pair

DOC = REPO / "docs" / "faults.md"
DOC_POSTCOPY = REPO / "docs" / "faults-postcopy.md"
DOC_STORAGE = REPO / "docs" / "faults-storage.md"
#: Modes with a table of their own.
_OWN_TABLE = frozenset({Mode.V3_POSTCOPY, Mode.V3_STORAGE})
LOGS = REPO / "build" / "faults"


def select(subset: str, patterns: Sequence[str]) -> list[Case]:
    cases = (
        list(CI_SUBSET)
        if subset == "ci"
        else list(LEASE_SUBSET)
        if subset == "lease"
        else full_matrix() + list(LEASE_SUBSET)
    )
    if patterns:
        cases = [c for c in cases if any(p in c.id for p in patterns)]
    return cases


def run_all(
    cases: Sequence[Case], *, keep_logs: Path | None = LOGS, on_result: Callable[[Result], None]
) -> list[Result]:
    """Run *cases* one after another on one pair of namespaces."""
    results = []
    with netns_pair() as net:
        for case in cases:
            result = run_case(net, case, keep_logs=keep_logs)
            on_result(result)
            results.append(result)
    return results


def row(result: Result) -> str:
    recover = "" if result.recover_s is None else f"{result.recover_s:.1f}"
    outcome = result.outcome
    if result.reason:
        outcome = f"{outcome} — {result.reason}" if outcome else result.reason
    outcome = outcome.replace("|", "\\|").replace("\n", " ")
    return f"| {result.case.id} | {outcome} | {result.verdict} | {recover} |"


HEADER = "| case | outcome | verdict | recover s |\n|---|---|---|---|"


def summary(results: Sequence[Result]) -> str:
    counts: dict[str, int] = {}
    for r in results:
        counts[r.verdict] = counts.get(r.verdict, 0) + 1
    return ", ".join(f"{n} {v}" for v, n in sorted(counts.items()))


POSTCOPY_INTRO = (
    "# Fault matrix: post-copy\n\n"
    "Written by `make faults` (`python -m tests.faults.matrix`, or only these cases:\n"
    "`python -m tests.faults.matrix -k v3-postcopy --output docs/faults-postcopy.md`);\n"
    "do not edit by hand. The pre-copy protocols are in [faults.md](faults.md).\n\n"
    "Mode `v3-postcopy`: client-managed v3 with `--postcopy`; the test guest re-dirties its\n"
    "32 MiB buffer at 64 MiB/s, faster than the 32 MiB/s bandwidth cap, so pre-copy alone\n"
    "never completes; `postcopy_after_precopy` switches once the first pass is over, and\n"
    "a 16 MiB/s post-copy cap keeps the post-copy phase a few seconds long. Boundaries:\n"
    "after the switch with the destination still paused (`src-perform3-after`,\n"
    "`dst-finish-before`), with the destination running the guest while post-copy goes on\n"
    "(`dst-postcopy-running`: inside Finish, after `cont`, before waiting for completion),\n"
    "and Confirm. Everything else is as in the pre-copy matrix, with these expectations:\n\n"
    "* until the post-copy stream completed the guest's state is split between the two\n"
    "  QEMUs: killing either may lose it (**LOST**); a half that can never complete (a\n"
    "  post-copy job whose other QEMU is gone, unchanged for 6 s) is destroyed by the\n"
    "  harness, as an operator would, and named in the outcome;\n"
    "* before the destination ran the guest the source may take it back, but only if the\n"
    "  destination's console shows no heartbeat of the guest's boot; from\n"
    "  `dst-postcopy-running` on the guest must never run on the source again;\n"
    "* every other fault must end with the guest running on the destination with its\n"
    "  memory intact, no job, QEMU, port or file left over, and a new (post-copy)\n"
    "  migration succeeding.\n\n"
)


STORAGE_INTRO = (
    "# Fault matrix: storage migration\n\n"
    "Written by `make faults` (`python -m tests.faults.matrix`, or only these cases:\n"
    "`python -m tests.faults.matrix -k v3-storage --output docs/faults-storage.md`);\n"
    "do not edit by hand. The pre-copy protocols are in [faults.md](faults.md), storage\n"
    "migration in [storage-migration.md](storage-migration.md).\n\n"
    "Mode `v3-storage`: client-managed v3 with `--copy-storage-all`; the guest's disk is a\n"
    "16 MiB raw volume of each host's own pool `default`, 4 MiB of which the guest\n"
    "re-stamps at 1 MiB/s and verifies while it moves. Boundaries: the destination's disk\n"
    "created (`dst-prepare-storage`, before its QEMU starts), the source about to mirror\n"
    "(`src-perform-mirror`), every mirror in sync with the memory not yet moving\n"
    "(`src-perform-mirror-ready`), the switchover with the vCPUs stopped and the mirrors\n"
    "not yet drained (`src-perform-switchover`), Finish with the stream complete and the\n"
    "guest not yet resumed (`dst-finish-storage`; the NBD server stops with its `cont`).\n"
    "Expectations as in the pre-copy matrix (the source QEMU holds the only whole copy\n"
    "until the stream completed), and besides:\n"
    "when the guest stays on the source the destination keeps no volume of it (the one\n"
    "Prepare created is deleted), and no NBD server port is left open.\n\n"
)


def document(
    results: Sequence[Result], wall_s: float, *, postcopy: bool = False, storage: bool = False
) -> str:
    stamp = datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC")
    if postcopy or storage:
        intro = STORAGE_INTRO if storage else POSTCOPY_INTRO
        last = f"Last run: {stamp}, {len(results)} cases in {wall_s / 60:.1f} min"
        return (
            f"{intro}{last}: {summary(results)}.\n\n{HEADER}\n"
            + "\n".join(row(r) for r in results)
            + "\n"
        )
    return (
        "# Fault matrix\n\n"
        "Written by `make faults` (`python -m tests.faults.matrix`); do not edit by hand.\n\n"
        "Each case migrates the test guest live from host A to host B (two vmferryd in network\n"
        "namespaces joined by a veth pair), stops the protocol at the failpoint named in the\n"
        "case (`pause`), applies the fault, lets the protocol go on, restarts what was killed\n"
        "(or brings the link back after 6 s) and waits for recovery. It then checks that the\n"
        "guest runs on exactly one host with its memory intact (same boot id, heartbeat going\n"
        "on, no memory errors), that no QEMU, job, migration port or status file is left over,\n"
        "and that a new migration with the same protocol succeeds.\n\n"
        "Verdicts: **PASS**; **LOST**: the guest is gone because the fault killed the QEMU that\n"
        "held its only valid copy (the source before the stream completed, or the destination\n"
        "after it took over), everything else checked as for PASS; **N/A**: the fault cannot\n"
        "happen there (no such QEMU at that boundary); **FAIL**: the reason follows the\n"
        "outcome. *recover s*: from the fault to a settled state (no job on either side, no\n"
        "paused copy, for 1.5 s), including the restart delay (3 s) or the link-down time.\n\n"
        f"Last run: {stamp}, {len(results)} cases in {wall_s / 60:.1f} min: {summary(results)}.\n\n"
        f"{HEADER}\n" + "\n".join(row(r) for r in results) + "\n"
    )


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m tests.faults.matrix", description="fault matrix")
    p.add_argument("--subset", choices=["all", "ci", "lease"], default="all")
    p.add_argument("-k", dest="patterns", action="append", default=[], help="case id contains")
    p.add_argument("--output", type=Path, help="write the table here (a full run: docs/faults.md)")
    args = p.parse_args(argv)
    why = available()
    if why:
        print(f"fault matrix: {why}", file=sys.stderr)
        return 2
    cases = select(args.subset, args.patterns)
    if args.subset == "ci" and not args.patterns:
        for gap in check_subset(CI_SUBSET):
            print(f"warning: CI subset misses {gap}", file=sys.stderr)
    full = args.subset == "all" and not args.patterns
    print(f"{len(cases)} cases", flush=True)
    print(HEADER, flush=True)
    started = time.monotonic()
    results = run_all(cases, on_result=lambda r: print(row(r), flush=True))
    wall = time.monotonic() - started
    print(f"\n{summary(results)} in {wall / 60:.1f} min")
    failed = [r for r in results if not r.ok]
    for r in failed:
        if r.logs:
            print(f"logs of {r.case.id}: {Path(r.logs[0]).parent}")
    if args.output is not None:
        postcopy = all(r.case.mode == Mode.V3_POSTCOPY for r in results)
        storage = all(r.case.mode == Mode.V3_STORAGE for r in results)
        args.output.write_text(document(results, wall, postcopy=postcopy, storage=storage))
        print(f"table written to {args.output}")
    elif full:
        # one run, three tables: the pre-copy protocols, post-copy and storage migration
        for doc, mode in (
            (DOC, None),
            (DOC_POSTCOPY, Mode.V3_POSTCOPY),
            (DOC_STORAGE, Mode.V3_STORAGE),
        ):
            if mode is None:
                part = [r for r in results if r.case.mode not in _OWN_TABLE]
            else:
                part = [r for r in results if r.case.mode == mode]
            text = document(
                part,
                sum(r.wall_s for r in part),
                postcopy=mode == Mode.V3_POSTCOPY,
                storage=mode == Mode.V3_STORAGE,
            )
            doc.write_text(text)
            print(f"table written to {doc}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
