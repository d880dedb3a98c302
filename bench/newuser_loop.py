"""The plain loop a new user writes for the job of ``bench/newuser_code.py``, timed as a whole process.

Every file read whole, its features computed, the MLP run on them, one output file per input
file; torch at its defaults. ``python -m bench.newuser_loop INPUT_DIR OUTPUT_DIR``.
"""

from __future__ import annotations

import os
import sys

import pyarrow as pa
import pyarrow.parquet as pq
import torch

from bench.newuser_code import build_model, features, scores


def main(input_dir: str, output_dir: str) -> None:
    model = build_model()
    os.makedirs(output_dir, exist_ok=True)
    for name in sorted(n for n in os.listdir(input_dir) if n.endswith(".parquet")):
        tables = []
        for batch in pq.read_table(os.path.join(input_dir, name)).to_batches():
            with torch.inference_mode():
                output = model(features(batch))
            tables.append(pa.table({"id": batch.column("id"), **scores(output, batch)}))
        pq.write_table(pa.concat_tables(tables), os.path.join(output_dir, name))


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
