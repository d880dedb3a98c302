"""The new user's job (issue 16): tabular rows, a pure-Python feature-hashing preprocess, an MLP.

The code a user would write, used unchanged by every system of ``bench/newuser.py``: the
plain loop, ``antbatch run`` (by import path) and Ray Data. ``features`` hashes each row's
categorical values and description words into 96 buckets in plain Python (CPU-bound and
GIL-bound, as real feature code often is); ``build_model`` is the MLP of docs/operations.md's
performance notes (96 -> 512 -> 512 -> 2); ``scores`` keeps the positive class's probability.
The data is seeded and generated, never downloaded.
"""

from __future__ import annotations

import os
import zlib

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch
from torch import nn

FEATURES = 96
CATEGORICAL = ("country", "device", "channel", "merchant", "category", "currency")
NUMERIC = ("amount", "age_days", "items", "hour")
_VALUES = {
    "country": [f"c{i}" for i in range(40)],
    "device": ["ios", "android", "web", "pos", "kiosk"],
    "channel": ["online", "store", "phone", "partner"],
    "merchant": [f"m{i}" for i in range(500)],
    "category": [f"cat{i}" for i in range(60)],
    "currency": ["eur", "usd", "gbp", "chf", "jpy"],
}
_WORDS = [f"w{i}" for i in range(2000)]


def features(batch: pa.RecordBatch) -> torch.Tensor:
    """One float32 row of 96 hashed buckets per record, in pure Python (the CPU-bound part)."""
    columns = {name: batch.column(name).to_pylist() for name in (*CATEGORICAL, *NUMERIC, "description")}
    rows = []
    for i in range(batch.num_rows):
        row = [0.0] * FEATURES
        for name in CATEGORICAL:
            row[zlib.crc32(f"{name}={columns[name][i]}".encode()) % FEATURES] += 1.0
        for word in columns["description"][i].lower().split():
            row[zlib.crc32(word.strip(".,!?").encode()) % FEATURES] += 0.5
        for slot, name in enumerate(NUMERIC):
            row[slot] = float(np.log1p(abs(columns[name][i])))
        rows.append(row)
    return torch.tensor(rows, dtype=torch.float32)


def build_model() -> nn.Module:
    """The MLP, seeded so that every system scores the same weights."""
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(FEATURES, 512), nn.ReLU(), nn.Linear(512, 512), nn.ReLU(), nn.Linear(512, 2)).eval()


def scores(output: torch.Tensor, batch: pa.RecordBatch) -> dict[str, np.ndarray]:
    """The positive class's probability."""
    return {"score": torch.softmax(output, dim=1)[:, 1].numpy()}


def write_data(directory: str, rows: int, files: int = 60, seed: int = 16) -> list[str]:
    """``files`` small Parquet files of ``rows`` rows in all (one row group each), generated once."""
    done = os.path.join(directory, "_complete")
    if not os.path.exists(done):
        os.makedirs(directory, exist_ok=True)
        rng = np.random.default_rng(seed)
        per_file = -(-rows // files)
        for index in range(files):
            start = index * per_file
            count = max(0, min(per_file, rows - start))
            table = pa.table(
                {
                    "id": np.arange(start, start + count, dtype=np.int64),
                    **{name: rng.choice(_VALUES[name], size=count) for name in CATEGORICAL},
                    "amount": rng.lognormal(3.0, 1.0, size=count),
                    "age_days": rng.integers(0, 5000, size=count),
                    "items": rng.integers(1, 12, size=count),
                    "hour": rng.integers(0, 24, size=count),
                    "description": [" ".join(words) for words in rng.choice(_WORDS, size=(count, 8)).tolist()],
                }
            )
            pq.write_table(table, os.path.join(directory, f"part-{index:03d}.parquet"))
        open(done, "w").close()  # noqa: SIM115
    return sorted(os.path.join(directory, n) for n in os.listdir(directory) if n.endswith(".parquet"))
