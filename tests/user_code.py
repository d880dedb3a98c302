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
    """Every batch is rejected: its shard fails for good after max_shard_attempts tries."""
    raise ValueError(f"corrupt feature row in a batch of {batch.num_rows}")
