"""Resume after a kill, against Ray Data's checkpointing: ``python -m bench.resume [--quick]``.

Issue 6, point 5. The *single* workload's data and functions, input through ``latency://``.
For each system: run the job and SIGKILL its whole process tree once about half the rows are
committed (antbatch: the ledger's ``commits/``; Ray: the committed checkpoint files), then rerun
it to completion and measure the rerun's wall time (process start to exit, every process),
the rows it scored, the input bytes it read (every GET, logged by ``bench/latencyfs.py``) and
how many of those belong to the input of work committed before the kill, and the final
output's duplicates and missing ids (joined on ``id``). A rerun from scratch into an empty
output is the baseline that shows what resuming saves. antbatch's rerun is what Airflow
does on a rerun: the plan step again (the plan is reused) and the worker again, with the same
worker id, so it takes over its dead predecessor's leases at once.
"""

from __future__ import annotations

import argparse
import dataclasses
import glob
import json
import os
import shutil
import subprocess
import sys
import time
from typing import TYPE_CHECKING, Any

import numpy as np
import psutil
import pyarrow.parquet as pq

from airflow_antbatch import layout
from airflow_antbatch.shards import JobPlan
from bench.config import PROFILES, RAY_BEST
from bench.data import TextData, write_text
from bench.latencyfs import READ_LOG_ENV, latency_env
from bench.run import CPUS, RAY_PYTHON, REPO, RESULTS, git_state, machine
from bench.systems.antbatch import job_fields
from bench.systems.ray_resume import rows_scored
from bench.verify import read_output

if TYPE_CHECKING:
    from collections.abc import Callable

# The antbatch CLI (python -m airflow_antbatch) with latency:// registered first.
ANTBATCH_CLI = "import bench.latencyfs, runpy; runpy.run_module('airflow_antbatch', run_name='__main__')"
POLL_S = 0.05
# Logical CPUs for ray.init, on every Ray run here (the throughput benchmark uses 2). A resumed
# run adds Ray's checkpoint filter actor, which holds one for the whole job (Ray 2.60 has no
# option for less); with the scoring actor and the ListFiles task holding the others, the
# FooterReader actor that ListFiles starts (1 CPU to be scheduled) never started and the
# resumed run hung before reading anything (seen twice at 2). Filter, scorer, ListFiles and
# FooterReader: 4. The same figure for every Ray run, so that the resumed and the
# from-scratch runs differ in the checkpoint alone.
RAY_LOGICAL_CPUS = 4
RUN_TIMEOUT_S = 900  # a run that takes longer is hung (Ray's resume did, on 2 logical CPUs)
FOOTER_READ = 64 * 1024  # pyarrow reads a Parquet file's last 64 KiB to find its footer


@dataclasses.dataclass(frozen=True)
class Profile:
    name: str
    data: TextData
    max_shard_rows: int  # one row group per shard: the finest cut the planner makes
    batch_size: int = 256


RESUME_PROFILES = {
    "quick": Profile("quick", PROFILES["quick"].single, PROFILES["quick"].single.row_group_rows),
    "full": Profile("full", PROFILES["full"].single, PROFILES["full"].single.row_group_rows),
}

Ranges = dict[str, list[tuple[int, int]]]  # local path -> byte ranges


# -- input layout and reads ---------------------------------------------------------------------


def row_group_ranges(path: str) -> list[tuple[int, int]]:
    """Each row group's bytes in the file: from its first page to the end of its last column chunk."""
    meta = pq.read_metadata(path)
    out = []
    for g in range(meta.num_row_groups):
        group = meta.row_group(g)
        starts, ends = [], []
        for c in range(group.num_columns):
            col = group.column(c)
            first = col.dictionary_page_offset if col.has_dictionary_page else col.data_page_offset
            starts.append(first)
            ends.append(first + col.total_compressed_size)
        out.append((min(starts), max(ends)))
    return out


def read_log(directory: str) -> list[tuple[str, int, int]]:
    """Every GET the processes logged under ``directory``: (path, first byte, length)."""
    reads = []
    for name in sorted(os.listdir(directory)):
        with open(os.path.join(directory, name)) as handle:
            for line in handle:
                path, start, nbytes = line.rstrip("\n").split("\t")
                reads.append((path, int(start), int(nbytes)))
    return reads


def read_summary(reads: list[tuple[str, int, int]], committed: Ranges) -> dict[str, int]:
    """Bytes read; of the data GETs, bytes inside committed input and GETs that start inside it.

    A GET of a file's last ``FOOTER_READ`` bytes or fewer is pyarrow reading the footer (its
    default speculative read), metadata whatever row group its first bytes belong to: counted
    apart.
    """
    sizes = {path: os.path.getsize(path) for path, _, _ in reads}
    footer = [(p, s, n) for p, s, n in reads if s + n == sizes[p] and n <= FOOTER_READ]
    overlap = aimed = 0
    for path, start, nbytes in reads:
        if (path, start, nbytes) in footer:
            continue
        for a, b in committed.get(path, []):
            overlap += max(0, min(b, start + nbytes) - max(a, start))
            aimed += a <= start < b
    return {
        "gets": len(reads),
        "bytes_read": sum(n for _, _, n in reads),
        "footer_gets": len(footer),
        "footer_bytes": sum(n for _, _, n in footer),
        "committed_bytes_reread": overlap,
        "gets_starting_in_committed": aimed,
    }


def total_bytes(ranges: Ranges) -> int:
    return sum(b - a for spans in ranges.values() for a, b in spans)


# -- processes ------------------------------------------------------------------------------------


def kill_tree(pid: int) -> int:
    """SIGKILL ``pid`` and every descendant (Ray's raylet, GCS and workers; antbatch's preprocess
    children); returns how many processes were killed once all are gone."""
    try:
        root = psutil.Process(pid)
        procs = [root, *root.children(recursive=True)]
    except psutil.NoSuchProcess:
        return 0
    for proc in procs:
        try:
            proc.kill()
        except psutil.NoSuchProcess:
            pass
    _, alive = psutil.wait_procs(procs, timeout=10)
    if alive:
        raise RuntimeError(f"processes survived SIGKILL: {[p.pid for p in alive]}")
    return len(procs)


def kill_at(proc: subprocess.Popen[bytes], progress: Callable[[], int], target: int, started: float) -> dict[str, Any]:
    """Poll ``progress`` (rows committed) and kill the process tree once it reaches ``target``."""
    while progress() < target:
        if proc.poll() is not None:
            raise RuntimeError(f"the job ended (exit {proc.returncode}) before {target} rows were committed")
        if time.time() - started > RUN_TIMEOUT_S:
            kill_tree(proc.pid)
            raise RuntimeError(f"fewer than {target} rows committed after {RUN_TIMEOUT_S} s: killed")
        time.sleep(POLL_S)
    killed_at = time.time() - started
    killed = kill_tree(proc.pid)
    proc.wait()
    return {"killed_after_s": round(killed_at, 2), "processes_killed": killed}


def run_timed(cmd: list[str], env: dict[str, str], log_path: str) -> tuple[float, str]:
    """Run to completion (its tree killed past ``RUN_TIMEOUT_S``); wall seconds and stdout."""
    started = time.time()
    with open(log_path, "a") as log:
        proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=log, text=True)
        try:
            out, _ = proc.communicate(timeout=RUN_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            kill_tree(proc.pid)
            raise RuntimeError(f"{' '.join(cmd[:4])}... hung for {RUN_TIMEOUT_S} s: killed; see {log_path}") from None
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd[:4])}... failed (exit {proc.returncode}); see {log_path}")
    return time.time() - started, out


def output_check(directory: str, rows: int) -> dict[str, int]:
    """The output as a reader of the directory sees it, joined on id."""
    ids = read_output(directory)["id"].to_numpy()
    unique = np.unique(ids)
    return {
        "rows_in_output": len(ids),
        "duplicates": len(ids) - len(unique),
        "missing": rows - int(np.isin(np.arange(rows), unique).sum()),
    }


# -- antbatch -------------------------------------------------------------------------------------


class AntbatchJob:
    """One antbatch job (plan + one worker) through the CLI, in an output folder of its own."""

    def __init__(self, work: str, input_dir: str, profile: Profile, env: dict[str, str], name: str) -> None:
        self.output = os.path.join(work, "out", name)
        self.state = os.path.join(self.output, "_antbatch", "attempt-000")
        self.log = os.path.join(work, f"{name}.log")
        self.env = {**env, "OMP_NUM_THREADS": str(CPUS), "MKL_NUM_THREADS": str(CPUS)}
        fields = job_fields("single")
        self.plan_args = [
            *("--input", "latency://" + input_dir, "--output", self.output, "--model", fields["model"]),
            *("--preprocess", fields["preprocess"], "--postprocess", fields["postprocess"]),
            *("--id-column", fields["id_column"], "--batch-size", str(profile.batch_size)),
            *("--max-shard-rows", str(profile.max_shard_rows), "--json"),
        ]

    def cli(self, *args: str) -> list[str]:
        return [sys.executable, "-c", ANTBATCH_CLI, *args]

    def worker_cmd(self, plan_uri: str, summary: str) -> list[str]:
        return self.cli(
            "worker", "--spec", plan_uri, "--worker-id", "w0", "--cpu-budget", str(CPUS), "--summary-file", summary
        )

    def plan(self, env: dict[str, str]) -> tuple[float, str]:
        seconds, out = run_timed(self.cli("plan", *self.plan_args), env, self.log)
        return seconds, str(json.loads(out)["plan_uri"])

    def commits(self) -> dict[str, int]:
        """Committed shard -> rows, from the ledger's commit records (``commits/<hh>/<shard>.json``)."""
        out = {}
        for path in glob.glob(os.path.join(self.state, layout.COMMITS_DIR, "*", "*.json")):
            try:
                with open(path) as handle:
                    out[os.path.basename(path).removesuffix(".json")] = int(json.load(handle)["rows"])
            except (OSError, ValueError, KeyError):
                continue  # being created: counted at the next poll
        return out

    def claimed(self) -> set[str]:
        """Shards with a claim (``claims/<hh>/<shard>/``)."""
        return {os.path.basename(p) for p in glob.glob(os.path.join(self.state, layout.CLAIMS_DIR, "*", "*"))}

    def shard_ranges(self) -> dict[str, tuple[int, Ranges]]:
        """Shard id -> (planned rows, its row groups' byte ranges by local path), from the plan."""
        with open(os.path.join(self.state, layout.PLAN_FILE), "rb") as handle:
            plan = JobPlan.from_bytes(handle.read(), source=handle.name)
        out: dict[str, tuple[int, Ranges]] = {}
        for shard in plan.shards:
            ranges: Ranges = {}
            for piece in shard.pieces:
                path = piece.path.removeprefix("latency://")
                groups = row_group_ranges(path)
                ranges.setdefault(path, []).extend(groups[g] for g in piece.row_groups or ())
            out[shard.shard_id] = (sum(p.rows or 0 for p in shard.pieces), ranges)
        return out


def run_antbatch(work: str, input_dir: str, profile: Profile, env: dict[str, str], rows: int) -> dict[str, Any]:
    """Killed run, resumed rerun, and a from-scratch run into an empty output."""
    job = AntbatchJob(work, input_dir, profile, env, "antbatch")
    _, plan_uri = job.plan(job.env)
    started = time.time()
    with open(job.log, "a") as log:
        proc = subprocess.Popen(
            job.worker_cmd(plan_uri, os.path.join(work, "antbatch-killed.json")),
            cwd=REPO,
            env=job.env,
            stdout=log,
            stderr=subprocess.STDOUT,
        )
        kill = kill_at(proc, lambda: sum(job.commits().values()), rows // 2, started)
    committed = job.commits()
    shards = job.shard_ranges()
    in_flight = job.claimed() - committed.keys()
    committed_ranges: Ranges = {}
    for shard_id in committed:
        for path, spans in shards[shard_id][1].items():
            committed_ranges.setdefault(path, []).extend(spans)
    at_kill = {
        **kill,
        "shards": len(shards),
        "shards_committed": len(committed),
        "rows_committed": sum(committed.values()),
        "shards_in_flight": len(in_flight),
        "rows_in_flight": sum(shards[s][0] for s in in_flight),
        "committed_input_bytes": total_bytes(committed_ranges),
    }
    resumed = _antbatch_rerun(job, work, "resume", committed_ranges, rows)
    scratch_job = AntbatchJob(work, input_dir, profile, env, "antbatch-scratch")
    scratch = _antbatch_rerun(scratch_job, work, "scratch", committed_ranges, rows)
    return {"at_kill": at_kill, "resume": resumed, "scratch": scratch}


def _antbatch_rerun(job: AntbatchJob, work: str, tag: str, committed: Ranges, rows: int) -> dict[str, Any]:
    reads = os.path.join(work, f"reads-antbatch-{tag}")
    os.makedirs(reads)
    env = {**job.env, READ_LOG_ENV: reads}
    summary_path = os.path.join(work, f"antbatch-{tag}.json")
    plan_s, plan_uri = job.plan(env)
    worker_s, _ = run_timed(job.worker_cmd(plan_uri, summary_path), env, job.log)
    with open(summary_path) as handle:
        summary = json.load(handle)
    return {
        "wall_s": round(plan_s + worker_s, 2),
        "plan_wall_s": round(plan_s, 2),
        "worker_wall_s": round(worker_s, 2),
        "worker_reported_s": round(summary["seconds"], 2),
        "rows_committed": summary["rows_committed"],
        "shards_committed": summary["shards_committed"],
        "shards_skipped": summary["shards_skipped"],
        "tries_wasted": summary["shards_lost"] + summary["shards_failed"],
        "reads": read_summary(read_log(reads), committed),
        "output": output_check(job.output, rows),
    }


# -- Ray Data -------------------------------------------------------------------------------------


class RayJob:
    """One Ray Data driver (bench/systems/ray_resume.py) with or without a checkpoint folder."""

    def __init__(
        self, work: str, input_dir: str, profile: Profile, env: dict[str, str], name: str, checkpoint: bool
    ) -> None:
        self.name = name
        self.output = os.path.join(work, "out", name)
        self.checkpoint = os.path.join(work, f"{name}-checkpoint") if checkpoint else None
        self.timing = os.path.join(work, f"{name}-actors")
        self.log = os.path.join(work, f"{name}.log")
        threads = str(RAY_BEST["threads"])
        self.env = {
            **env,
            "OMP_NUM_THREADS": threads,
            "MKL_NUM_THREADS": threads,
            "RAY_DEDUP_LOGS": "0",
            # Ray 2.60 packs Parquet row groups into read tasks of up to this many bytes (default
            # 128 MiB: this whole input in one task, one block, one write, one checkpoint). The
            # largest row group makes it one row group per read task, write task and checkpoint:
            # antbatch's shards here.
            "RAY_DATA_PARQUET_BIN_PACKING_BYTES": str(largest_row_group(input_dir)),
        }
        self.config: dict[str, Any] = {
            "system": "ray",
            "workload": "single",
            "input_dir": input_dir,
            "output_dir": self.output,
            "result_path": os.path.join(work, f"{name}-result.json"),
            "batch_size": profile.batch_size,
            "threads": RAY_BEST["threads"],
            "options": {
                **{k: RAY_BEST[k] for k in ("pre_cpus", "actor_cpus")},
                "num_cpus": RAY_LOGICAL_CPUS,
                "checkpoint_dir": self.checkpoint,
                "timing_dir": self.timing,
            },
        }

    def cmd(self) -> list[str]:
        return [RAY_PYTHON, "-m", "bench.systems.ray_resume", json.dumps(self.config)]

    def committed_ids(self) -> np.ndarray:
        """Ids in committed checkpoint files (pending ones are rolled back by the rerun)."""
        if self.checkpoint is None or not os.path.isdir(self.checkpoint):
            return np.array([], dtype=np.int64)
        parts = []
        for name in os.listdir(self.checkpoint):
            if name.endswith(".parquet") and not name.endswith(".pending.parquet"):
                try:
                    parts.append(pq.read_table(os.path.join(self.checkpoint, name))["id"].to_numpy())
                except OSError:
                    continue  # being written: counted at the next poll
        return np.concatenate(parts) if parts else np.array([], dtype=np.int64)


def largest_row_group(input_dir: str) -> int:
    """Uncompressed bytes of the input's largest row group."""
    sizes: list[int] = []
    for name in os.listdir(input_dir):
        if name.endswith(".parquet"):
            meta = pq.read_metadata(os.path.join(input_dir, name))
            sizes.extend(meta.row_group(g).total_byte_size for g in range(meta.num_row_groups))
    return int(max(sizes))


def committed_row_groups(input_dir: str, ids: np.ndarray) -> Ranges:
    """The row groups every one of whose ids is committed, as byte ranges."""
    out: Ranges = {}
    for name in sorted(os.listdir(input_dir)):
        if not name.endswith(".parquet"):
            continue
        path = os.path.join(input_dir, name)
        handle = pq.ParquetFile(path)
        spans = row_group_ranges(path)
        for g in range(handle.num_row_groups):
            group_ids = handle.read_row_group(g, columns=["id"])["id"].to_numpy()
            if np.isin(group_ids, ids).all():
                out.setdefault(path, []).append(spans[g])
    return out


def run_ray(work: str, input_dir: str, profile: Profile, env: dict[str, str], rows: int) -> dict[str, Any]:
    job = RayJob(work, input_dir, profile, env, "ray", checkpoint=True)
    started = time.time()
    with open(job.log, "a") as log:
        proc = subprocess.Popen(job.cmd(), cwd=REPO, env=job.env, stdout=log, stderr=subprocess.STDOUT)
        kill = kill_at(proc, lambda: len(job.committed_ids()), rows // 2, started)
    ids = job.committed_ids()
    committed = committed_row_groups(input_dir, ids)
    scored = rows_scored(job.timing)
    at_kill = {
        **kill,
        "rows_committed": len(ids),
        "rows_scored_uncommitted": scored - len(ids),
        "committed_input_bytes": total_bytes(committed),
        "row_groups_committed": sum(len(v) for v in committed.values()),
    }
    resumed = _ray_rerun(job, work, "resume", committed, rows)
    scratch = _ray_rerun(
        RayJob(work, input_dir, profile, env, "ray-scratch", checkpoint=False), work, "scratch", committed, rows
    )
    return {"at_kill": at_kill, "resume": resumed, "scratch": scratch}


def _ray_rerun(job: RayJob, work: str, tag: str, committed: Ranges, rows: int) -> dict[str, Any]:
    reads = os.path.join(work, f"reads-ray-{tag}")
    os.makedirs(reads)
    wall_s, _ = run_timed(job.cmd(), {**job.env, READ_LOG_ENV: reads}, job.log)
    with open(job.config["result_path"]) as handle:
        result = json.load(handle)
    return {
        "wall_s": round(wall_s, 2),
        "ray_num_cpus": job.config["options"]["num_cpus"],
        "startup_s": round(result["startup_s"], 2),
        "job_s": round(result["run_s"], 2),
        "rows_scored": result["rows_scored"],
        "reads": read_summary(read_log(reads), committed),
        "output": output_check(job.output, rows),
    }


# -- main -----------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.resume", description=__doc__)
    parser.add_argument("--quick", action="store_true", help="2,048 rows instead of 8,192 (a few minutes)")
    parser.add_argument("--systems", default="antbatch,ray", help="comma-separated subset of antbatch,ray")
    parser.add_argument("--work", default=os.environ.get("ANTBATCH_BENCH_WORK", "/tmp/antbatch-bench"))
    parser.add_argument("--out", help="default: bench/results/resume.json (resume-quick.json with --quick)")
    parser.add_argument("--no-report", action="store_true", help="do not rewrite docs/benchmarks.md (bench.docgen)")
    parser.add_argument("--keep", action="store_true", help="keep this run's outputs, logs and read logs")
    args = parser.parse_args(argv)

    profile = RESUME_PROFILES["quick" if args.quick else "full"]
    args.out = args.out or os.path.join(RESULTS, "resume-quick.json" if args.quick else "resume.json")
    systems = set(args.systems.split(","))
    with_ray = "ray" in systems and os.path.exists(RAY_PYTHON)
    if "ray" in systems and not with_ray:
        print(f"warning: {RAY_PYTHON} missing (make bench-venv); Ray Data is left out", file=sys.stderr)
    env = {
        **os.environ,
        "PYTHONPATH": REPO + os.pathsep + os.environ.get("PYTHONPATH", ""),
        **latency_env(),
        "OMP_WAIT_POLICY": "PASSIVE",
    }
    work = os.path.join(args.work, f"resume-{profile.name}-{os.getpid()}")
    os.makedirs(work)
    files = write_text(os.path.join(args.work, "data"), profile.data)
    input_dir = os.path.dirname(files[0])
    rows = profile.data.rows
    began = time.time()
    report: dict[str, Any] = {
        "profile": profile.name,
        "command": f"python -m bench.resume{' --quick' if args.quick else ''}",
        "machine": machine(),
        "git": git_state(),
        "data": {**dataclasses.asdict(profile.data), "input_bytes": sum(os.path.getsize(f) for f in files)},
        "max_shard_rows": profile.max_shard_rows,
        "batch_size": profile.batch_size,
        "latency": {k.lower(): env[f"ANTBATCH_BENCH_{k}"] for k in ("LATENCY_S", "BANDWIDTH_MBS", "BLOCK_MB")},
        "load_avg_before": [round(x, 2) for x in os.getloadavg()],
    }
    if "antbatch" in systems:
        report["antbatch"] = run_antbatch(work, input_dir, profile, env, rows)
        report["antbatch"]["load_avg_after"] = [round(x, 2) for x in os.getloadavg()]
        print(f"[{time.time() - began:6.1f}s] antbatch done", flush=True)
    if with_ray:
        report["ray"] = run_ray(work, input_dir, profile, env, rows)
        report["ray"]["load_avg_after"] = [round(x, 2) for x in os.getloadavg()]
        print(f"[{time.time() - began:6.1f}s] ray done", flush=True)
    report["load_avg_after"] = [round(x, 2) for x in os.getloadavg()]
    report["wall_s"] = round(time.time() - began, 1)
    report["finished_at"] = time.strftime("%Y-%m-%d %H:%M:%S %Z")

    from bench import docgen
    from bench.resume_report import bars, text_table

    report["bars"] = bars(report)
    print(text_table(report))
    print(f"wrote {args.out} in {report['wall_s']:.0f}s")
    if not args.keep:
        shutil.rmtree(work, ignore_errors=True)
    return docgen.write_result(args.out, report, regenerate=not args.no_report)


if __name__ == "__main__":
    raise SystemExit(main())
