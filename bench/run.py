"""The benchmark harness: ``python -m bench.run [--quick]``.

Generates the data, then for each repeat runs every system on every workload, each in a fresh
process watched by a process-tree monitor, in an order that rotates from repeat to repeat
(interleaved, so drift in the machine's load hits every system alike). Then the straggler
job. Medians go into ``bench/results/{quick,full}.json``; the table is printed, docs/benchmarks.png
is redrawn (``bench.report``) and docs/benchmarks.md's generated blocks rewritten (``bench.docgen``).
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import time
from typing import Any

from bench.config import CPU_WORKLOADS, PROFILES, Profile
from bench.data import write_text
from bench.latencyfs import latency_env
from bench.monitor import TreeMonitor
from bench.workloads import DEVICE_S_PER_ROW_ENV, MODELS

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RAY_PYTHON = os.path.join(REPO, "bench", ".venv-ray", "bin", "python")
RESULTS = os.path.join(REPO, "bench", "results")
CPUS = os.cpu_count() or 1


@dataclasses.dataclass(frozen=True)
class Variant:
    """One configuration of one system: what to run and with which thread settings."""

    name: str  # naive-t1, antbatch, ray, bound, ...
    system: str  # naive | antbatch | ray | bound
    module: str
    threads: int
    options: dict[str, Any]
    python: str = sys.executable
    wait_policy: str | None = "PASSIVE"  # None: OpenMP's own default (threads spin a while before sleeping)

    def env(self, base: dict[str, str]) -> dict[str, str]:
        """Thread settings fixed before torch starts: OMP/MKL threads and the OpenMP wait policy."""
        env = {**base, "OMP_NUM_THREADS": str(self.threads), "MKL_NUM_THREADS": str(self.threads)}
        env.pop("OMP_WAIT_POLICY", None)
        if self.wait_policy:
            env["OMP_WAIT_POLICY"] = self.wait_policy
        return env


DEFAULT_WAIT = "-ompdefault"  # the suffix of a variant run with OpenMP's default wait policy


def variants(profile: Profile, workload: str, with_ray: bool) -> list[Variant]:
    """Every configuration run on ``workload``. The naive loop and the bound run with and without
    OMP_WAIT_POLICY=PASSIVE wherever torch has more than one thread (a passive wait helps processes
    that share cores and hurts a lone one): each system's best counts. On the device workloads
    the models are simulated, so torch's threads do not matter and there is no bound."""
    device = workload not in CPU_WORKLOADS
    naive_threads = (1,) if device else profile.naive_threads
    out = [Variant(f"naive-t{t}", "naive", "bench.systems.naive", t, {}) for t in naive_threads]
    out += [
        Variant(f"naive-t{t}{DEFAULT_WAIT}", "naive", "bench.systems.naive", t, {}, wait_policy=None)
        for t in naive_threads
        if t > 1
    ]
    antbatch = {"cpu_budget": CPUS, "max_shard_rows": profile.max_shard_rows}
    out.append(Variant("antbatch", "antbatch", "bench.systems.antbatch", CPUS, antbatch))
    # Preprocessing in the worker's own thread: no process pool to start. The simulated devices
    # leave it the GIL; on a CPU workload the jobs here are seconds long, and the pool's start
    # (its forkserver imports torch) takes a core for about one of them.
    pre_thread = {**antbatch, "preprocess_workers": 0}
    out.append(Variant("antbatch-pre-thread", "antbatch", "bench.systems.antbatch", CPUS, pre_thread))
    if with_ray:
        for ray in profile.ray_variants:
            if ray.get("chain_mode") == "split" and len(MODELS[workload]) == 1:
                continue
            if workload not in ray.get("workloads", (workload,)):
                continue
            out.append(Variant(ray["name"], "ray", "bench.systems.ray_data", int(ray["threads"]), ray, RAY_PYTHON))
    if not device:
        bound = {"thread_settings": [1, CPUS], "batches": profile.bound_batches}
        out.append(Variant("bound", "bound", "bench.systems.bound", CPUS, bound))
        out.append(Variant(f"bound{DEFAULT_WAIT}", "bound", "bench.systems.bound", CPUS, bound, wait_policy=None))
    return out


def run_variant(
    variant: Variant, workload: str, input_dir: str, work: str, profile: Profile, env: dict[str, str]
) -> dict[str, Any]:
    """One fresh process for one run; its result with the monitor's CPU and memory figures."""
    tag = f"{workload}-{variant.name}"
    config = {
        "system": variant.system,
        "workload": workload,
        "input_dir": input_dir,
        "output_dir": os.path.join(work, "out", tag),
        "result_path": os.path.join(work, f"{tag}.json"),
        "batch_size": profile.batch_size,
        "threads": variant.threads,
        "options": variant.options,
    }
    if os.path.exists(config["result_path"]):
        os.remove(config["result_path"])
    started = time.time()
    with open(os.path.join(work, f"{tag}.log"), "w") as log:
        proc = subprocess.Popen(
            [variant.python, "-m", variant.module, json.dumps(config)],
            cwd=REPO,
            env=variant.env(env),
            stdout=log,
            stderr=subprocess.STDOUT,
        )
        with TreeMonitor(proc.pid) as monitor:
            code = proc.wait()
    if code != 0 or not os.path.exists(config["result_path"]):
        raise RuntimeError(f"{tag} failed (exit {code}); see {work}/{tag}.log")
    with open(config["result_path"]) as handle:
        result: dict[str, Any] = json.load(handle)
    start, end = result["window"]
    result.update(
        variant=variant.name,
        rows_s=result["rows"] / result["run_s"],
        cpu_util=monitor.utilisation(start, end, CPUS),
        peak_rss_mb=monitor.peak_rss_mb,
        max_processes=monitor.max_processes,
        process_wall_s=time.time() - started,
    )
    return result


def verify_outputs(
    work: str, workload: str, by_variant: dict[str, list[dict[str, Any]]], rows: int
) -> dict[str, Any] | None:
    """The last repeat's outputs of every system that writes one, checked against the naive loop's."""
    from bench.verify import compare

    writers = {n: os.path.join(work, "out", f"{workload}-{n}") for n in by_variant if not n.startswith("bound")}
    reference = next((n for n in writers if n.startswith("naive")), None)
    if reference is None:
        return None
    result = compare(writers, reference, rows)
    if not result["all_agree"]:
        print(f"warning: {workload}: the systems' outputs disagree: {result}", file=sys.stderr)
    return result


def _median(values: list[float]) -> float:
    return statistics.median(values) if values else float("nan")


def summarise_variant(runs: list[dict[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {
        "rows_s": round(_median([r["rows_s"] for r in runs]), 1),
        "rows_s_runs": [round(r["rows_s"], 1) for r in runs],
        "run_s": round(_median([r["run_s"] for r in runs]), 3),
        "startup_s": round(_median([r["startup_s"] for r in runs]), 3),
        "cpu_util": round(_median([r["cpu_util"] for r in runs]), 3),
        "peak_rss_mb": round(max(r["peak_rss_mb"] for r in runs), 1),
        "max_processes": max(r["max_processes"] for r in runs),
        "rows": runs[0]["rows"],
        "batch_size": runs[0]["batch_size"],
        "threads": runs[-1].get("threads"),
    }
    if "stages_s" in runs[0]:
        batches = -(-runs[0]["rows"] // runs[0]["batch_size"])
        out["stages_s_per_batch"] = {
            stage: round(_median([r["stages_s"][stage] for r in runs]) / batches, 4) for stage in runs[0]["stages_s"]
        }
    if "stages" in runs[-1]:
        out["stages"] = runs[-1]["stages"]
    if "rows_s_excluding_pool_start" in runs[0]:
        out["rows_s_excluding_pool_start"] = round(_median([r["rows_s_excluding_pool_start"] for r in runs]), 1)
    if "rows_s_by_threads" in runs[0]:
        out["rows_s_by_threads"] = {
            k: round(_median([r["rows_s_by_threads"][k] for r in runs]), 1) for k in runs[0]["rows_s_by_threads"]
        }
    for key in (
        "plan_s",
        "model_load_s",
        "code_load_and_pool_start_s",
        "worker_reported_s",
        "shards",
        "requests",
        "worker_kwargs",
        "actors",
    ):
        if key in runs[-1]:
            out[key] = runs[-1][key]
    return out


def summarise_workload(
    workload: str, by_variant: dict[str, dict[str, Any]], device_s_per_row: float | None
) -> dict[str, Any]:
    """The flat figures the bars are judged on: each system at its best, the ceiling, ratios."""

    def best(system: str) -> str | None:
        names = [n for n in by_variant if n.startswith(system)]
        return max(names, key=lambda n: by_variant[n]["rows_s"]) if names else None

    naive, ray, bound, antbatch = best("naive"), best("ray"), best("bound"), best("antbatch")
    assert antbatch is not None
    pick = {"naive": naive, "antbatch": antbatch, "ray": ray, "bound": bound}
    out: dict[str, Any] = {}
    for system, name in pick.items():
        out[f"{system}_rows_s"] = by_variant[name]["rows_s"] if name else None
    out["naive_best_variant"] = naive
    out["antbatch_best_variant"] = antbatch
    out["ray_best_variant"] = ray
    out["bound_best_variant"] = bound
    out["cpu_util"] = {s: by_variant[n]["cpu_util"] for s, n in pick.items() if n}
    out["peak_rss_mb"] = {s: by_variant[n]["peak_rss_mb"] for s, n in pick.items() if n}
    out["startup_s"] = {s: by_variant[n]["startup_s"] for s, n in pick.items() if n}
    out["threads"] = {s: by_variant[n]["threads"] for s, n in pick.items() if n}
    if naive:
        out["naive_stages_s_per_batch"] = by_variant[naive].get("stages_s_per_batch")
    out["ceiling"] = ceiling(by_variant, naive, len(MODELS[workload]) if device_s_per_row else 0)
    out["ceiling_rows_s"] = out["ceiling"]["rows_s"] if out["ceiling"] else None
    out["device_s_per_row"] = device_s_per_row
    out["antbatch_rows_s_excluding_pool_start"] = by_variant[antbatch].get("rows_s_excluding_pool_start")
    actors = by_variant[ray].get("actors") if ray else None
    if actors and ray:
        # Ray's steady state: its rate once its last model actor had started (the reads and
        # preprocessing done before then are not charged, so it flatters Ray).
        ready = max(a["first_batch_after_s"] for a in actors)
        out["ray_rows_s_after_actor_ready"] = round(by_variant[ray]["rows"] / (by_variant[ray]["run_s"] - ready), 1)
    ant = out["antbatch_rows_s"]
    for key in ("naive", "ray", "bound", "ceiling"):
        other = out.get(f"{key}_rows_s")
        out[f"antbatch_over_{key}"] = round(ant / other, 3) if other else None
    steady = out.get("ray_rows_s_after_actor_ready")
    out["antbatch_over_ray_steady"] = round(ant / steady, 3) if steady else None
    out["variants"] = by_variant
    return out


def ceiling(by_variant: dict[str, dict[str, Any]], naive: str | None, devices: int) -> dict[str, Any] | None:
    """What no system can beat here, from the naive loop's stage times. On CPU models: every core
    busy with the work itself, the model at its most efficient per core-second (one thread, the
    best of the bound's runs). On ``devices`` simulated devices: the busier of one device (each
    serves every row; their time is off the CPU) and the CPU work spread over every core.
    """
    stages = by_variant.get(naive or "", {}).get("stages_s_per_batch")
    if not stages:
        return None
    batch = by_variant[naive or ""]["batch_size"]
    other_s = sum(v for k, v in stages.items() if k != "model")
    if devices:
        device_s = stages["model"] / devices
        rows_s = batch / max(device_s, other_s / CPUS)
        return {
            "rows_s": round(rows_s, 1),
            "over_naive": round(rows_s / by_variant[naive or ""]["rows_s"], 3),
            "s_per_batch": {"one_device": round(device_s, 4), "read_preprocess_post_write": round(other_s, 4)},
        }
    bounds = [v for n, v in by_variant.items() if n.startswith("bound") and "1" in v.get("rows_s_by_threads", {})]
    if not bounds:
        return None
    model_s = batch / max(v["rows_s_by_threads"]["1"] for v in bounds)
    rows_s = CPUS * batch / (model_s + other_s)
    return {
        "rows_s": round(rows_s, 1),
        "over_naive": round(rows_s / by_variant[naive or ""]["rows_s"], 3),
        "over_bound": round(rows_s / max(v["rows_s"] for v in bounds), 3),
        "core_s_per_batch": {"model_1_thread": round(model_s, 4), "read_preprocess_post_write": round(other_s, 4)},
    }


def machine() -> dict[str, Any]:
    import psutil

    return {
        "cpu_count": CPUS,
        "cpu_affinity": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else CPUS,
        "memory_gb": round(psutil.virtual_memory().total / 2**30, 1),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "processor": platform.processor() or platform.machine(),
    }


def git_state() -> dict[str, Any]:
    """Which antbatch the numbers are of: the commit, and whether the package had local changes."""

    def git(*args: str) -> str:
        try:
            return subprocess.run(["git", *args], cwd=REPO, capture_output=True, text=True, check=True).stdout.strip()
        except (OSError, subprocess.CalledProcessError):
            return ""

    return {
        "commit": git("rev-parse", "--short", "HEAD"),
        "subject": git("log", "-1", "--format=%s")[:120],
        "worker_commit": git("log", "-1", "--format=%h %s", "--", "airflow_antbatch/worker")[:140],
        "airflow_antbatch_modified": bool(git("status", "--porcelain", "--", "airflow_antbatch")),
    }


def calibrate_device(input_dir: str, batch_size: int, batches: int = 4) -> float:
    """Seconds per row that make a simulated device cost what the tokenizer costs: the fastest of
    a few batches of the device data (the least disturbed by other work), timed in this process
    on this machine now."""
    import pyarrow.parquet as pq

    from bench.workloads import tokenize

    path = sorted(os.path.join(input_dir, n) for n in os.listdir(input_dir) if n.endswith(".parquet"))[0]
    per_row = []
    for batch in list(pq.ParquetFile(path).iter_batches(batch_size=batch_size))[:batches]:
        started = time.perf_counter()
        tokenize(batch)
        per_row.append((time.perf_counter() - started) / batch.num_rows)
    return round(min(per_row), 7)


def wait_for_quiet(max_wait_s: float, threshold: float = 0.5) -> float:
    """Give other work on the machine a chance to finish; returns the 1-minute load average seen
    (at once, for a wait of 0)."""
    deadline = time.time() + max_wait_s
    load = os.getloadavg()[0]
    while load > threshold and time.time() < deadline:
        time.sleep(5)
        load = os.getloadavg()[0]
    return load


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.run", description=__doc__)
    parser.add_argument("--quick", action="store_true", help="the quick profile (fewer rows and repeats)")
    parser.add_argument("--repeats", type=int, help="override the profile's repeats")
    parser.add_argument(
        "--workloads", default="single,chain,device_single,device_chain,straggler", help="comma-separated subset"
    )
    parser.add_argument("--no-ray", action="store_true", help="skip Ray Data (no bench/.venv-ray)")
    parser.add_argument("--work", default=os.environ.get("ANTBATCH_BENCH_WORK", "/tmp/antbatch-bench"))
    parser.add_argument("--out", help="result JSON (default bench/results/PROFILE.json)")
    parser.add_argument("--no-report", action="store_true", help="do not rewrite docs/benchmarks.md and the PNG")
    parser.add_argument("--keep", action="store_true", help="keep this run's outputs and logs under --work")
    parser.add_argument("--quiet-wait", type=float, default=0.0, help="wait up to this many seconds for load < 0.5")
    args = parser.parse_args(argv)

    profile = PROFILES["quick" if args.quick else "full"]
    if args.repeats:
        profile = dataclasses.replace(profile, repeats=args.repeats)
    workloads = [w for w in args.workloads.split(",") if w]
    with_ray = not args.no_ray and os.path.exists(RAY_PYTHON)
    if not with_ray and not args.no_ray:
        print(f"warning: {RAY_PYTHON} missing (make bench-venv); Ray Data is left out", file=sys.stderr)
    out_path = args.out or os.path.join(RESULTS, f"{profile.name}.json")
    load_before = wait_for_quiet(args.quiet_wait)
    began = time.time()  # after the wait: wall_s is the benchmark's own time
    env = {
        **os.environ,
        "PYTHONPATH": REPO + os.pathsep + os.environ.get("PYTHONPATH", ""),
        **latency_env(),
        "RAY_DEDUP_LOGS": "0",
    }
    # A folder of its own per run (outputs, logs, per-run results), so that runs side by side
    # never clobber each other; the generated data is shared and kept between runs.
    work = os.path.join(args.work, f"{profile.name}-{os.getpid()}")
    os.makedirs(work, exist_ok=True)
    inputs = {
        name: os.path.dirname(write_text(os.path.join(args.work, "data"), getattr(profile, name))[0])
        for name in MODELS
        if name in workloads
    }
    device = [w for w in inputs if w not in CPU_WORKLOADS]
    device_s_per_row = float(env.get(DEVICE_S_PER_ROW_ENV) or 0) or (
        calibrate_device(inputs[device[0]], profile.batch_size) if device else None
    )
    if device_s_per_row:
        env[DEVICE_S_PER_ROW_ENV] = repr(device_s_per_row)
        print(f"simulated devices: {device_s_per_row * 1e3:.3f} ms per row", flush=True)

    runs: dict[str, dict[str, list[dict[str, Any]]]] = {w: {} for w in inputs}
    for repeat in range(profile.repeats):
        for workload, input_dir in inputs.items():
            todo = variants(profile, workload, with_ray)
            if profile.bound_repeats is not None and repeat >= profile.bound_repeats:
                todo = [v for v in todo if v.system != "bound"]
            shift = repeat % len(todo)
            for variant in todo[shift:] + todo[:shift]:
                result = run_variant(variant, workload, input_dir, work, profile, env)
                runs[workload].setdefault(variant.name, []).append(result)
                print(
                    f"[{time.time() - began:6.1f}s] repeat {repeat + 1}/{profile.repeats} {workload:6s} "
                    f"{variant.name:16s} {result['rows_s']:8.1f} rows/s  cpu {result['cpu_util']:.0%}  "
                    f"rss {result['peak_rss_mb']:.0f} MB",
                    flush=True,
                )

    report: dict[str, Any] = {
        "profile": profile.name,
        "command": f"python -m bench.run{' --quick' if args.quick else ''}",
        "machine": machine(),
        "git": git_state(),
        "latency": {
            "first_byte_s": float(env["ANTBATCH_BENCH_LATENCY_S"]),
            "bandwidth_mbs": float(env["ANTBATCH_BENCH_BANDWIDTH_MBS"]),
            "block_mb": float(env["ANTBATCH_BENCH_BLOCK_MB"]),
            "output": "local disk for every system (the antbatch ledger needs atomic create: local, s3, memory)",
        },
        "config": profile.to_dict(),
        "load_avg_before": round(load_before, 2),
        "device_s_per_row": device_s_per_row,
    }
    for workload, by_variant in runs.items():
        per_row = device_s_per_row if workload not in CPU_WORKLOADS else None
        summaries = {n: summarise_variant(r) for n, r in by_variant.items()}
        report[workload] = summarise_workload(workload, summaries, per_row)
        report[workload]["outputs"] = verify_outputs(work, workload, by_variant, getattr(profile, workload).rows)
    if "straggler" in workloads:
        from bench import straggler

        # Its dynamic runs come first and its ideal from the static runs last: the tail of the
        # work before it (Ray's teardown) would slow only the former. In quick.json at 4d67f0b the
        # first two of three runs gave 1.060x and 1.058x the ideal, the third 1.021x, and runs of
        # make bench-straggler on the same code 1.018-1.028x.
        straggler_load = wait_for_quiet(args.quiet_wait)
        started = time.time()
        report["straggler"] = straggler.run(
            os.path.join(work, "straggler"), profile.straggler, {**env, "OMP_NUM_THREADS": "1"}
        )
        report["straggler"]["load_avg_before"] = round(straggler_load, 2)
        print(f"[{time.time() - began:6.1f}s] straggler done in {time.time() - started:.1f}s", flush=True)
    antbatch_peaks = [report[w]["peak_rss_mb"]["antbatch"] for w in inputs]
    report["peak_rss_mb"] = max(antbatch_peaks) if antbatch_peaks else None
    report["load_avg_after"] = round(os.getloadavg()[0], 2)
    report["wall_s"] = round(time.time() - began, 1)
    report["finished_at"] = time.strftime("%Y-%m-%d %H:%M:%S %Z")

    os.makedirs(os.path.dirname(out_path), exist_ok=True)
    with open(out_path, "w") as handle:
        json.dump(report, handle, indent=1, sort_keys=False)
    from bench.report import text_table

    print(text_table(report))
    print(f"wrote {out_path} in {report['wall_s']:.0f}s")
    if not args.keep:
        shutil.rmtree(work, ignore_errors=True)
    if not args.no_report:
        from bench import docgen

        render(out_path)
        docgen.main([])
    return 0


def render(result_path: str, module: str = "bench.report") -> None:
    """Rewrite the doc's results and the PNG (``module``'s ``main``): here if matplotlib is here,
    else in the Ray environment."""
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        if not os.path.exists(RAY_PYTHON):
            print("matplotlib missing and no bench/.venv-ray: docs not rewritten", file=sys.stderr)
            return
        subprocess.run([RAY_PYTHON, "-m", module, result_path], cwd=REPO, check=True)
        return
    importlib.import_module(module).main([result_path])


if __name__ == "__main__":
    raise SystemExit(main())
