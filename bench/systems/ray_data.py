"""Ray Data on the same files, the same user functions and the same batch size.

Runs in its own environment (bench/.venv-ray) so that Ray never enters the product's
dependencies. ``read_parquet`` through the latency filesystem (wrapped for pyarrow) ->
``map_batches(tokenize)`` as tasks -> ``map_batches(model class, concurrency=1)`` as an actor
that also takes the top-k -> ``write_parquet`` to local disk. The chain runs as one fused actor
(``fused``) or as one actor per model (``split``). Startup (import, ``ray.init``, one trivial
job to warm the worker pool) is timed apart and left out of rows/s; the actors' start is part
of the job, as it is on every real Ray Data run.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from bench.systems.common import RunConfig, build_models, output_table, write_result


def _stack(values: Any) -> np.ndarray:
    """A 2-D array from Ray's column: regular already, or ragged rows (blocks of unequal padding)."""
    if isinstance(values, np.ndarray) and values.dtype != object:
        return values
    rows = list(values)
    width = max(len(r) for r in rows)
    out = np.zeros((len(rows), width), dtype=np.int64)
    for i, row in enumerate(rows):
        out[i, : len(row)] = row
    return out


def preprocess(table: pa.Table) -> dict[str, np.ndarray]:
    """The workload's tokenize on one Ray batch, ids kept alongside."""
    from bench import workloads

    batch = table.combine_chunks().to_batches()[0]
    inputs = workloads.tokenize(batch)
    return {"id": batch.column("id").to_numpy(), **{k: v.numpy() for k, v in inputs.items()}}


class Scorer:
    """One actor with the workload's model(s): its stage of the chain, or all of it."""

    def __init__(self, workload: str, threads: int, part: str = "all", timing_dir: str = "") -> None:
        self.timing = {"created": time.time()}
        import torch

        torch.set_num_threads(threads)
        self.part = part
        models = build_models(workload)
        self.models = {"all": models, "embed": models[:1], "classify": models[1:2], "rerank": models[2:]}[part]
        self.timing.update(ready=time.time(), busy_s=0.0, batches=0)
        self.timing_path = os.path.join(timing_dir, f"actor-{part}-{os.getpid()}.json") if timing_dir else ""

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, Any]:
        started = time.time()
        out = self._score(batch)
        self.timing["busy_s"] += time.time() - started
        self.timing["batches"] += 1
        self.timing["last"] = time.time()
        if self.timing_path:  # a few bytes per batch: the actor may be killed without a chance to say more
            with open(self.timing_path, "w") as handle:
                json.dump(self.timing, handle)
        return out

    def _score(self, batch: dict[str, np.ndarray]) -> dict[str, Any]:
        import torch

        from bench import workloads

        with torch.inference_mode():
            if self.part in ("all", "embed"):
                inputs = {
                    "input_ids": torch.from_numpy(_stack(batch["input_ids"])),
                    "attention_mask": torch.from_numpy(_stack(batch["attention_mask"])),
                }
                if self.part == "embed":
                    return {"id": batch["id"], "embedding": self.models[0](**inputs).numpy()}
                output = self.models[0](**inputs)
                if len(self.models) == 3:
                    head = self.models[1](output)
                    output = self.models[2](*workloads.rerank_input(head, None))  # type: ignore[arg-type]
            elif self.part == "classify":
                head = self.models[0](torch.from_numpy(np.asarray(batch["embedding"])))
                return {"id": batch["id"], **{k: v.numpy() for k, v in head.items()}}
            else:
                previous = {k: torch.from_numpy(np.asarray(batch[k])) for k in ("embedding", "logits")}
                output = self.models[0](*workloads.rerank_input(previous, None))  # type: ignore[arg-type]
            table = output_table(batch["id"], workloads.top_k(output, None))  # type: ignore[arg-type]
        return {name: _column(table.column(name)) for name in table.column_names}


def _column(column: pa.ChunkedArray) -> np.ndarray:
    array = column.combine_chunks()
    if pa.types.is_fixed_size_list(array.type):
        return array.flatten().to_numpy().reshape(len(array), array.type.list_size)
    return array.to_numpy()


def main() -> None:
    config = RunConfig.from_argv()
    opts = config.options
    started = time.time()
    import pyarrow.fs
    import ray

    from bench.latencyfs import LatencyFileSystem
    from bench.workloads import MODELS

    ray.init(
        num_cpus=int(opts.get("num_cpus", 2)),
        include_dashboard=False,
        log_to_driver=False,
        logging_level="ERROR",
    )
    ctx = ray.data.DataContext.get_current()
    ctx.enable_progress_bars = False
    ctx.print_on_execution_start = False
    ray.data.range(8).map_batches(lambda b: b).materialize()  # warm the worker pool
    startup_s = time.time() - started

    filesystem = pyarrow.fs.PyFileSystem(pyarrow.fs.FSSpecHandler(LatencyFileSystem()))
    actor_cpus = float(opts.get("actor_cpus", 1))
    mode = opts.get("chain_mode", "fused") if len(MODELS[config.workload]) > 1 else "fused"
    parts = ["embed", "classify", "rerank"] if mode == "split" else ["all"]
    shutil.rmtree(config.output_dir, ignore_errors=True)
    timing_dir = config.output_dir.rstrip("/") + "-actors"
    shutil.rmtree(timing_dir, ignore_errors=True)
    os.makedirs(timing_dir)
    window_start = time.time()
    ds = ray.data.read_parquet(config.input_files(), filesystem=filesystem)
    ds = ds.map_batches(
        preprocess, batch_format="pyarrow", batch_size=config.batch_size, num_cpus=float(opts.get("pre_cpus", 1))
    )
    for part in parts:
        ds = ds.map_batches(
            Scorer,
            fn_constructor_kwargs={
                "workload": config.workload,
                "threads": config.threads,
                "part": part,
                "timing_dir": timing_dir,
            },
            batch_format="numpy",
            batch_size=config.batch_size,
            concurrency=1,
            num_cpus=actor_cpus / len(parts),
        )
    ds.write_parquet(config.output_dir)
    window_end = time.time()
    rows = sum(
        pq.read_metadata(os.path.join(config.output_dir, name)).num_rows
        for name in os.listdir(config.output_dir)
        if name.endswith(".parquet")
    )
    ray.shutdown()
    actors = []
    for name in sorted(os.listdir(timing_dir)):
        with open(os.path.join(timing_dir, name)) as handle:
            t = json.load(handle)
        actors.append(
            {
                "actor": name.split("-")[1],
                "start_after_s": round(t["created"] - window_start, 2),
                "init_s": round(t["ready"] - t["created"], 2),
                "first_batch_after_s": round(t["ready"] - window_start, 2),
                "busy_s": round(t["busy_s"], 2),
                "batches": t["batches"],
            }
        )
    write_result(
        config,
        {
            "rows": rows,
            "run_s": window_end - window_start,
            "startup_s": startup_s,
            "window": [window_start, window_end],
            "actors": actors,
            "threads": {
                "torch_in_actor": config.threads,
                "ray_num_cpus": int(opts.get("num_cpus", 2)),
                "actor_cpus": actor_cpus,
                "pre_cpus": float(opts.get("pre_cpus", 1)),
                "chain_mode": mode,
                "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY"),
            },
        },
    )


if __name__ == "__main__":
    main()
