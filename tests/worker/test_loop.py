"""The worker loop in-process: commits, skips on rerun, releases on stop, fails bad shards for good."""

from __future__ import annotations

import dataclasses
import pathlib
import threading
import time

import pyarrow as pa
import pyarrow.parquet as pq

from airflow_antbatch import layout
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


def test_a_try_overtaken_at_the_tail_is_dropped_or_handed_over(plan_uri: str) -> None:
    """NOTE [races]: once the worker holds its last two tries, another worker backs both up and
    commits the first. The worker drops the first try's rows at once (wasted: its 500 rows),
    hands the second over unscored (released, nothing wasted), and, the backer never finishing
    (it has no heartbeat: gone after a TTL), takes that shard over at its next try."""
    spec = dataclasses.replace(Ledger.open(plan_uri).plan.spec, lease_ttl_s=1.0)
    plan_uri = plan_job(dataclasses.replace(spec, output_uri=spec.output_uri + "-raced", state_uri=None)).plan_uri
    backer, ledger = WorkerIdentity("backer"), Ledger.open(plan_uri)
    raced: list[tuple[str, str]] = []
    holder: list[Worker] = []

    def race_at_the_tail(batch: pa.RecordBatch) -> object:
        time.sleep(0.02)  # slower than the reader: it claims the last shard while the one before is preprocessed
        worker = holder[0]
        queue = worker.claimer.heartbeat_fields()["queue"]
        if not raced and len(queue) == 2 and worker.claimer.at_tail():
            (scoring, scoring_epoch, _), (queued, queued_epoch, _) = queue
            raced.append((scoring, queued))
            backup = ledger.back_up(scoring, scoring_epoch, backer)
            assert backup is not None and ledger.commit(backup, file="backer.parquet", rows=500)
            assert ledger.back_up(queued, queued_epoch, backer) is not None
            deadline = time.monotonic() + 10
            while worker.pipeline.flow.shards[queued].error is None:  # the race watch saw it
                assert time.monotonic() < deadline
                time.sleep(0.01)
        return tabular.preprocess(batch)

    code = JobCode.in_process(tabular.build_model(), preprocess=race_at_the_tail, id_column="txn_id")
    holder.append(_worker(plan_uri, "w0", code, poll_interval_s=0.2))
    summary = holder[0].run()
    ((scoring, queued),) = raced
    assert summary.outcome == "finished"
    assert (summary.shards_lost, summary.rows_lost, summary.shards_handed_over) == (1, 500, 1)
    assert summary.shards_committed == 5  # four before the race, and the handed-over shard's next try
    commits = {r.shard_id: (r.epoch, r.token) for r in ledger.commit_records()}
    assert len(commits) == 6
    assert commits[scoring] == (1, backer.token)
    assert commits[queued] == (2, summary.token)  # try 1 was the backup, whose owner never beat
    release = ledger.store.read(f"releases/{layout.key_prefix(queued)}/{queued}/0000.json")
    assert release is not None and b"handed over to a backup" in release
