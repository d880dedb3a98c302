"""NOTE [read-ahead] in the worker loop: small shards are claimed ahead enough to keep the
pipeline fed, the tail holds one ahead at most, and a worker killed holding several loses and
duplicates nothing."""

from __future__ import annotations

import collections
import os
import pathlib
import signal
import subprocess
import time
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from airflow_antbatch.examples import tabular
from airflow_antbatch.ledger import Ledger, WorkerIdentity
from airflow_antbatch.planning import plan_job
from airflow_antbatch.spec import JobSpec
from airflow_antbatch.worker.job_code import JobCode
from airflow_antbatch.worker.local import worker_command
from airflow_antbatch.worker.loop import (
    MAX_LEASES,
    TAIL_LEASES,
    Worker,
    WorkerSummary,
    first_window,
    wants_another,
)
from tests.conftest import write_transactions


@pytest.fixture
def small(tmp_path: pathlib.Path) -> tuple[pathlib.Path, pa.Table]:
    """3 files x 1,000 rows, row groups of 100."""
    directory = tmp_path / "in"
    return directory, write_transactions(directory, files=3, rows_per_file=1000, row_group_size=100)


def _one_batch_shards(directory: pathlib.Path, output: pathlib.Path, **kw: object) -> str:
    """The tabular job in 30 shards of one 100-row batch each, through three slow stages when
    run from the spec (the tests in-process bring their own code)."""
    spec = JobSpec(
        input_uri=str(directory),
        output_uri=str(output),
        model="tests.slow_model:build_slow_model",
        preprocess=f"{__name__}:slow_preprocess",
        postprocess=f"{__name__}:slow_postprocess",
        id_column="txn_id",
        max_shard_rows=100,
        batch_size=100,
        **kw,  # type: ignore[arg-type]
    )
    return plan_job(spec).plan_uri


def _committed_ids(plan_uri: str) -> list[int]:
    """Every id in the files the commit records name."""
    ledger = Ledger.open(plan_uri)
    files = [str(pathlib.Path(ledger.plan.spec.output_uri) / r.file) for r in ledger.commit_records()]
    return list(pq.read_table(files, columns=["txn_id"]).column("txn_id").to_pylist())


def test_the_rule() -> None:
    """Rows held against what the pipeline holds when fed, the window, the run left, the cap
    and the tail."""
    fed = 900

    def wants(held: list[int | None], *, window: int = 6, run_left: int = 20, one_ahead: bool = False) -> bool:
        return wants_another(held, fed, window=window, run_left=run_left, one_ahead=one_ahead)

    assert wants([], window=2, run_left=0, one_ahead=True)
    assert wants([100], window=2, run_left=0, one_ahead=True)  # one ahead, even at the tail
    assert not wants([100, 100], one_ahead=True)
    assert not wants([100, 100], window=2)  # the window at first
    assert wants([100] * 5)
    assert not wants([100] * MAX_LEASES, window=99)
    assert not wants([100] * 3, run_left=3)  # it reaches the tail holding two at most
    assert not wants([500, 500])  # big shards: one ahead as before
    assert not wants([100, None])  # rows unknown: one ahead


class _Sampling(torch.nn.Module):
    """The tabular MLP, holding a "device" for ``delay_s`` a batch (a sleep: no CPU), that
    samples how many tries the worker holds, and whether it is at the tail, on each batch."""

    def __init__(self, delay_s: float, holder: list[Worker]) -> None:
        super().__init__()
        self.inner = tabular.build_model()
        self.delay_s, self.holder = delay_s, holder
        self.seen: list[tuple[int, bool]] = []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        claimer = self.holder[0].claimer
        at_tail = claimer.at_tail()
        self.seen.append((len(claimer.heartbeat_fields()["queue"]), at_tail))
        time.sleep(self.delay_s)
        out: torch.Tensor = self.inner(x)
        return out


# Hooks of 30 ms a batch (sleeps: no CPU), also for the worker subprocess below.
def slow_preprocess(batch: pa.RecordBatch) -> torch.Tensor:
    time.sleep(0.03)
    return tabular.preprocess(batch)


def slow_postprocess(output: torch.Tensor, batch: pa.RecordBatch) -> dict[str, np.ndarray]:
    time.sleep(0.03)
    return tabular.postprocess(output, batch)


def _run(plan_uri: str, model: _Sampling, holder: list[Worker], **hooks: Any) -> WorkerSummary:
    code = JobCode.in_process(model, id_column="txn_id", **hooks)
    holder.append(Worker(Ledger.open(plan_uri), WorkerIdentity("w0"), code))
    return holder[0].run()


@pytest.mark.parametrize("alone", [False, True])
def test_small_shards_through_slow_stages_are_read_ahead_and_the_tail_holds_one_ahead(
    small: tuple[pathlib.Path, pa.Table], tmp_path: pathlib.Path, alone: bool
) -> None:
    """Three stages of 30 ms a batch and one-batch shards: holding two tries, the model would
    wait for each shard's preprocessing. The window widens; at the tail it is two again, where
    another worker has beaten (here one that finished: a listing does not say). A worker alone
    keeps no one from a shard by holding it, so it holds what its stages need to the end."""
    directory, table = small
    plan_uri = _one_batch_shards(directory, tmp_path / "out")
    if not alone:
        Ledger.open(plan_uri).heartbeat(WorkerIdentity("other"), 1, state="finished", stats={})
    holder: list[Worker] = []
    model = _Sampling(0.03, holder)
    summary = _run(plan_uri, model, holder, preprocess=slow_preprocess, postprocess=slow_postprocess)
    assert holder[0].read_ahead_rows() == 100 * (5 + 4)  # read, preprocess, model, postprocess, write; a queue
    assert summary.outcome == "finished" and summary.shards_committed == 30
    assert sorted(_committed_ids(plan_uri)) == sorted(table.column("txn_id").to_pylist())
    held = [n for n, _ in model.seen]
    assert max(held) > TAIL_LEASES  # read ahead beyond the next shard
    assert max(held) <= MAX_LEASES
    at_tail = [n for n, tail in model.seen if tail]
    assert at_tail and (max(at_tail) > TAIL_LEASES) is alone


def test_a_model_that_never_waits_keeps_the_window_at_two(
    small: tuple[pathlib.Path, pa.Table], tmp_path: pathlib.Path
) -> None:
    """One slow stage (100 ms a batch) and fast hooks: the next shard is read long before the
    model wants it, so holding more would only keep shards from idle workers."""
    directory, _ = small
    plan_uri = _one_batch_shards(directory, tmp_path / "out")
    holder: list[Worker] = []
    model = _Sampling(0.1, holder)
    summary = _run(plan_uri, model, holder, preprocess=tabular.preprocess)
    assert summary.shards_committed == 30
    assert max(n for n, _ in model.seen) == TAIL_LEASES
    assert summary.claiming["read_ahead_window"] == TAIL_LEASES  # the most tries held at once


@pytest.mark.parametrize(("model_stages", "window"), [(1, TAIL_LEASES), (2, 3), (3, 4), (MAX_LEASES + 3, MAX_LEASES)])
def test_a_chain_starts_with_a_try_for_each_model_and_one_ahead(model_stages: int, window: int) -> None:
    """A chain of models on devices fills without waiting for the first commit; one model
    starts with two, as every worker did before chains needed more."""
    assert first_window(model_stages) == window


def _held(ledger: Ledger) -> set[str]:
    """Shards claimed and not committed (nothing is released here)."""
    claimed = {name.split("/")[-2] for name in ledger.store.list("claims")}
    return claimed - ledger.committed_shards()


@pytest.mark.slow
def test_a_worker_killed_holding_tries_read_ahead_loses_and_duplicates_nothing(
    small: tuple[pathlib.Path, pa.Table], tmp_path: pathlib.Path, subprocess_env: dict[str, str]
) -> None:
    directory, table = small
    plan_uri = _one_batch_shards(directory, tmp_path / "out", lease_ttl_s=2.0)
    ledger = Ledger.open(plan_uri)
    env = {**subprocess_env, "ANTBATCH_TEST_BATCH_DELAY": "0.03"}
    command = worker_command(plan_uri, "victim", preprocess_workers=0, cpu_budget=1)
    victim = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 60
        while len(held := _held(ledger)) <= TAIL_LEASES:
            assert victim.poll() is None and time.monotonic() < deadline, "the victim never read ahead"
            time.sleep(0.02)
        os.kill(victim.pid, signal.SIGKILL)
    finally:
        victim.kill()
        victim.wait()
    lost = _held(ledger)
    assert len(lost) > TAIL_LEASES and held <= lost | ledger.committed_shards()
    code = JobCode.in_process(tabular.build_model(), preprocess=tabular.preprocess, id_column="txn_id")
    summary = Worker(ledger, WorkerIdentity("survivor"), code).run()
    assert summary.outcome == "finished"
    ids = _committed_ids(plan_uri)
    assert not [i for i, n in collections.Counter(ids).items() if n > 1]
    assert sorted(ids) == sorted(table.column("txn_id").to_pylist())
    # Each try the victim held was taken over once its lease ran out: a second claim.
    second = {name.split("/")[-2] for name in ledger.store.list("claims") if name.endswith("/0001.json")}
    assert lost <= second
