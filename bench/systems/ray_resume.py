"""Ray Data's pipeline of ``bench.systems.ray_data`` with row-id checkpointing, for ``bench.resume``.

Runs in bench/.venv-ray. The same read (through the latency filesystem), preprocess tasks,
scoring actor and ``write_parquet`` as the throughput benchmark, with
``DataContext.checkpoint_config = CheckpointConfig(id_column="id", checkpoint_path=...)`` when
the options name a checkpoint folder (none: the no-checkpoint baseline). Ray 2.60's checkpoint
writes, per write task, a pending file of the task's ids, then the data file, then renames the
pending file to committed; a rerun deletes data files whose checkpoint is still pending,
re-reads the whole input and drops the rows whose ids were committed (a filter actor after the
read). The scoring actor counts the rows it scores into its timing file, a few bytes per batch,
so the count survives a SIGKILL of the whole process tree.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from typing import TYPE_CHECKING, Any

from bench.systems.common import RunConfig, write_result
from bench.systems.ray_data import Scorer, preprocess

if TYPE_CHECKING:
    import numpy as np


class CountingScorer(Scorer):
    """The benchmark's scoring actor, also counting the rows it scores (written with its timing)."""

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, Any]:
        self.timing["rows"] = self.timing.get("rows", 0) + len(batch["id"])
        return super().__call__(batch)


def rows_scored(timing_dir: str) -> int:
    """Rows every scoring actor of a run scored, from their timing files."""
    total = 0
    for name in os.listdir(timing_dir) if os.path.isdir(timing_dir) else []:
        with open(os.path.join(timing_dir, name)) as handle:
            total += int(json.load(handle).get("rows", 0))
    return total


def main() -> None:
    config = RunConfig.from_argv()
    opts = config.options
    started = time.time()
    import pyarrow.fs
    import ray
    from ray.data.checkpoint import CheckpointConfig

    from bench.latencyfs import LatencyFileSystem

    ray.init(num_cpus=int(opts["num_cpus"]), include_dashboard=False, log_to_driver=False, logging_level="ERROR")
    ctx = ray.data.DataContext.get_current()
    ctx.enable_progress_bars = False
    ctx.print_on_execution_start = False
    checkpoint_dir = opts.get("checkpoint_dir")
    if checkpoint_dir:
        ctx.checkpoint_config = CheckpointConfig(id_column="id", checkpoint_path=checkpoint_dir)
    startup_s = time.time() - started

    timing_dir = opts["timing_dir"]
    shutil.rmtree(timing_dir, ignore_errors=True)
    os.makedirs(timing_dir)
    filesystem = pyarrow.fs.PyFileSystem(pyarrow.fs.FSSpecHandler(LatencyFileSystem()))
    window_start = time.time()
    ds = ray.data.read_parquet(config.input_files(), filesystem=filesystem)
    ds = ds.map_batches(preprocess, batch_format="pyarrow", batch_size=config.batch_size, num_cpus=opts["pre_cpus"])
    ds = ds.map_batches(
        CountingScorer,
        fn_constructor_kwargs={"workload": config.workload, "threads": config.threads, "timing_dir": timing_dir},
        batch_format="numpy",
        batch_size=config.batch_size,
        concurrency=1,
        num_cpus=opts["actor_cpus"],
    )
    ds.write_parquet(config.output_dir)
    window_end = time.time()
    ray.shutdown()
    write_result(
        config,
        {
            "rows_scored": rows_scored(timing_dir),
            "run_s": window_end - window_start,
            "startup_s": startup_s,
            "window": [window_start, window_end],
            "checkpoint": bool(checkpoint_dir),
        },
    )


if __name__ == "__main__":
    main()
