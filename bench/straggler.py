"""Stragglers: N antbatch workers, one throttled to half speed, with dynamic and static dispatch.

``python -m bench.straggler [--profile quick|full]`` (``make bench-straggler``: the quick
profile, about 2 minutes on 2 cores) writes ``bench/results/straggler.json``: the profile's job,
and the same job with the throttled worker ``HARSH_SLOWDOWN`` times slower, where backups
have more to win. ``bench.run`` runs the profile's job into quick.json and full.json.
docs/benchmarks.md's "straggler" block is rendered from them by ``bench.straggler_report``.

The model is ``bench.workloads:build_sleep_model``: it sleeps per row and burns no CPU, so 4
workers on 2 cores measure scheduling, not contention. The throttled worker gets
``ANTBATCH_BENCH_SLOWDOWN=2``.

- *dynamic*: one plan, every worker pulls shards from the ledger, with speculative backup
  tries at the tail (the default); the rows scored by tries that lost the race are reported,
  and the tries a holder handed over to a backup before scoring them.
- *no_backup*: the same with ``backup_tries=False``.
- *static*: the shards dealt round-robin into N disjoint jobs, one per worker (what a job
  that splits its input by worker index does).

Input is read from local disk here: the job measures dispatch, and the latency filesystem
would only slow the planning of five jobs. The makespan runs from the common start (a
barrier) to the last commit marker written. The ideal is ``total rows / total speed``, where
each worker's speed is measured in the static run (rows over the time it took its own fixed
share), so per-shard overheads count in the ideal as well; the nominal ideal from the sleep
figures alone is reported beside it.
"""

from __future__ import annotations

import dataclasses
import glob
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from typing import TYPE_CHECKING, Any

from airflow_antbatch import layout
from bench.data import write_numeric
from bench.workloads import SLEEP_PER_ROW_S

if TYPE_CHECKING:
    from bench.config import StragglerConfig

RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")
HARSH_SLOWDOWN = 5.0
# Short leases: a worker that has nothing left to claim polls every ttl/4 for the others to finish.
LEASE_TTL_S = 2.0


def _plan(inputs: list[str], output: str, shard_rows: int, *, backups: bool = True) -> str:
    from airflow_antbatch.planning import plan_job
    from airflow_antbatch.spec import JobSpec

    spec = JobSpec(
        input_uri=tuple(inputs),
        output_uri=output,
        model="bench.workloads:build_sleep_model",
        id_column="id",
        batch_size=shard_rows,
        max_shard_rows=shard_rows,
        lease_ttl_s=LEASE_TTL_S,
        backup_tries=backups,
    )
    return plan_job(spec).plan_uri


def _start_workers(
    phases: list[list[dict[str, str]]], work: str, cfg: StragglerConfig, env: dict[str, str]
) -> list[Any]:
    """One process per worker; ``phases[w]`` lists what worker ``w`` runs, phase by phase."""
    procs = []
    for index, worker_phases in enumerate(phases):
        worker_env = {**env, "ANTBATCH_BENCH_SLOWDOWN": str(cfg.slowdown if index == 0 else 1.0)}
        with open(os.path.join(work, f"worker-{index}.log"), "w") as log:
            procs.append(
                subprocess.Popen(
                    [sys.executable, "-m", "bench.straggler_worker", json.dumps(worker_phases)],
                    env=worker_env,
                    stdout=subprocess.DEVNULL,
                    stderr=log,
                )
            )
    return procs


def _run_phase(procs: list[Any], phase: list[dict[str, str]], work: str) -> list[dict[str, Any]]:
    """Wait until every worker is ready for the phase, release them together, collect results."""
    while not all(os.path.exists(p["ready_file"]) for p in phase):
        if any(proc.poll() not in (None, 0) for proc in procs):
            raise RuntimeError(f"a straggler worker died; see {work}/worker-*.log")
        time.sleep(0.01)
    go = time.time()
    with open(phase[0]["go_file"], "w") as handle:
        handle.write(str(go))
    while not all(os.path.exists(p["result_file"]) for p in phase):
        if any(proc.poll() not in (None, 0) for proc in procs):
            raise RuntimeError(f"a straggler worker failed; see {work}/worker-*.log")
        time.sleep(0.01)
    results = []
    for p in phase:
        with open(p["result_file"]) as handle:
            results.append({**json.load(handle), "go": go})
    return results


def _phase(work: str, name: str, plans: list[str]) -> list[dict[str, str]]:
    return [
        {
            "plan_uri": plan_uri,
            "worker_id": f"w{index}",
            "ready_file": os.path.join(work, f"{name}-ready-{index}"),
            "go_file": os.path.join(work, f"{name}-go"),
            "result_file": os.path.join(work, f"{name}-result-{index}.json"),
        }
        for index, plan_uri in enumerate(plans)
    ]


def _last_commit(output: str) -> float:
    markers = glob.glob(os.path.join(output, layout.STATE_DIR, "attempt-*", layout.COMMITS_DIR, "*", "*.json"))
    return max(os.path.getmtime(m) for m in markers)


def _commits_by_worker(output: str) -> dict[str, int]:
    counts: dict[str, int] = {}
    for marker in glob.glob(os.path.join(output, layout.STATE_DIR, "attempt-*", layout.COMMITS_DIR, "*", "*.json")):
        with open(marker) as handle:
            worker = json.load(handle)["token"].split("--")[0]
        counts[worker] = counts.get(worker, 0) + 1
    return dict(sorted(counts.items()))


def run_once(root: str, cfg: StragglerConfig, env: dict[str, str], repeat: int) -> dict[str, Any]:
    files = write_numeric(os.path.join(root, "data"), cfg.shards, cfg.rows_per_shard)
    total_rows = cfg.shards * cfg.rows_per_shard
    work = os.path.join(root, f"straggler-{repeat}")
    shutil.rmtree(work, ignore_errors=True)

    os.makedirs(work)
    dyn_out, off_out = os.path.join(work, "dynamic"), os.path.join(work, "no-backup")
    dynamic = _phase(work, "dynamic", [_plan(files, dyn_out, cfg.rows_per_shard)] * cfg.workers)
    no_backup = _phase(work, "no-backup", [_plan(files, off_out, cfg.rows_per_shard, backups=False)] * cfg.workers)
    outputs = [os.path.join(work, f"static-{i}") for i in range(cfg.workers)]
    static = _phase(
        work, "static", [_plan(files[i :: cfg.workers], outputs[i], cfg.rows_per_shard) for i in range(cfg.workers)]
    )
    # A warm-up job of one shard per worker first: the first job in a process pays lazy imports
    # and first calls, which would otherwise count against whichever dispatch ran first.
    warm = [os.path.join(work, f"warmup-{i}") for i in range(cfg.workers)]
    warmup = _phase(work, "warmup", [_plan(files[i : i + 1], warm[i], cfg.rows_per_shard) for i in range(cfg.workers)])
    phases = zip(warmup, dynamic, no_backup, static, strict=True)
    procs = _start_workers([list(p) for p in phases], work, cfg, env)
    _run_phase(procs, warmup, work)
    dyn = _run_phase(procs, dynamic, work)
    dyn_makespan = _last_commit(dyn_out) - dyn[0]["go"]
    off = _run_phase(procs, no_backup, work)
    off_makespan = _last_commit(off_out) - off[0]["go"]
    static_results = _run_phase(procs, static, work)
    for proc in procs:
        proc.wait()
    spans = [_last_commit(out) - static_results[0]["go"] for out in outputs]
    static_makespan = max(spans)
    speeds = [r["rows"] / span for r, span in zip(static_results, spans, strict=True)]
    ideal = total_rows / sum(speeds)
    nominal = total_rows * SLEEP_PER_ROW_S / (cfg.workers - 1 + 1 / cfg.slowdown)
    return {
        "dynamic_makespan_s": dyn_makespan,
        "static_makespan_s": static_makespan,
        "ideal_s": ideal,
        "nominal_ideal_s": nominal,
        "dynamic_over_ideal": dyn_makespan / ideal,
        "static_over_ideal": static_makespan / ideal,
        "no_backup_makespan_s": off_makespan,
        "no_backup_over_ideal": off_makespan / ideal,
        "backups": sum(r["backups"] for r in dyn),
        "rows_wasted": sum(r["rows_lost"] for r in dyn),
        "handed_over": sum(r.get("handed_over", 0) for r in dyn),
        "rows_wasted_no_backup": sum(r["rows_lost"] for r in off),
        # The most tries each worker held at once (NOTE [read-ahead] in worker/loop.py).
        "read_ahead_windows": [r.get("window") for r in dyn],
        "read_ahead_windows_no_backup": [r.get("window") for r in off],
        "dynamic_shards_by_worker": _commits_by_worker(dyn_out),
        "static_rows_s_by_worker": [round(s, 1) for s in speeds],
    }


def run(root: str, cfg: StragglerConfig, env: dict[str, str]) -> dict[str, Any]:
    """Median over repeats of each figure, plus the setup."""
    runs = [run_once(root, cfg, env, r) for r in range(cfg.repeats)]
    keys = (
        "dynamic_makespan_s",
        "static_makespan_s",
        "ideal_s",
        "nominal_ideal_s",
        "dynamic_over_ideal",
        "static_over_ideal",
        "no_backup_makespan_s",
        "no_backup_over_ideal",
    )
    out: dict[str, Any] = {k: round(statistics.median(r[k] for r in runs), 3) for k in keys}
    for key in ("backups", "rows_wasted", "handed_over", "rows_wasted_no_backup"):  # summed over the repeats
        out[key] = sum(r[key] for r in runs)
    out["dynamic_shards_by_worker"] = runs[-1]["dynamic_shards_by_worker"]
    out["static_rows_s_by_worker"] = runs[-1]["static_rows_s_by_worker"]
    out["runs"] = [{k: (round(v, 3) if isinstance(v, float) else v) for k, v in r.items()} for r in runs]
    out["setup"] = {
        "workers": cfg.workers,
        "shards": cfg.shards,
        "rows_per_shard": cfg.rows_per_shard,
        "throttled_worker": "w0",
        "slowdown": cfg.slowdown,
        "sleep_per_row_s": SLEEP_PER_ROW_S,
        "lease_ttl_s": LEASE_TTL_S,
    }
    return out


def main(argv: list[str] | None = None) -> int:
    import argparse
    import datetime as dt
    import tempfile

    from bench.config import PROFILES

    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--profile", choices=sorted(PROFILES), default="quick")
    parser.add_argument("--out", default=os.path.join(RESULTS, "straggler.json"))
    args = parser.parse_args(argv)
    began, load_before = time.time(), os.getloadavg()[0]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cfg = PROFILES[args.profile].straggler
    with tempfile.TemporaryDirectory(prefix="antbatch-straggler-") as root:
        result = run(root, cfg, env)
        harsh = run(root, dataclasses.replace(cfg, slowdown=HARSH_SLOWDOWN), env)
    result.update(
        command=f"python -m bench.straggler --profile {args.profile}",
        profile=args.profile,
        wall_s=round(time.time() - began, 1),
        load_avg_before=load_before,
        load_avg_after=os.getloadavg()[0],
        finished_at=dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
    )
    harsh["load_avg_before"] = result["load_avg_before"]
    with open(args.out, "w") as handle:
        json.dump({"straggler": result, "straggler_harsh": harsh}, handle, indent=1)
        handle.write("\n")
    print(
        f"straggler: {result['dynamic_over_ideal']:.3f}x ideal with backups ({result['backups']} backups, "
        f"{result['rows_wasted']} rows wasted), {result['no_backup_over_ideal']:.3f}x without, "
        f"static {result['static_over_ideal']:.3f}x; {HARSH_SLOWDOWN:g}x slower: {harsh['dynamic_over_ideal']:.3f}x "
        f"with backups, {harsh['no_backup_over_ideal']:.3f}x without; {result['wall_s']} s -> {args.out}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
