"""NOTE [drain]: what a stopped worker finishes before it exits, and what it gives back."""

from __future__ import annotations

import json
import pathlib
import threading

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from hypothesis import given
from hypothesis import strategies as st

from airflow_antbatch.examples import tabular
from airflow_antbatch.ledger import Ledger, WorkerIdentity
from airflow_antbatch.planning import plan_job
from airflow_antbatch.spec import JobSpec
from airflow_antbatch.worker.drain import (
    DRAIN_MARGIN_S,
    RecentPace,
    drain_budget,
    estimated_rows,
    slowest,
    tries_to_finish,
)
from airflow_antbatch.worker.job_code import JobCode
from airflow_antbatch.worker.loop import Worker
from tests.slow_model import SlowModel
from tests.worker.conftest import tabular_spec


@pytest.mark.parametrize(
    ("rows_left", "rows_per_s", "budget_s", "kept"),
    [
        ([500, 500, 500], 100.0, 12.0, 2),  # 5 s each: two fit in 12 s
        ([100, 500], 100.0, 3.0, 1),  # nearly done, then a whole shard: only the first
        ([500], 100.0, 4.0, 0),  # 5 s left of it: given back at once, not at the deadline
        ([500, 500], None, 30.0, 1),  # no pace yet: the first only
        ([None, 500], 100.0, 30.0, 1),  # rows not known: the first only
        ([100, None, 100], 100.0, 30.0, 1),  # ... and never past one not known
        ([500, 100], 100.0, 3.0, 0),  # the first does not fit: nothing kept behind it
        ([500], 100.0, 0.0, 0),  # no budget: today's release at once
        ([], 100.0, 30.0, 0),
    ],
)
def test_tries_to_finish_keeps_the_front_that_fits(
    rows_left: list[int | None], rows_per_s: float | None, budget_s: float, kept: int
) -> None:
    assert tries_to_finish(rows_left, rows_per_s, budget_s) == kept


@given(
    st.lists(st.integers(0, 10_000), max_size=8),
    st.floats(1.0, 1e5),
    st.floats(0.0, 600.0),
)
def test_what_is_kept_commits_within_the_budget_at_the_pace(
    rows_left: list[int], rows_per_s: float, budget_s: float
) -> None:
    kept = tries_to_finish(rows_left, rows_per_s, budget_s)
    assert 0 <= kept <= len(rows_left)
    assert sum(rows_left[:kept]) / rows_per_s <= budget_s
    if kept < len(rows_left) and budget_s > 0:  # the longest such front: one more would not fit
        assert sum(rows_left[: kept + 1]) / rows_per_s > budget_s


def test_a_straggler_is_judged_by_its_own_rate_not_the_recent_pace() -> None:
    """Half of a ten-times-slower shard left at a pace of 100 rows/s looks like 2.5 s; at its
    own rate so far it is 25 s: not worth 10 s of the heir's wait."""
    assert slowest(100.0, 10.0) == 10.0 and slowest(None, 10.0) == 10.0 and slowest(None, None) is None
    assert tries_to_finish([250], 100.0, 10.0) == 1
    assert tries_to_finish([250], slowest(100.0, 10.0), 10.0) == 0


def test_the_pace_leaves_out_the_first_commit_and_the_budget_the_margin() -> None:
    pace = RecentPace()
    assert pace.rows_per_byte() is None
    pace.committed(10.0, 500, 50_000)  # its rows took the pipeline's fill too
    assert pace.rows_per_s() is None and pace.rows_per_byte() == 0.01  # but not the rows' length
    pace.committed(12.0, 400, 30_000)
    pace.committed(14.0, 600, 70_000)
    assert pace.rows_per_s() == 250.0 and pace.rows_per_byte() == 0.01
    assert drain_budget(60) == 60 - DRAIN_MARGIN_S
    assert drain_budget(None) == 30 - DRAIN_MARGIN_S  # Kubernetes' default grace period
    assert drain_budget(5) == 0.0


@pytest.fixture
def jsonl_spec(tmp_path: pathlib.Path, transactions: tuple[pathlib.Path, pa.Table]) -> JobSpec:
    """The transactions as three JSON-lines files, which the plan cuts by bytes at about 500
    estimated rows a shard: rows it can only guess."""
    directory = tmp_path / "jsonl"
    directory.mkdir()
    for i, part in enumerate(transactions[1].to_batches(max_chunksize=1000)):
        (directory / f"part-{i}.jsonl").write_text("".join(json.dumps(row) + "\n" for row in part.to_pylist()))
    return tabular_spec(str(directory), tmp_path)


def test_a_text_shards_rows_are_reckoned_from_its_bytes_at_the_committed_rows_per_byte(
    jsonl_spec: JobSpec,
) -> None:
    shards = list(plan_job(jsonl_spec).plan.shards)
    assert all(shard.rows is None for shard in shards)
    assert estimated_rows(shards[0], None) is None  # nothing committed yet: not known
    rows_per_byte = 3000 / sum(shard.size for shard in shards)  # what commits of every shard would say
    estimates = [estimated_rows(shard, rows_per_byte) for shard in shards]
    assert sum(e or 0 for e in estimates) == pytest.approx(3000, abs=len(shards))
    assert all(400 <= (e or 0) <= 540 for e in estimates[:-1])  # cut at about 500 estimated rows


def _stopping_worker(plan_uri: str, stop_after_batches: int, drain_s: float, delay_s: float = 0.0) -> Worker:
    """A worker whose preprocess hook sets its stop on the given batch: SIGTERM, mid-shard."""
    stop, batches = threading.Event(), []

    def preprocess(batch: pa.RecordBatch) -> object:
        batches.append(batch.num_rows)
        if len(batches) == stop_after_batches:
            stop.set()
        return tabular.preprocess(batch)

    code = JobCode.in_process(SlowModel(delay_s, None), preprocess=preprocess, id_column="txn_id")
    return Worker(Ledger.open(plan_uri), WorkerIdentity("w0"), code, stop=stop, drain_s=drain_s)


def _another_worker_commits(plan_uri: str, shards: int, table: pa.Table) -> None:
    """What the stopped worker gave back is scored whole by another: every row once in all."""
    ledger = Ledger.open(plan_uri)
    code = JobCode.in_process(tabular.build_model(), preprocess=tabular.preprocess, id_column="txn_id")
    assert Worker(ledger, WorkerIdentity("w1"), code).run().shards_committed == shards
    records = ledger.commit_records()
    out = pq.read_table([str(pathlib.Path(ledger.plan.spec.output_uri) / r.file) for r in records])
    assert sorted(out.column("txn_id").to_pylist()) == sorted(table.column("txn_id").to_pylist())


def test_a_stopped_worker_finishes_the_shard_in_hand_and_gives_back_the_rest(
    plan_uri: str, transactions: tuple[pathlib.Path, pa.Table]
) -> None:
    """Stopped on its first shard's second batch (no pace yet), with time to drain: it commits
    that shard instead of throwing its scored rows away, and gives the try read ahead back."""
    summary = _stopping_worker(plan_uri, stop_after_batches=2, drain_s=30.0).run()
    assert summary.outcome == "preempted"
    assert summary.shards_committed == 1 and summary.rows_committed == 500
    released = Ledger.open(plan_uri).store.list("releases")
    assert len(released) == summary.claiming["claims"] - 1  # every other try held, given back
    _another_worker_commits(plan_uri, 5, transactions[1])


def test_a_drain_that_runs_out_gives_the_shard_back_unfinished(
    plan_uri: str, transactions: tuple[pathlib.Path, pa.Table]
) -> None:
    """0.3 s to drain a shard of five 0.2 s batches: the kept try is given back when the budget
    runs out, none of its rows committed, and another worker scores it whole."""
    summary = _stopping_worker(plan_uri, stop_after_batches=1, drain_s=0.3, delay_s=0.2).run()
    assert summary.outcome == "preempted"
    assert summary.shards_committed == 0
    ledger = Ledger.open(plan_uri)
    assert len(ledger.store.list("releases")) == summary.claiming["claims"]
    assert not ledger.commit_records()
    _another_worker_commits(plan_uri, 6, transactions[1])


def test_a_worker_stopped_on_json_lines_drains_and_another_scores_the_rest_once(
    jsonl_spec: JobSpec, transactions: tuple[pathlib.Path, pa.Table]
) -> None:
    """Once it has committed a shard, the stopped worker reckons the rows of those in hand from
    their bytes; whatever it keeps or gives back, every row is scored once."""
    planned = plan_job(jsonl_spec)
    first = _stopping_worker(planned.plan_uri, stop_after_batches=16, drain_s=30.0).run()
    assert first.outcome == "preempted" and first.shards_committed >= 1
    _another_worker_commits(planned.plan_uri, len(planned.plan.shards) - first.shards_committed, transactions[1])
