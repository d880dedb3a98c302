"""Scoring while the preprocess processes start: first tries are preprocessed in the worker until a
process is ready, retried shards wait for the pool, and a pool that cannot start fails the worker."""

from __future__ import annotations

import json
import os
import pathlib
import subprocess
import sys
import time
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from airflow_antbatch.errors import WorkerError
from airflow_antbatch.ledger import Ledger, WorkerIdentity
from airflow_antbatch.planning import plan_job
from airflow_antbatch.spec import JobSpec
from airflow_antbatch.worker.job_code import JobCode
from airflow_antbatch.worker.loop import Worker
from airflow_antbatch.worker.pipeline import PipelineOptions
from airflow_antbatch.worker.preprocess_pool import PreprocessPool
from tests.conftest import TABULAR, write_transactions
from tests.pool_start_hooks import preprocessed_by
from tests.worker.test_pipeline import second_tries

HOOKS = "tests.pool_start_hooks"


@pytest.fixture(scope="module", autouse=True)
def _forkserver_up() -> None:
    """The forkserver has imported torch before a test starts its clock: on a busy machine its
    first start alone can outlast a job, and the tests time the processes' own start."""
    pool = PreprocessPool(f"{HOOKS}:starts_in_0s", 1)
    pool.wait_ready()
    pool.close()


def _job(
    tmp_path: pathlib.Path, hook: str, rows: int, max_shard_rows: int, crash: int | None = None, batch_size: int = 50
) -> tuple[Ledger, pa.Table, str]:
    """One input file whose every row tells the hook where to note who preprocessed it, but the
    ``crash`` row, which ends the process that preprocesses it."""
    log = str(tmp_path / "preprocessed.log")
    table = write_transactions(tmp_path / "in", files=1, rows_per_file=rows, row_group_size=250)
    [path] = (tmp_path / "in").glob("*.parquet")
    merchants = ["CRASH" if i == crash else f"LOG:{log}" for i in table["txn_id"].to_pylist()]
    marked = table.set_column(table.schema.get_field_index("merchant"), "merchant", pa.array(merchants))
    pq.write_table(marked, path, row_group_size=250)
    spec = JobSpec(
        input_uri=str(tmp_path / "in"),
        output_uri=str(tmp_path / "out"),
        model=f"{TABULAR}:build_model",
        preprocess=f"{HOOKS}:{hook}",
        postprocess=f"{TABULAR}:postprocess",
        id_column="txn_id",
        batch_size=batch_size,
        max_shard_rows=max_shard_rows,
        lease_ttl_s=30.0,
    )
    return Ledger.open(plan_job(spec).plan_uri), table, log


def _worker(ledger: Ledger, **options: Any) -> Worker:
    code = JobCode.load(ledger.plan.spec)
    return Worker(ledger, WorkerIdentity("w0"), code, options=PipelineOptions(**{"cpu_budget": 2, **options}))


def _output_ids(ledger: Ledger) -> dict[str, list[int]]:
    root = pathlib.Path(ledger.plan.spec.output_uri)
    return {r.shard_id: pq.read_table(root / r.file)["txn_id"].to_pylist() for r in ledger.commit_records()}


def test_a_job_shorter_than_the_pool_start_is_scored_without_waiting_for_it(tmp_path: pathlib.Path) -> None:
    ledger, table, log = _job(tmp_path, "starts_in_60s", rows=500, max_shard_rows=500)
    started = time.monotonic()
    summary = _worker(ledger).run()
    took = time.monotonic() - started
    assert summary.outcome == "finished" and summary.rows_committed == 500
    assert took < 30, f"the worker waited for its preprocess processes ({took:.1f}s)"  # they take 60 s
    assert preprocessed_by(log) == {os.getpid(): table["txn_id"].to_pylist()}  # all here, in order, once
    assert list(_output_ids(ledger).values()) == [table["txn_id"].to_pylist()]


def test_the_worker_hands_over_to_the_processes_once_they_are_ready(tmp_path: pathlib.Path) -> None:
    ledger, table, log = _job(tmp_path, "starts_in_1s", rows=10_000, max_shard_rows=10_000)
    worker = _worker(ledger, preprocess_workers=1)
    summary = worker.run()
    assert summary.outcome == "finished" and summary.rows_committed == 10_000
    by_pid = preprocessed_by(log)
    here = by_pid.pop(os.getpid(), [])
    assert here and by_pid, f"preprocessed here: {len(here)} rows, by processes: {sum(map(len, by_pid.values()))}"
    assert worker.pipeline.rows_preprocessed_inline == len(here)
    assert here == table["txn_id"].to_pylist()[: len(here)]  # the first batches, until the hand-over
    assert sorted(here + [i for ids in by_pid.values() for i in ids]) == table["txn_id"].to_pylist()
    assert list(_output_ids(ledger).values()) == [table["txn_id"].to_pylist()]  # input order kept


@pytest.mark.parametrize("retried", [0, 1])
def test_a_retried_shard_is_never_preprocessed_in_the_worker(tmp_path: pathlib.Path, retried: int) -> None:
    """Nor is anything after it: the first of the plan's two shards is claimed first, so when
    it is the retried one, every row waits for the pool."""
    ledger, table, log = _job(tmp_path, "starts_in_3s", rows=500, max_shard_rows=250)
    shard_id = ledger.plan.shards[retried].shard_id
    second_tries(ledger, [shard_id])
    worker = _worker(ledger, preprocess_workers=1)
    summary = worker.run()
    assert summary.outcome == "finished" and summary.rows_committed == 500
    here = preprocessed_by(log).get(os.getpid(), [])
    assert not set(here) & set(_output_ids(ledger)[shard_id])
    if retried == 0:
        assert here == [] and worker.pipeline.rows_preprocessed_inline == 0
    assert sorted(i for ids in preprocessed_by(log).values() for i in ids) == table["txn_id"].to_pylist()


def test_a_pool_that_cannot_start_fails_the_worker_and_releases_its_leases(tmp_path: pathlib.Path) -> None:
    ledger, _, log = _job(tmp_path, "never_starts", rows=500, max_shard_rows=250)
    second_tries(ledger, [s.shard_id for s in ledger.plan.shards])  # so the pool must start
    with pytest.raises(WorkerError, match=r"preprocess processes cannot start \(preprocess hook '[\w.]+:never_starts'"):
        _worker(ledger).run()
    status = Ledger.open(ledger.plan_uri).status()
    assert status.leased == 0 and status.committed == 0
    assert not pathlib.Path(log).exists()


@pytest.mark.slow
def test_a_record_that_crashes_the_worker_on_a_first_try_is_quarantined_on_the_second(tmp_path: pathlib.Path) -> None:
    """The price of not waiting for the pool: such a record ends the worker, and the rerun's
    second tries go to the pool, which quarantines it. Nothing is lost or written twice."""
    # Batches of one row: the pool needs two processes (each 3 s to start) to quarantine the record.
    ledger, table, _ = _job(tmp_path, "starts_in_3s", rows=500, max_shard_rows=250, crash=20, batch_size=1)
    worker = [sys.executable, "-m", "airflow_antbatch", "worker", "--spec", ledger.plan_uri, "--worker-id", "w0"]
    root = pathlib.Path(__file__).parents[2]
    first = subprocess.run(worker, cwd=root, capture_output=True, text=True, timeout=300, check=False)
    assert first.returncode == 3, first.stderr[-3000:]  # the record's exit, in the worker itself
    assert ledger.commit_records() == [] or all(20 not in ids for ids in _output_ids(ledger).values())
    second = subprocess.run(worker, cwd=root, capture_output=True, text=True, timeout=300, check=False)
    assert second.returncode == 0, second.stderr[-3000:]
    ids = [i for shard in _output_ids(ledger).values() for i in shard]
    assert sorted(ids) == [i for i in table["txn_id"].to_pylist() if i != 20]
    [record] = [r for r in ledger.commit_records() if r.quarantined]
    bad = pq.read_table(pathlib.Path(ledger.plan.spec.output_uri) / str(record.quarantine_file))
    assert bad["txn_id"].to_pylist() == [20]
    assert "exited with code 3" in bad["_antbatch_reason"][0].as_py()


@pytest.mark.slow
def test_antbatch_run_quarantines_a_crashing_record_of_a_first_try_in_the_same_command(tmp_path: pathlib.Path) -> None:
    """`antbatch run`'s worker is the command itself: it waits for the preprocess processes, so
    such a record is quarantined there instead of ending the command."""
    ledger, table, log = _job(tmp_path, "starts_in_1s", rows=200, max_shard_rows=200, crash=20, batch_size=20)
    spec = ledger.plan.spec
    command = [sys.executable, "-m", "airflow_antbatch", "run", "--input", spec.input_uri, "--output", spec.output_uri]
    command += ["--model", str(spec.model), "--preprocess", str(spec.preprocess)]
    command += ["--postprocess", str(spec.postprocess)]
    command += ["--id-column", "txn_id", "--batch-size", "20", "--max-shard-rows", "200", "--json"]
    root = pathlib.Path(__file__).parents[2]
    with subprocess.Popen(command, cwd=root, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) as run:
        stdout, stderr = run.communicate(timeout=300)
    assert run.returncode == 0, stderr[-3000:]
    [summary] = [w["summary"] for w in json.loads(stdout)["workers"]]
    assert summary["rows_committed"] == 199 and summary["rows_quarantined"] == 1 and summary["shards_failed"] == 0
    by_pid = preprocessed_by(log)
    assert by_pid and run.pid not in by_pid  # every row went through the preprocess processes
    ids = sorted(i for shard in _output_ids(ledger).values() for i in shard)
    assert ids == [i for i in table["txn_id"].to_pylist() if i != 20]
