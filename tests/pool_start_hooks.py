"""Preprocess hooks whose processes are slow to start, or cannot, for the pool's start-up tests.

The hook's name says how its preprocess processes start: ``starts_in_<N>s`` sleeps N seconds
before it is ready, ``never_starts`` cannot be loaded there. The name is resolved by the
module's ``__getattr__`` (PEP 562) in the worker, at once, and again in every process, which
is where it sleeps or fails. Every batch is noted with the pid that preprocessed it in the
file its ``merchant`` column names (``LOG:<path>``): forkserver children do not see this
process's environment, so the data carries the order.
"""

from __future__ import annotations

import multiprocessing
import os
import time

import pyarrow as pa
import torch

from airflow_antbatch.examples import tabular

BATCH_S = 0.02  # a batch's feature code: enough that a job of a few thousand rows takes seconds


def __getattr__(name: str) -> object:
    in_child = multiprocessing.parent_process() is not None
    if name == "never_starts":
        if in_child:
            raise AttributeError("never_starts does not load in a preprocess process")
        return logged_preprocess
    if name.startswith("starts_in_") and name.endswith("s"):
        if in_child:
            time.sleep(float(name.removeprefix("starts_in_").removesuffix("s")))
        return logged_preprocess
    raise AttributeError(name)


def logged_preprocess(batch: pa.RecordBatch) -> torch.Tensor:
    """The example's features; a record whose merchant is ``CRASH`` ends the process (code 3)."""
    merchants = batch.column("merchant").to_pylist()
    if "CRASH" in merchants:
        os._exit(3)
    path = merchants[0].removeprefix("LOG:")
    with open(path, "a") as log:
        log.write(f"{os.getpid()} {' '.join(str(i) for i in batch.column('txn_id').to_pylist())}\n")
    time.sleep(BATCH_S)
    return tabular.preprocess(batch)


def preprocessed_by(path: str) -> dict[int, list[int]]:
    """The log read back: pid -> the ids it preprocessed, in the order it did."""
    by_pid: dict[int, list[int]] = {}
    with open(path) as log:
        for line in log:
            pid, *ids = line.split()
            by_pid.setdefault(int(pid), []).extend(int(i) for i in ids)
    return by_pid
