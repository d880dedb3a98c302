"""Test user code for fault injection: a model slow enough to be killed mid-shard.

Configured through the environment because it runs inside worker subprocesses:
ANTBATCH_TEST_BATCH_DELAY (seconds per batch) and ANTBATCH_TEST_MARKER_DIR (where each
process drops a file named after its pid once it is scoring, so a test knows whom to kill).
"""

from __future__ import annotations

import os
import pathlib
import time

import torch

from airflow_antbatch.examples.tabular import build_model


class SlowModel(torch.nn.Module):
    def __init__(self, delay_s: float, marker_dir: str | None) -> None:
        super().__init__()
        self.inner = build_model()
        self.delay_s = delay_s
        self.marker_dir = marker_dir

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.marker_dir:
            pathlib.Path(self.marker_dir, str(os.getpid())).touch()
        time.sleep(self.delay_s)
        out: torch.Tensor = self.inner(x)
        return out


def build_slow_model() -> torch.nn.Module:
    return SlowModel(
        float(os.environ.get("ANTBATCH_TEST_BATCH_DELAY", "0.05")), os.environ.get("ANTBATCH_TEST_MARKER_DIR")
    )


def build_failing_model() -> torch.nn.Module:
    """Raises on every batch: its shards fail for good after max_shard_attempts tries."""

    class Failing(torch.nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            raise RuntimeError(f"boom on a batch of {x.shape[0]} rows")

    return Failing()


def broken_factory() -> torch.nn.Module:
    raise ImportError("no module named 'weights_loader'")
