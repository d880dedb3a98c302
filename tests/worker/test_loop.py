"""The worker loop in-process: commits, skips on rerun, releases on stop, fails bad shards for good."""

from __future__ import annotations

import dataclasses
import pathlib
import threading

import pyarrow as pa
import pyarrow.parquet as pq

from airflow_antbatch.examples import tabular
from airflow_antbatch.ledger import Ledger, WorkerIdentity
from airflow_antbatch.planning import plan_job
from airflow_antbatch.worker.job_code import JobCode
from airflow_antbatch.worker.loop import MAX_LEASES, Worker


def _worker(plan_uri: str, worker_id: str, code: JobCode | None = None, **kw: object) -> Worker:
    code = code or JobCode.in_process(tabular.build_model(), preprocess=tabular.preprocess, id_column="txn_id")
    return Worker(Ledger.open(plan_uri), WorkerIdentity(worker_id), code, **kw)  # type: ignore[arg-type]


def test_one_worker_commits_every_shard_once(plan_uri: str, transactions: tuple[pathlib.Path, pa.Table]) -> None:
    summary = _worker(plan_uri, "w0").run()
    assert summary.outcome == "finished"
    assert summary.shards_committed == 6
    assert summary.rows_committed == 3000
    ledger = Ledger.open(plan_uri)
    records = ledger.commit_records()
    out = pq.read_table([str(pathlib.Path(ledger.plan.spec.output_uri) / r.file) for r in records])
    assert sorted(out.column("txn_id").to_pylist()) == sorted(transactions[1].column("txn_id").to_pylist())
    status = ledger.status()
    assert status.succeeded and status.rows_committed == 3000 and status.eta_s == 0.0


def test_rerun_skips_committed_shards_without_claiming(plan_uri: str) -> None:
    _worker(plan_uri, "w0").run()
    again = _worker(plan_uri, "w0")
    summary = again.run()
    assert (summary.shards_skipped, summary.shards_committed) == (6, 0)
    assert "create" not in summary.requests  # not a single claim attempted


def test_stop_releases_the_shard_in_hand_for_others(plan_uri: str) -> None:
    stop = threading.Event()

    def stop_after_first_batch(batch: pa.RecordBatch) -> object:
        stop.set()
        return tabular.preprocess(batch)

    code = JobCode.in_process(tabular.build_model(), preprocess=stop_after_first_batch, id_column="txn_id")
    preempted = _worker(plan_uri, "w0", code, stop=stop).run()
    assert preempted.outcome == "preempted"
    assert preempted.shards_committed == 0
    # The shard in the model stages and the one read ahead, at most, both given back.
    releases = Ledger.open(plan_uri).store.list("releases")
    assert 1 <= len(releases) <= MAX_LEASES
    # The released try is taken over at once by another worker: no lease TTL to wait out.
    summary = _worker(plan_uri, "w1").run()
    assert summary.shards_committed == 6


def test_failing_shards_fail_for_good_after_max_attempts(plan_uri: str) -> None:
    """With same_error_limit out of reach, every shard gets its max_shard_attempts tries."""
    from tests.slow_model import build_failing_model

    spec = dataclasses.replace(Ledger.open(plan_uri).plan.spec, same_error_limit=100)
    plan_uri = plan_job(dataclasses.replace(spec, output_uri=spec.output_uri + "-patient", state_uri=None)).plan_uri
    code = JobCode.in_process(build_failing_model(), preprocess=tabular.preprocess)
    summary = _worker(plan_uri, "w0", code).run()
    assert summary.outcome == "finished"
    assert summary.shards_failed == 6 * 3
    assert len(summary.failed_for_good) == 6
    status = Ledger.open(plan_uri).status()
    assert status.failed == 6 and status.finished and not status.succeeded
    assert "boom on a batch of 100 rows" in status.failures[0][1]


def test_a_late_worker_takes_whatever_is_left(plan_uri: str, transactions: tuple[pathlib.Path, pa.Table]) -> None:
    """The fan-out is sized from the plan, but no shard belongs to a worker: a pod that starts
    late, or a retry, commits only what the others left, and together they cover every row once."""
    stop = threading.Event()
    ledger = Ledger.open(plan_uri)

    def stop_once_a_shard_is_committed(batch: pa.RecordBatch) -> object:
        if ledger.committed_shards():
            stop.set()
        return tabular.preprocess(batch)

    code = JobCode.in_process(tabular.build_model(), preprocess=stop_once_a_shard_is_committed, id_column="txn_id")
    early = _worker(plan_uri, "w0", code, stop=stop).run()
    assert early.outcome == "preempted" and 1 <= early.shards_committed < 6
    late = _worker(plan_uri, "w1").run()
    assert (late.shards_skipped, late.shards_committed) == (early.shards_committed, 6 - early.shards_committed)
    records = Ledger.open(plan_uri).commit_records()
    out = pq.read_table([str(pathlib.Path(ledger.plan.spec.output_uri) / r.file) for r in records])
    assert sorted(out.column("txn_id").to_pylist()) == sorted(transactions[1].column("txn_id").to_pylist())
