"""Tried as a new user would (issue 16): ``python -m bench.newuser [--quick]`` (``make bench-newuser``).

The job of ``bench/newuser_code.py`` (tabular rows in 60 small Parquet files, a pure-Python
feature-hashing preprocess, an MLP) run three ways, each as a whole process timed from its
start to its exit, every setting at its default: ``antbatch run``, the plain loop a user
writes (``bench/newuser_loop.py``) and Ray Data (``bench/newuser_ray.py``, in bench/.venv-ray;
left out when that environment is missing). Systems run one at a time, interleaved, their
order rotating from repeat to repeat, on 120,000 and 600,000 rows; medians go into
``bench/results/newuser.json`` with the ratios, antbatch's time from its start to its first
scored batch, a bare ``import torch`` timed in each repeat beside them, and the worker's stage timings (where a
bar is missed, they say why). Full: 3 repeats, about 6 minutes on a quiet 2-core machine (Ray
Data takes most of it); ``--quick``: 1 repeat of the short job, about 1 minute.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from typing import Any

import pyarrow.parquet as pq

from bench.newuser_code import write_data
from bench.newuser_report import render
from bench.run import git_state, machine

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RAY_PYTHON = os.path.join(REPO, "bench", ".venv-ray", "bin", "python")
RESULT = os.path.join(REPO, "bench", "results", "newuser.json")
SIZES = (120_000, 600_000)
HOOKS = "bench.newuser_code"


def commands(system: str, input_dir: str, output_dir: str) -> list[str]:
    """The whole command a user runs for ``system``: defaults everywhere."""
    if system == "antbatch":
        return [
            sys.executable,
            "-m",
            "airflow_antbatch",
            "run",
            "--input",
            input_dir,
            "--output",
            output_dir,
            "--model",
            f"{HOOKS}:build_model",
            "--preprocess",
            f"{HOOKS}:features",
            "--postprocess",
            f"{HOOKS}:scores",
            "--id-column",
            "id",
            "--json",
        ]
    if system == "loop":
        return [sys.executable, "-m", "bench.newuser_loop", input_dir, output_dir]
    if system == "ray":
        return [RAY_PYTHON, "-m", "bench.newuser_ray", input_dir, output_dir]
    if system == "torch-import":
        return [sys.executable, "-c", "import torch"]
    raise ValueError(f"unknown system {system!r}")


def run_once(system: str, input_dir: str, output_dir: str, env: dict[str, str]) -> dict[str, Any]:
    """One whole process, timed from before its start to after its exit; its output checked."""
    shutil.rmtree(output_dir, ignore_errors=True)
    started = time.perf_counter()
    proc = subprocess.run(commands(system, input_dir, output_dir), env=env, capture_output=True, text=True, cwd=REPO)
    seconds = time.perf_counter() - started
    if proc.returncode != 0:
        raise RuntimeError(f"{system} failed with exit code {proc.returncode}:\n{proc.stderr[-3000:]}")
    run: dict[str, Any] = {"seconds": round(seconds, 3)}
    if system == "antbatch":
        summary = json.loads(proc.stdout)["workers"][0]["summary"]
        run.update(
            time_to_first_batch_s=summary["time_to_first_batch_s"],
            worker_s=round(summary["seconds"], 3),
            preprocess_processes=summary["preprocess_processes"],
            stages=summary["stages"],
            scaling=[d["reason"] for d in summary["scaling"]],
        )
    if system != "torch-import":
        run["rows"] = _output_rows(output_dir)
    return run


def _output_rows(output_dir: str) -> int:
    """Rows in the top-level Parquet files of an output folder (antbatch's state lies in a subfolder)."""
    names = [n for n in os.listdir(output_dir) if n.endswith(".parquet")]
    return sum(pq.read_metadata(os.path.join(output_dir, n)).num_rows for n in names)


def run_size(rows: int, systems: list[str], repeats: int, work: str, env: dict[str, str]) -> dict[str, Any]:
    """Every system on one size, ``repeats`` times, interleaved with a rotating order."""
    input_dir = os.path.join(work, f"input-{rows}")
    write_data(input_dir, rows)
    runs: dict[str, list[dict[str, Any]]] = {s: [] for s in [*systems, "torch-import"]}
    for repeat in range(repeats):
        order = systems[repeat % len(systems) :] + systems[: repeat % len(systems)]
        for system in [*order, "torch-import"]:  # the bar's yardstick, timed amid the same load
            run = run_once(system, input_dir, os.path.join(work, f"out-{system}"), env)
            if run.get("rows", rows) != rows:
                raise RuntimeError(f"{system} wrote {run['rows']} rows of {rows}")
            runs[system].append(run)
            print(f"{rows} rows, repeat {repeat + 1}: {system} {run['seconds']:.2f} s", file=sys.stderr)
    medians = {s: statistics.median(r["seconds"] for r in runs[s]) for s in systems}
    torch_import = statistics.median(r["seconds"] for r in runs.pop("torch-import"))
    out: dict[str, Any] = {"rows": rows, "files": 60, "median_s": medians, "torch_import_s": torch_import, "runs": runs}
    antbatch = medians["antbatch"]
    ratios = {"antbatch_vs_loop": round(medians["loop"] / antbatch, 3)}
    if "ray" in medians:
        ratios["antbatch_vs_ray"] = round(medians["ray"] / antbatch, 3)
    out["ratios"] = ratios
    out["time_to_first_batch_s"] = statistics.median(r["time_to_first_batch_s"] for r in runs["antbatch"])
    return out


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="one repeat of the short job (about a minute)")
    parser.add_argument("--repeats", type=int, help="default: 3 (1 with --quick)")
    parser.add_argument("--no-ray", action="store_true", help="leave Ray Data out")
    parser.add_argument(
        "--rows",
        help="comma-separated job sizes run instead of the profile's (600000: the long job alone); "
        "the result then goes to --output or, by default, the temp folder, not bench/results",
    )
    parser.add_argument("--output")
    args = parser.parse_args(argv)
    repeats = args.repeats or (1 if args.quick else 3)
    sizes = tuple(int(n) for n in args.rows.split(",")) if args.rows else SIZES[:1] if args.quick else SIZES
    output = args.output or (
        os.path.join(tempfile.gettempdir(), f"antbatch-newuser-{args.rows.replace(',', '-')}.json")
        if args.rows
        else RESULT
    )
    systems = ["antbatch", "loop"] + ([] if args.no_ray or not os.path.exists(RAY_PYTHON) else ["ray"])
    env = {**os.environ, "PYTHONPATH": REPO}
    started = time.time()
    load_before = os.getloadavg()
    with tempfile.TemporaryDirectory(prefix="antbatch-newuser-") as work:
        results = [run_size(rows, systems, repeats, work, env) for rows in sizes]
    doc = {
        "command": "python -m bench.newuser"
        + (" --quick" if args.quick else "")
        + (f" --rows {args.rows}" if args.rows else ""),
        "finished_at": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime()),
        "wall_s": round(time.time() - started, 1),
        "load_avg_before": [round(x, 2) for x in load_before],
        "profile": "quick" if args.quick else "full",
        "repeats": repeats,
        "systems": systems,
        "sizes": results,
        "bars": {"short_vs_loop": 1.0, "long_vs_loop": 1.2, "vs_ray": 1.2, "first_batch_over_torch_import_s": 1.5},
        "machine": machine(),
        "load_avg_after": [round(x, 2) for x in os.getloadavg()],
        "git": git_state(),
    }
    os.makedirs(os.path.dirname(output) or ".", exist_ok=True)
    with open(output, "w") as handle:
        json.dump(doc, handle, indent=1)
        handle.write("\n")
    print(render(doc))


if __name__ == "__main__":
    main()
