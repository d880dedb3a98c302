"""Building a worker process: its preprocess pool setting, and the clock of its first batch."""

from __future__ import annotations

import time

import pyarrow as pa
import pytest
import torch

from airflow_antbatch.worker.inference import OutputAssembler
from airflow_antbatch.worker.run import FirstBatchClock, pool_size, process_started


@pytest.mark.parametrize(
    ("cpu_budget", "preprocess_workers", "expected"),
    [
        (1, None, 0),  # one core: the hook runs in a thread, not in a process that takes turns with the model
        (1, 1, 1),  # asked for: a process, which survives a hook that crashes
        (2, None, None),  # more cores: the scaler sizes the pool
        (4, 0, 0),
    ],
)
def test_a_one_core_budget_preprocesses_in_a_thread_unless_told(
    cpu_budget: int, preprocess_workers: int | None, expected: int | None
) -> None:
    assert pool_size(cpu_budget, preprocess_workers) == expected


def test_the_first_batch_clock_notes_the_first_call_only_and_passes_everything_through() -> None:
    assembler = OutputAssembler(id_column="id")
    clock = FirstBatchClock(assembler)
    batch = pa.RecordBatch.from_pydict({"id": [1, 2]})
    assert clock.at is None and clock.passthrough == ["id"]
    before = time.monotonic()
    table = clock(torch.tensor([0.5, 0.25]), batch)
    first = clock.at
    assert first is not None and before <= first <= time.monotonic()
    clock(torch.tensor([0.5, 0.25]), batch)
    assert clock.at == first
    assert table.column_names == ["id", "prediction"]


def test_this_process_started_before_its_tests_ran() -> None:
    started = process_started()
    assert started < time.monotonic() - 0.01  # the interpreter and pytest took some time
    assert time.monotonic() - started < 24 * 3600
