"""The antbatch worker: plan the job, then one worker process scores every shard.

The job is planned and run through the public API (``plan_job``, ``run_worker``), as the CLI's
``antbatch plan`` and ``antbatch worker`` do; OMP_WAIT_POLICY=PASSIVE comes from the
orchestrator, as ``python -m airflow_antbatch`` sets it. The clock runs from planning (listing
the input, reading the Parquet footers) to the worker's return, less the time it takes to
build the models (timed here beforehand, warm, and excluded as for every system). The start of
the worker's preprocess processes counts, as the start of Ray's model actor counts for Ray:
both are part of how the system runs a job. The worker's own ``seconds`` (which leaves the
pool start out) is reported beside it.
"""

from __future__ import annotations

import inspect
import os
import shutil
import time
from typing import Any

from bench.systems.common import RunConfig, build_models, write_result

WORKLOAD_CODE = "bench.workloads"


def job_fields(workload: str) -> dict[str, Any]:
    """The JobSpec fields that name the workload's user code: one model, or a chain of three
    stages (embed -> classify, whose dict output is not kept as a column -> rerank, through
    the adapter that calls it as model(embedding, logits))."""
    from bench.workloads import CHAIN_STAGES, MODELS

    common = {"preprocess": f"{WORKLOAD_CODE}:tokenize", "postprocess": f"{WORKLOAD_CODE}:top_k", "id_column": "id"}
    models = [f"{WORKLOAD_CODE}:{name}" for name in MODELS[workload]]
    if len(models) == 1:
        return {**common, "model": models[0]}
    embed, classify, rerank = ({"name": name, "model": model} for name, model in zip(CHAIN_STAGES, models, strict=True))
    classify["output_column"] = None
    rerank["adapter"] = f"{WORKLOAD_CODE}:rerank_input"
    return {**common, "stages": [embed, classify, rerank]}


def worker_kwargs(cpu_budget: int | None, preprocess_workers: int | None) -> dict[str, Any]:
    """The keyword arguments this release's ``run_worker`` takes (older ones lack the budget)."""
    from airflow_antbatch.worker.run import run_worker

    accepted = inspect.signature(run_worker).parameters
    wanted = {"cpu_budget": cpu_budget, "preprocess_workers": preprocess_workers}
    return {k: v for k, v in wanted.items() if v is not None and k in accepted}


def main() -> None:
    config = RunConfig.from_argv()
    started = time.time()
    import torch  # noqa: F401  (imported before the clock, as in every system)

    import bench.workloads  # noqa: F401
    from airflow_antbatch.planning import plan_job
    from airflow_antbatch.spec import JobSpec
    from airflow_antbatch.worker.run import run_worker

    built = time.time()
    build_models(config.workload)  # what the worker's code load costs, warm: excluded below
    model_build_s = time.time() - built
    startup_s = time.time() - started
    shutil.rmtree(config.output_dir, ignore_errors=True)
    spec = JobSpec(
        input_uri="latency://" + config.input_dir,
        output_uri=config.output_dir,
        batch_size=config.batch_size,
        max_shard_rows=int(config.options.get("max_shard_rows", 100_000)),
        **job_fields(config.workload),
    )
    kwargs = worker_kwargs(config.options.get("cpu_budget"), config.options.get("preprocess_workers"))
    window_start = time.time()
    plan = plan_job(spec)
    planned = time.time()
    summary = run_worker(plan.plan_uri, "w0", **kwargs)
    window_end = time.time()
    before_shards_s = (window_end - planned) - summary.seconds  # code load and preprocess pool start
    from bench.latencyfs import LatencyFileSystem

    details = summary.to_dict()
    write_result(
        config,
        {
            "rows": summary.rows_committed,
            "run_s": (window_end - window_start) - model_build_s,
            "startup_s": startup_s,
            "window": [window_start, window_end],
            "plan_s": round(planned - window_start, 3),
            "model_load_s": round(model_build_s, 3),
            "code_load_and_pool_start_s": round(before_shards_s, 3),
            "worker_reported_s": round(summary.seconds, 3),
            "rows_s_excluding_pool_start": summary.rows_committed / ((planned - window_start) + summary.seconds),
            "shards": len(plan.plan.shards),
            "outcome": summary.outcome,
            "worker_kwargs": kwargs,
            "threads": {
                "cpu_budget": details.get("cpu_budget"),
                "preprocess_processes_at_end": details.get("preprocess_processes"),
                "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY"),
                "scaling": details.get("scaling", []),
            },
            "stages": details.get("stages", {}),
            "requests": LatencyFileSystem.counts(),
        },
    )


if __name__ == "__main__":
    main()
