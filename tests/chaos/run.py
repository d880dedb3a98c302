"""``make chaos``: many seeded fault schedules per store, then the soak; a summary table at the end.

    python -m tests.chaos.run --schedules 50 --stores local,seaweedfs --soak

Each schedule prints one line as it ends. The last line reads
``chaos: S schedules, L lost, D duplicated, W wasted rows``; the exit status is 1 if any row
was lost or duplicated, the manifest disagreed with the ledger, wasted work exceeded its bound,
or the soak failed (a row lost or duplicated, a worker that did not exit 0, or more than
MAX_REQUESTS_PER_SHARD ledger requests per shard). A failing schedule keeps its folder (worker
logs, ledger, output); rerun it alone with ``--stores STORE --first-seed SEED --schedules 1``.
The soak alone, at issue 13's scale of 24 real workers:

    python -m tests.chaos.run --schedules 0 --soak --soak-workers 24 --soak-shards 1200
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import pathlib
import shutil
import signal
import sys
import tempfile
import uuid
from collections import Counter
from collections.abc import Callable, Iterator

from tests.chaos.harness import RunResult, run_schedule
from tests.chaos.schedule import STORE_KINDS, make_schedule
from tests.chaos.seaweed import RestartableSeaweedFS, restartable_seaweedfs
from tests.chaos.soak import MAX_REQUESTS_PER_SHARD, SoakResult, run_soak
from tests.s3_servers import _AWS_VARS_TO_CLEAR, StoreLocation

# A fresh root for one schedule, given its seed and its work folder.
Locations = Callable[[int, pathlib.Path], StoreLocation]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tests.chaos.run", description=__doc__)
    parser.add_argument("--schedules", type=int, default=50, help="schedules per store (default 50)")
    parser.add_argument("--first-seed", type=int, default=0)
    parser.add_argument("--stores", default="local,seaweedfs", help="comma-separated: local, seaweedfs")
    parser.add_argument("--soak", action="store_true", help="also run the soak (16 workers x 2,000 shards)")
    parser.add_argument("--soak-workers", type=int, default=16, help="worker processes in the soak (default 16)")
    parser.add_argument("--soak-shards", type=int, default=2000, help="shards in the soak, a multiple of 4")
    parser.add_argument("--json", help="write every schedule's record and the soak's here")
    parser.add_argument("--keep", action="store_true", help="keep every schedule's folder, not only failed ones")
    args = parser.parse_args(argv)
    # SIGTERM unwinds like Ctrl-C, so that workers and the SeaweedFS server are stopped on the way out.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    stores = [s.strip() for s in args.stores.split(",") if s.strip()]
    unknown = sorted(set(stores) - set(STORE_KINDS))
    if unknown:
        parser.error(f"unknown store(s) {unknown}; known: {sorted(STORE_KINDS)}")
    seeds = range(args.first_seed, args.first_seed + args.schedules)
    results: list[RunResult] = []
    for store in stores if seeds else ():
        with _store(store) as (locations, seaweedfs):
            results += [_run_one(store, seed, locations, seaweedfs, keep=args.keep) for seed in seeds]
    soak = _soak(args.soak_workers, args.soak_shards) if args.soak else None
    print(summary_table(results, soak))
    if args.json:
        records = {"schedules": [r.to_dict() for r in results], "soak": soak.to_dict() if soak else None}
        pathlib.Path(args.json).write_text(json.dumps(records, indent=1))
    lost = sum(r.verdict.lost for r in results)
    duplicated = sum(r.verdict.duplicated for r in results)
    wasted = sum(r.verdict.wasted_rows for r in results)
    print(f"chaos: {len(results)} schedules, {lost} lost, {duplicated} duplicated, {wasted} wasted rows")
    return 0 if all(r.ok for r in results) and (soak is None or soak.ok) else 1


@contextlib.contextmanager
def _store(store: str) -> Iterator[tuple[Locations, RestartableSeaweedFS | None]]:
    """Where the store's schedules put their jobs, and the server to stop for an outage."""
    if store == "local":
        yield (lambda _seed, workdir: StoreLocation("local", str(workdir / "store"), {})), None
        return
    with restartable_seaweedfs() as weed:
        for name in _AWS_VARS_TO_CLEAR:
            os.environ.pop(name, None)
        os.environ.update(weed.server.env)  # the workers inherit it; the planner and checker here need it too
        server = weed.server

        def location(seed: int, _workdir: pathlib.Path) -> StoreLocation:
            url = f"s3://{server.bucket}/chaos-{seed}-{uuid.uuid4().hex[:8]}"
            return StoreLocation("seaweedfs", url, dict(server.storage_options))

        yield location, weed


def _run_one(
    store: str, seed: int, locations: Locations, seaweedfs: RestartableSeaweedFS | None, *, keep: bool
) -> RunResult:
    schedule = make_schedule(seed, store)
    workdir = pathlib.Path(tempfile.mkdtemp(prefix=f"antbatch-chaos-{store}-{seed}-"))
    result = run_schedule(schedule, locations(seed, workdir), workdir, seaweedfs=seaweedfs)
    print(describe(result), flush=True)
    if not result.ok:
        print(f"  kept {workdir}; problems: {result.verdict.problems}", flush=True)
    elif keep:
        print(f"  kept {workdir}", flush=True)
    else:
        shutil.rmtree(workdir, ignore_errors=True)
    return result


def describe(result: RunResult) -> str:
    """One line per schedule: seed, faults as injected, the checker's figures, time."""
    v = result.verdict
    faults = ", ".join(f"{i.kind}@{i.at_s:.1f}s" + (f" ({i.detail})" if i.detail else "") for i in result.injected)
    missed = f"; not injected: {', '.join(result.missed)}" if result.missed else ""
    verdict = "ok" if result.ok else "FAILED"
    return (
        f"{result.schedule.describe()}: {faults or 'no fault'}{missed}; lost {v.lost}, duplicated {v.duplicated}, "
        f"wasted {v.wasted_rows} rows ({v.wasted_tries} tries, bound {result.wasted_bound_tries}), "
        f"{result.worker_starts} worker starts, {result.seconds:.0f}s: {verdict}"
    )


def _soak(workers: int, shards: int) -> SoakResult:
    workdir = pathlib.Path(tempfile.mkdtemp(prefix="antbatch-soak-"))
    result = run_soak(workdir, workers=workers, shards=shards)
    v = result.verdict
    print(
        f"soak: {workers} workers x {shards} shards ({v.rows} rows) in {result.seconds:.0f}s: lost {v.lost}, "
        f"duplicated {v.duplicated}, exit codes {sorted(set(result.exit_codes))}; ledger requests "
        f"{result.requests} = {result.ledger_requests_per_shard:.2f} per shard (heartbeats aside; bar "
        f"{MAX_REQUESTS_PER_SHARD:.0f}); claiming {result.claiming}; after the last commit: done.json in "
        f"{result.done_s:.1f}s, every worker's final beat in {result.tail_s:.1f}s, every process out in "
        f"{result.exit_s:.1f}s (lease TTL {result.lease_ttl_s:.0f}s)",
        flush=True,
    )
    if result.ok:
        shutil.rmtree(workdir, ignore_errors=True)
    return result


def summary_table(results: list[RunResult], soak: SoakResult | None) -> str:
    """Per store: schedules, faults injected by kind, lost, duplicated, wasted rows, time."""
    header = ("store", "schedules", "faults injected", "lost", "duplicated", "wasted rows (tries/bound)", "failed")
    rows: list[tuple[str, ...]] = [(*header, "time")]
    for store in dict.fromkeys(r.schedule.store for r in results):
        mine = [r for r in results if r.schedule.store == store]
        kinds = Counter(i.kind for r in mine for i in r.injected)
        rows.append(
            (
                store,
                str(len(mine)),
                ", ".join(f"{kind} {kinds[kind]}" for kind in STORE_KINDS[store]),
                str(sum(r.verdict.lost for r in mine)),
                str(sum(r.verdict.duplicated for r in mine)),
                f"{sum(r.verdict.wasted_rows for r in mine)} "
                f"({sum(r.verdict.wasted_tries for r in mine)}/{sum(r.wasted_bound_tries for r in mine)})",
                str(sum(1 for r in mine if not r.ok)),
                f"{sum(r.seconds for r in mine):.0f}s",
            )
        )
    if soak is not None:
        v = soak.verdict
        rows.append(
            (
                "soak (local)",
                f"1: {soak.workers} workers x {soak.shards} shards",
                f"none; {soak.ledger_requests_per_shard:.1f} ledger requests/shard",
                str(v.lost),
                str(v.duplicated),
                f"{v.wasted_rows} ({v.wasted_tries}/0)",
                str(0 if soak.ok else 1),
                f"{soak.seconds:.0f}s",
            )
        )
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    lines = [" | ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)) for row in rows]
    lines.insert(1, "-+-".join("-" * w for w in widths))
    return "\n".join(lines)


if __name__ == "__main__":
    raise SystemExit(main())
