"""Test user code for the Airflow-side tests, imported by worker subprocesses (PYTHONPATH).

Configured through the environment because it runs inside those subprocesses:
ANTBATCH_TEST_KILL_MARKER names a file; the first process to score a batch creates it and
kills itself with SIGKILL, as an OOM kill or a lost node would.
"""

from __future__ import annotations

import os
import signal

import pyarrow as pa
import torch

from airflow_antbatch.examples.tabular import build_model


class KillFirstScorer(torch.nn.Module):
    def __init__(self, marker: str) -> None:
        super().__init__()
        self.inner = build_model()
        self.marker = marker

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        try:
            os.close(os.open(self.marker, os.O_CREAT | os.O_EXCL | os.O_WRONLY))
        except FileExistsError:
            out: torch.Tensor = self.inner(x)
            return out
        os.kill(os.getpid(), signal.SIGKILL)
        raise AssertionError("unreachable")


def build_model_killing_first_process() -> torch.nn.Module:
    return KillFirstScorer(os.environ["ANTBATCH_TEST_KILL_MARKER"])


def failing_preprocess(batch: pa.RecordBatch) -> torch.Tensor:
    """Every record is rejected: past quarantine_limit its shard fails, for good after max_shard_attempts."""
    raise ValueError(f"corrupt feature row in a batch of {batch.num_rows}")


def object_features(batch: pa.RecordBatch) -> torch.Tensor:
    """For jobs over small-file packs: each record is one object's ``path`` and ``data`` bytes."""
    rows = [
        [len(data) / 1000.0, sum(data) / max(1, len(data)) / 255.0, data[0] / 255.0 if data else 0.0, len(path) / 100.0]
        for path, data in zip(batch.column("path").to_pylist(), batch.column("data").to_pylist(), strict=True)
    ]
    return torch.tensor(rows, dtype=torch.float32)


def build_object_model() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.Softmax(dim=1))


class RowSum(torch.nn.Module):
    """Scores any numeric features (their sum); raises on a batch holding ANTBATCH_TEST_BAD_ID."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        bad = os.environ.get("ANTBATCH_TEST_BAD_ID")
        if bad is not None and bool((x[:, 0] == float(bad)).any()):
            raise RuntimeError(f"cannot score row {bad}")
        return x.sum(dim=1, keepdim=True)


def build_row_sum_model() -> torch.nn.Module:
    return RowSum()


def amount_only(batch: pa.RecordBatch) -> torch.Tensor:
    """Features from the ``amount`` column alone, whatever else the rows carry."""
    return torch.tensor(batch.column("amount").to_pylist(), dtype=torch.float32).unsqueeze(1)


def preprocess_to_string(batch: pa.RecordBatch) -> str:
    """A hook with a bug every batch hits: it returns text, not tensors."""
    return f"{batch.num_rows} rows"
