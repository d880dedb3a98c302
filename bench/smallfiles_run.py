"""One measured step of the small-file benchmark, in a fresh process: ``python -m bench.smallfiles_run JSON``.

``{"step": "merge", ...}`` runs ``merge_small_files``; ``{"step": "job", ...}`` plans a job and
runs one antbatch worker over it (``plan_job`` + ``run_worker``, as ``bench/systems/antbatch.py``
does). Imports happen before the clock; the result JSON carries the timed window, so the
harness can line it up with the proxy's traffic and the machine's CPU.
"""

from __future__ import annotations

import json
import shutil
import sys
import time
from typing import Any


def merge(config: dict[str, Any]) -> dict[str, Any]:
    from airflow_antbatch.merge import merge_small_files

    started = time.time()
    result = merge_small_files(
        config["sources"],
        config["output_uri"],
        concurrency=config["concurrency"],
        storage_options=config["storage_options"],
        reader=config["reader"],
    )
    ended = time.time()
    out = result.to_dict()
    out.pop("unreadable")
    return {**out, "unreadable": len(result.unreadable), "window": [started, ended], "run_s": ended - started}


def job(config: dict[str, Any]) -> dict[str, Any]:
    import torch  # noqa: F401  (before the clock, as in every system of bench/)

    import bench.smallfiles_code  # noqa: F401
    from airflow_antbatch.planning import plan_job
    from airflow_antbatch.spec import JobSpec
    from airflow_antbatch.worker.run import run_worker
    from bench.systems.antbatch import worker_kwargs

    shutil.rmtree(config["output_dir"], ignore_errors=True)
    spec = JobSpec(
        input_uri=config["input_uri"],
        output_uri=config["output_dir"],
        model="bench.smallfiles_code:build_model",
        preprocess=config["preprocess"],
        id_column="path",
        batch_size=config["batch_size"],
        max_shard_rows=config["max_shard_rows"],
        storage_options=config["storage_options"],
    )
    kwargs = worker_kwargs(config["cpu_budget"], None)
    started = time.time()
    plan = plan_job(spec)
    planned = time.time()
    summary = run_worker(plan.plan_uri, "w0", **kwargs)
    ended = time.time()
    details = summary.to_dict()
    return {
        "objects": summary.rows_committed,
        "outcome": summary.outcome,
        "run_s": ended - started,
        "window": [started, ended],
        "plan_s": planned - started,
        "worker_reported_s": summary.seconds,
        "shards": len(plan.plan.shards),
        "read_busy_s": details["stages"].get("read", {}).get("busy_s"),
        "stages": details["stages"],
        "preprocess_processes_at_end": details.get("preprocess_processes"),
        "scaling": details.get("scaling", []),
        "worker_kwargs": kwargs,
    }


def main() -> None:
    config = json.loads(sys.argv[1])
    steps = {"merge": merge, "job": job}
    result = steps[config["step"]](config)
    tmp = config["result_path"] + ".tmp"
    with open(tmp, "w") as handle:
        json.dump(result, handle, indent=1, default=str)
    shutil.move(tmp, config["result_path"])


if __name__ == "__main__":
    main()
