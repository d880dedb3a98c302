"""A fraud-scoring example: card transactions in, a score and a label out.

``build_model``, ``preprocess`` and ``postprocess`` follow the worker's user-code contract and
are referenced by import path, e.g. ``model="airflow_antbatch.examples.tabular:build_model"``.
"""

from __future__ import annotations

import zlib

import numpy as np
import pyarrow as pa
import torch

MERCHANT_BUCKETS = 12
FEATURES = 4 + MERCHANT_BUCKETS
MERCHANTS = ("grocer", "fuel", "airline", "casino", "bookshop", "pharmacy", "electronics", "cafe")


def build_model(seed: int = 7) -> torch.nn.Module:
    """A two-layer MLP with weights drawn from ``seed``: the same model in every process."""
    generator = torch.Generator().manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(FEATURES, 64), torch.nn.ReLU(), torch.nn.Linear(64, 2))
    with torch.no_grad():
        for param in model.parameters():
            param.copy_(torch.randn(param.shape, generator=generator) * 0.3)
    return model


def preprocess(batch: pa.RecordBatch) -> torch.Tensor:
    """Numeric features plus a hashed one-hot of the merchant name."""
    amount = batch.column("amount").to_numpy(zero_copy_only=False).astype(np.float32)
    age = batch.column("customer_age").to_numpy(zero_copy_only=False).astype(np.float32)
    hour = batch.column("hour").to_numpy(zero_copy_only=False).astype(np.float32)
    merchants = batch.column("merchant").to_pylist()
    buckets = np.array([zlib.crc32(str(m).encode()) % MERCHANT_BUCKETS for m in merchants])
    onehot = np.zeros((batch.num_rows, MERCHANT_BUCKETS), dtype=np.float32)
    onehot[np.arange(batch.num_rows), buckets] = 1.0
    angle = hour * (2 * np.pi / 24)
    dense = np.column_stack([np.log1p(amount), age / 100.0, np.sin(angle), np.cos(angle)]).astype(np.float32)
    return torch.from_numpy(np.hstack([dense, onehot]))


def postprocess(output: torch.Tensor, batch: pa.RecordBatch) -> dict[str, np.ndarray]:
    probs = torch.softmax(output, dim=1)
    return {"fraud_score": probs[:, 1].numpy(), "is_fraud": (probs[:, 1] > 0.5).numpy()}


def generate_transactions(rows: int, *, seed: int = 0, first_id: int = 0) -> pa.Table:
    """Synthetic transactions with a unique ``txn_id``: the demo's and the tests' input data."""
    rng = np.random.default_rng(seed)
    return pa.table(
        {
            "txn_id": np.arange(first_id, first_id + rows, dtype=np.int64),
            "amount": np.round(rng.lognormal(3.0, 1.2, rows), 2),
            "customer_age": rng.integers(18, 90, rows).astype(np.int32),
            "hour": rng.integers(0, 24, rows).astype(np.int32),
            "merchant": rng.choice(MERCHANTS, rows),
        }
    )
