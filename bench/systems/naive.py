"""The loop a competent engineer writes without pipelining, in one process.

For each input file: read it batch by batch through the latency filesystem, tokenise, run the
model(s) under ``torch.inference_mode``, take the top-k, and write one Parquet file per input
file. Batched, no wasted work, torch threads set explicitly: the baseline, never weakened.
"""

from __future__ import annotations

import os
import time

import pyarrow as pa
import pyarrow.parquet as pq

from bench.systems.common import RunConfig, StageTimer, build_models, infer, output_table, write_result


def main() -> None:
    config = RunConfig.from_argv()
    started = time.time()
    import torch

    from bench import workloads
    from bench.latencyfs import LatencyFileSystem

    torch.set_num_threads(config.threads)
    models = build_models(config.workload)
    fs = LatencyFileSystem()
    os.makedirs(config.output_dir, exist_ok=True)
    startup_s = time.time() - started

    timer = StageTimer()
    rows = 0
    window_start = time.time()
    timer.reset()
    for path in config.input_files():
        tables = []
        with fs.open("latency://" + path, "rb") as handle:
            batches = pq.ParquetFile(handle).iter_batches(batch_size=config.batch_size)
            timer.lap("read")
            for batch in batches:
                timer.lap("read")
                inputs = workloads.tokenize(batch)
                timer.lap("preprocess")
                with torch.inference_mode():
                    output = infer(models, inputs, batch)
                timer.lap("model")
                tables.append(output_table(batch.column("id"), workloads.top_k(output, batch)))
                rows += batch.num_rows
                timer.lap("postprocess")
        pq.write_table(pa.concat_tables(tables), os.path.join(config.output_dir, os.path.basename(path)))
        timer.lap("write")
    window_end = time.time()
    write_result(
        config,
        {
            "rows": rows,
            "run_s": window_end - window_start,
            "startup_s": startup_s,
            "window": [window_start, window_end],
            "stages_s": timer.rounded(),
            "threads": {"torch": torch.get_num_threads(), "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY")},
            "requests": LatencyFileSystem.counts(),
        },
    )


if __name__ == "__main__":
    main()
