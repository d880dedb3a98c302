"""Ray Data as a new user writes it for the job of ``bench/newuser_code.py``, timed as a whole process.

``read_parquet -> map_batches(features) -> map_batches(Scorer, concurrency=1) -> write_parquet``,
at Ray's defaults (``ray.init`` sized by Ray, default batch sizes). Runs in bench/.venv-ray:
``python -m bench.newuser_ray INPUT_DIR OUTPUT_DIR``.
"""

from __future__ import annotations

import sys
from typing import TYPE_CHECKING, Any

import numpy as np

from bench.newuser_code import build_model, features, scores

if TYPE_CHECKING:
    import pyarrow as pa


def featurize(table: pa.Table) -> dict[str, Any]:
    batch = table.combine_chunks().to_batches()[0]
    return {"id": batch.column("id").to_numpy(), "x": features(batch).numpy()}


class Scorer:
    def __init__(self) -> None:
        self.model = build_model()

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        import torch

        with torch.inference_mode():
            output = self.model(torch.from_numpy(np.ascontiguousarray(batch["x"], dtype=np.float32)))
        return {"id": batch["id"], **scores(output, None)}  # type: ignore[arg-type]


def main(input_dir: str, output_dir: str) -> None:
    import ray

    ray.init(include_dashboard=False, log_to_driver=False, logging_level="ERROR")
    ray.data.DataContext.get_current().enable_progress_bars = False
    ds = ray.data.read_parquet(input_dir)
    ds = ds.map_batches(featurize, batch_format="pyarrow")
    ds = ds.map_batches(Scorer, batch_format="numpy", concurrency=1)
    ds.write_parquet(output_dir)
    ray.shutdown()


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
