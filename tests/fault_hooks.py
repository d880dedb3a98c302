"""Preprocess hooks that misbehave on purpose, for the pipeline's process-level fault tests.

They run in preprocess child processes that fork from a server started once per test
process, so they take their orders from the data (the ``merchant`` column), not from the
environment: ``POISON-exit``, ``POISON-segv`` and ``POISON-kill`` kill the process on every
try; ``FLAKY:<path>`` kills it only while ``<path>`` does not exist yet (so once);
``RAISE`` raises.
"""

from __future__ import annotations

import ctypes
import gc
import os
import signal
import time

import pyarrow as pa
import torch

from airflow_antbatch.examples import tabular


def preprocess(batch: pa.RecordBatch) -> torch.Tensor:
    for merchant in set(batch.column("merchant").to_pylist()):
        if merchant == "POISON-exit":
            os._exit(3)
        if merchant == "POISON-segv":
            ctypes.string_at(0)  # reads address 0: SIGSEGV
        if merchant == "POISON-kill":
            os.kill(os.getpid(), signal.SIGKILL)  # what the OOM killer sends
        if merchant.startswith("FLAKY:"):
            try:
                os.close(os.open(merchant.removeprefix("FLAKY:"), os.O_CREAT | os.O_EXCL | os.O_WRONLY))
            except FileExistsError:
                continue
            os._exit(4)
        if merchant == "RAISE":
            raise ValueError("cannot parse merchant 'RAISE'")
    return tabular.preprocess(batch)


def slow_preprocess(batch: pa.RecordBatch) -> torch.Tensor:
    """A preprocess-heavy job: 60 ms a batch, next to a model that takes next to nothing."""
    time.sleep(0.06)
    return tabular.preprocess(batch)


def jittery_preprocess(batch: pa.RecordBatch) -> torch.Tensor:
    """Batches finish out of order across processes: later ids come back sooner."""
    first = batch.column("txn_id")[0].as_py()
    time.sleep(0.03 * (3 - first // 100 % 3))
    return tabular.preprocess(batch)


_SET_UP: list[int] = []  # the pid of a process whose hook has set up (per process: not inherited)


def lazy_preprocess(batch: pa.RecordBatch) -> dict[str, object]:
    """A hook that sets up on its first call in each process (400 ms, as a tokenizer loading
    its vocabulary), then takes 60 ms a batch; it says which process ran it."""
    if _SET_UP != [os.getpid()]:
        time.sleep(0.4)
        _SET_UP[:] = [os.getpid()]
    time.sleep(0.06)
    return {"features": tabular.preprocess(batch), "pid": os.getpid()}


def frozen_objects(batch: pa.RecordBatch) -> torch.Tensor:
    """How many objects this process inherited frozen from its server, for each row: what the
    children's garbage collections leave out (``forkserver.preloaded``)."""
    return torch.full((batch.num_rows,), gc.get_freeze_count())
