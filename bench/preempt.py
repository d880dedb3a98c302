"""SIGTERM mid-shard, with a drain budget and without: ``python -m bench.preempt``.

NOTE [drain] in worker/drain.py, measured with real processes. The *single* workload of the
full profile (8,192 rows in shards of 1,024: four batches each), input through ``latency://``,
one ``antbatch worker`` as a pod runs it. Once half the rows are committed and a little more
(so that the signal lands inside a shard), the worker gets SIGTERM, as a kubelet sends it to a
preempted pod's PID 1; then the same worker id runs again to the end, as the retry or the
pool's replacement does. Each repeat runs once with ``--drain-s 0`` (give everything back at
once) and once with ``--drain-s 30``, interleaved. Measured: rows scored twice (the
postprocess stage's rows over both processes, less the job's rows), seconds from SIGTERM to
the worker's exit, the whole job's wall time (both workers, planning apart), and the output's
duplicates and missing ids.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import signal
import statistics
import subprocess
import sys
import time
from typing import Any

from bench import docgen
from bench.config import PROFILES
from bench.data import write_text
from bench.latencyfs import latency_env
from bench.resume import RUN_TIMEOUT_S, AntbatchJob, Profile, kill_tree, output_check, run_timed
from bench.run import REPO, RESULTS, git_state, machine

# One row group a shard: 1,024 rows, four batches of 256.
PROFILE = Profile("full", PROFILES["full"].single, PROFILES["full"].single.row_group_rows)
DRAIN_S = 30.0  # a pod's 45 s less a margin on a slow machine: the in-flight shard takes about a second here
PREEMPTED = 75  # exit_codes.PREEMPTED


def preempted_run(job: AntbatchJob, plan_uri: str, drain_s: float, rng: random.Random) -> dict[str, Any]:
    """One worker, SIGTERM mid-shard past half the rows; then the same worker id to the end."""
    killed_summary = job.output + "-killed.json"
    cmd = [*job.worker_cmd(plan_uri, killed_summary), "--drain-s", str(drain_s)]
    started = time.time()
    with open(job.log, "a") as log:
        proc = subprocess.Popen(cmd, cwd=REPO, env=job.env, stdout=log, stderr=subprocess.STDOUT)
        rows, half = PROFILE.data.rows, PROFILE.data.rows // 2
        while sum(job.commits().values()) < half:
            if proc.poll() is not None or time.time() - started > RUN_TIMEOUT_S:
                kill_tree(proc.pid)
                raise RuntimeError(f"the worker ended or hung before {half} of {rows} rows were committed")
            time.sleep(0.02)
        time.sleep(rng.uniform(0.2, 0.8))  # into the next shard: about a second each here
        signalled = time.time()
        proc.send_signal(signal.SIGTERM)
        try:
            code = proc.wait(timeout=drain_s + 60)
        except subprocess.TimeoutExpired:
            kill_tree(proc.pid)
            raise RuntimeError(f"the worker did not exit {drain_s + 60:.0f} s after SIGTERM") from None
    exited = time.time()
    if code != PREEMPTED:
        raise RuntimeError(f"the SIGTERMed worker exited {code}, not {PREEMPTED}; see {job.log}")
    at_exit = sum(job.commits().values())
    rerun_summary = job.output + "-rerun.json"
    rerun_s, _ = run_timed(job.worker_cmd(plan_uri, rerun_summary), job.env, job.log)
    scored = sum(_postprocessed(path) for path in (killed_summary, rerun_summary))
    return {
        "drain_s": drain_s,
        "signal_after_s": round(signalled - started, 2),
        "exit_after_signal_s": round(exited - signalled, 2),
        "rows_committed_at_exit": at_exit,
        "rows_scored_twice": scored - rows,
        "job_wall_s": round(exited - started + rerun_s, 2),
        "output": output_check(job.output, rows),
    }


def _postprocessed(summary_path: str) -> int:
    with open(summary_path) as handle:
        return int(json.load(handle)["stages"]["postprocess"]["rows"])


def summarise(runs: list[dict[str, Any]]) -> dict[str, Any]:
    def median(key: str) -> float:
        return round(statistics.median(r[key] for r in runs), 2)

    return {
        "rows_scored_twice": median("rows_scored_twice"),
        # A signal that lands just after a commit finds nothing scored in hand, so the median
        # alone can hide what a release throws away: every repeat's count goes in too.
        "rows_scored_twice_each": [r["rows_scored_twice"] for r in runs],
        "exit_after_signal_s": median("exit_after_signal_s"),
        "job_wall_s": median("job_wall_s"),
        "duplicates": sum(r["output"]["duplicates"] for r in runs),
        "missing": sum(r["output"]["missing"] for r in runs),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.preempt", description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--work", default=os.environ.get("ANTBATCH_BENCH_WORK", "/tmp/antbatch-bench"))
    parser.add_argument("--out", default=os.path.join(RESULTS, "preempt.json"))
    parser.add_argument("--no-report", action="store_true", help="do not rewrite docs/benchmarks.md (bench.docgen)")
    args = parser.parse_args(argv)
    env = {
        **os.environ,
        "PYTHONPATH": REPO + os.pathsep + os.environ.get("PYTHONPATH", ""),
        **latency_env(),
        "OMP_WAIT_POLICY": "PASSIVE",
    }
    work = os.path.join(args.work, f"preempt-{os.getpid()}")
    os.makedirs(work)
    input_dir = os.path.dirname(write_text(os.path.join(args.work, "data"), PROFILE.data)[0])
    began, load = time.time(), os.getloadavg()
    rng = random.Random(17)
    runs: dict[str, list[dict[str, Any]]] = {"release": [], "drain": []}
    for repeat in range(args.repeats):
        for name, drain_s in (("release", 0.0), ("drain", DRAIN_S)):
            job = AntbatchJob(work, input_dir, PROFILE, env, f"{name}-{repeat}")
            _, plan_uri = job.plan(job.env)
            run = preempted_run(job, plan_uri, drain_s, rng)
            runs[name].append(run)
            print(f"[{time.time() - began:6.1f}s] {name} #{repeat}: {run}", file=sys.stderr, flush=True)
    report = {
        "command": "python -m bench.preempt",
        "finished_at": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
        "wall_s": round(time.time() - began, 1),
        "load_avg_before": [round(x, 2) for x in load],
        "machine": machine(),
        "git": git_state(),
        "data": {"rows": PROFILE.data.rows, "max_shard_rows": PROFILE.max_shard_rows, "batch_size": PROFILE.batch_size},
        "runs": runs,
        "median": {name: summarise(r) for name, r in runs.items()},
    }
    print(json.dumps(report["median"], indent=1))
    shutil.rmtree(work, ignore_errors=True)
    return docgen.write_result(args.out, report, regenerate=not args.no_report)


if __name__ == "__main__":
    raise SystemExit(main())
