"""The bad-input matrix: every case gives an error naming the file, shard or parameter, and
nothing already committed is lost.

Rows covered elsewhere: an unknown format and a model import error (tests/test_cli.py), a
model factory error (tests/worker/test_user_code.py), a preprocess hook raising on one record
and the quarantine limit (tests/worker/test_pipeline.py), a malformed or foreign ledger file
(tests/test_ledger.py), a store without atomic create-if-absent (tests/test_store.py), a
changed input and another job on the same output (tests/test_planning.py).
"""

from __future__ import annotations

import collections
import json
import pathlib
import re
from collections.abc import Callable
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from airflow_antbatch.errors import InputError, InputNotFoundError, StoreError
from airflow_antbatch.ledger import Ledger, WorkerIdentity
from airflow_antbatch.planning import plan_job
from airflow_antbatch.spec import JobSpec
from airflow_antbatch.worker.job_code import JobCode
from airflow_antbatch.worker.loop import Worker, WorkerSummary
from airflow_antbatch.worker.pipeline import PipelineOptions

MODEL = "tests.user_code:build_row_sum_model"


def _spec(tmp_path: pathlib.Path, **fields: Any) -> JobSpec:
    base: dict[str, Any] = {
        "input_uri": str(tmp_path / "in"),
        "output_uri": str(tmp_path / "out"),
        "model": MODEL,
        "id_column": "id",
        # a.* fills a shard of its own (20 rows; text files are packed up to max_shard_rows), so
        # the bad b.* fails only its own shard
        "max_shard_rows": 20,
        "max_shard_attempts": 1,
    }
    return JobSpec(**{**base, **fields})


def _run(spec: JobSpec) -> tuple[WorkerSummary, Ledger]:
    ledger = Ledger.open(plan_job(spec).plan_uri)
    options = PipelineOptions(cpu_budget=1, preprocess_workers=0)
    return Worker(ledger, WorkerIdentity("w0"), JobCode.load(spec), options=options).run(), ledger


def _committed_ids(ledger: Ledger) -> list[int]:
    root = pathlib.Path(ledger.plan.spec.output_uri)
    return [i for r in ledger.commit_records() for i in pq.read_table(root / r.file)["id"].to_pylist()]


def _rows(first: int, count: int) -> list[dict[str, Any]]:
    return [{"id": i, "amount": float(i), "qty": 2.0} for i in range(first, first + count)]


def _jsonl(path: pathlib.Path, rows: list[dict[str, Any]], tail: str = "") -> None:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows) + tail)


def _csv(path: pathlib.Path, header: list[str], rows: list[list[Any]]) -> None:
    path.write_text(",".join(header) + "\n" + "".join(",".join(map(str, r)) + "\n" for r in rows))


# -- worker side: the bad file's shard fails, naming it; the other shards are committed ----------

WorkerCase = tuple[Callable[[pathlib.Path], None], str, str]
WORKER_CASES: dict[str, WorkerCase] = {
    "truncated-jsonl-line": (
        lambda d: (_jsonl(d / "a.jsonl", _rows(0, 20)), _jsonl(d / "b.jsonl", _rows(20, 5), '{"id": 25, "amou')),
        "jsonl",
        r"cannot read jsonl file file://.*/b\.jsonl: JSON parse error",
    ),
    "csv-with-wrong-columns": (
        lambda d: (
            _csv(d / "a.csv", ["id", "amount", "qty"], [[i, i, 2] for i in range(20)]),
            _csv(d / "b.csv", ["id", "price"], [[i, 1] for i in range(20, 25)]),
        ),
        "csv",
        r"input file file://.*/b\.csv has other columns than file://.*/a\.csv, which the job was planned from: "
        r"missing \['amount', 'qty'\], unexpected \['price'\]",
    ),
}


@pytest.mark.parametrize("case", list(WORKER_CASES))
def test_a_bad_file_fails_its_shard_by_name_and_the_rest_is_committed(case: str, tmp_path: pathlib.Path) -> None:
    write, fmt, message = WORKER_CASES[case]
    (tmp_path / "in").mkdir()
    write(tmp_path / "in")
    summary, ledger = _run(_spec(tmp_path, input_format=fmt))
    [(shard_id, error)] = ledger.status().failures
    assert re.search(message, error), error
    assert summary.failed_for_good == [shard_id]
    committed = collections.Counter(_committed_ids(ledger))
    assert set(range(20)) <= committed.keys() and max(committed.values()) == 1


def test_a_model_that_raises_on_one_batch_fails_that_shard_only(
    tmp_path: pathlib.Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    (tmp_path / "in").mkdir()
    for first in (0, 20, 40):
        pq.write_table(pa.Table.from_pylist(_rows(first, 20)), tmp_path / "in" / f"p{first:02d}.parquet")
    monkeypatch.setenv("ANTBATCH_TEST_BAD_ID", "25")
    _, ledger = _run(_spec(tmp_path))
    [(shard_id, error)] = ledger.status().failures
    assert "stage 'model': model raised RuntimeError('cannot score row 25') on a batch of 20 rows" in error
    assert shard_id in {s.shard_id for s in ledger.plan.shards if "p20" in s.pieces[0].path}
    assert sorted(_committed_ids(ledger)) == list(range(20)) + list(range(40, 60))


def test_an_enormous_row_is_scored_like_any_other(tmp_path: pathlib.Path) -> None:
    (tmp_path / "in").mkdir()
    blob = pa.array(["x" * (48 * 2**20), "small"], pa.large_string())
    table = pa.table({"id": [0, 1], "amount": [1.0, 2.0], "blob": blob})
    pq.write_table(table, tmp_path / "in" / "big.parquet")
    summary, ledger = _run(_spec(tmp_path, keep_columns=("blob",), preprocess="tests.user_code:amount_only"))
    assert summary.failed_for_good == [] and sorted(_committed_ids(ledger)) == [0, 1]


def test_zero_byte_files_are_skipped_with_a_warning(tmp_path: pathlib.Path, caplog: pytest.LogCaptureFixture) -> None:
    (tmp_path / "in").mkdir()
    _jsonl(tmp_path / "in" / "a.jsonl", _rows(0, 20))
    (tmp_path / "in" / "empty.jsonl").write_bytes(b"")
    _, ledger = _run(_spec(tmp_path))
    assert "skipping zero-byte input file" in caplog.text and "empty.jsonl" in caplog.text
    assert sorted(_committed_ids(ledger)) == list(range(20))


# -- plan side: refused before anything is claimed, naming the file or parameter ----------------


def _drifting_parquet(d: pathlib.Path) -> None:
    pq.write_table(pa.Table.from_pylist(_rows(0, 5)), d / "a.parquet")
    drifted = [{**r, "amount": str(r["amount"])} for r in _rows(5, 5)]
    pq.write_table(pa.Table.from_pylist(drifted), d / "b.parquet")


PLAN_CASES: dict[str, tuple[Callable[[pathlib.Path], None], type[Exception], str]] = {
    "corrupt-parquet": (
        lambda d: (d / "a.parquet").write_bytes(b"PAR1 this is not parquet"),
        InputError,
        r"input file file://.*/a\.parquet is not a readable Parquet file",
    ),
    "schema-drift-across-files": (
        _drifting_parquet,
        InputError,
        r"input file file://.*/b\.parquet does not match the schema of file://.*/a\.parquet: 'amount' is string "
        r"here, double there",
    ),
    "empty-input": (lambda d: None, InputNotFoundError, r"input directory .*/in holds no data files"),
    "only-zero-byte-files": (
        lambda d: (d / "a.jsonl").write_bytes(b""),
        InputNotFoundError,
        r"holds no non-empty data files",
    ),
    "malformed-first-jsonl-line": (
        lambda d: (d / "a.jsonl").write_text("not json\n"),
        InputError,
        r"cannot read the first jsonl line of input file file://.*/a\.jsonl",
    ),
}


@pytest.mark.parametrize("case", list(PLAN_CASES))
def test_bad_input_is_refused_at_plan_time_by_name(case: str, tmp_path: pathlib.Path) -> None:
    write, error, message = PLAN_CASES[case]
    (tmp_path / "in").mkdir()
    write(tmp_path / "in")
    with pytest.raises(error, match=message):
        plan_job(_spec(tmp_path))
    assert not (tmp_path / "out").exists()


def test_a_missing_input_path_is_named(tmp_path: pathlib.Path) -> None:
    with pytest.raises(InputNotFoundError, match=f"input {tmp_path}/nowhere does not exist"):
        plan_job(_spec(tmp_path, input_uri=str(tmp_path / "nowhere")))


def test_an_output_that_cannot_be_written_is_named_and_earlier_output_is_kept(tmp_path: pathlib.Path) -> None:
    (tmp_path / "in").mkdir()
    pq.write_table(pa.Table.from_pylist(_rows(0, 20)), tmp_path / "in" / "a.parquet")
    _, ledger = _run(_spec(tmp_path))
    before = {p: p.read_bytes() for p in (tmp_path / "out").rglob("*") if p.is_file()}
    (tmp_path / "blocker").write_text("a file where a directory should be")
    with pytest.raises(StoreError, match=re.escape(str(tmp_path / "blocker" / "out"))):
        plan_job(_spec(tmp_path, output_uri=str(tmp_path / "blocker" / "out")))
    assert {p: p.read_bytes() for p in (tmp_path / "out").rglob("*") if p.is_file()} == before
    assert collections.Counter(_committed_ids(ledger)) == collections.Counter(range(20))


# -- a hook that fails on every batch stops the job after same_error_limit shards ---------------


def test_a_preprocess_that_fails_every_shard_stops_the_job_after_the_limit(tmp_path: pathlib.Path) -> None:
    """Not 3 tries on every one of 12 shards: the same error on 3 shards in a row stops it all,
    the status names the error once, and a second worker stops at its first failure."""
    (tmp_path / "in").mkdir()
    for first in range(0, 240, 20):
        pq.write_table(pa.Table.from_pylist(_rows(first, 20)), tmp_path / "in" / f"p{first:03d}.parquet")
    spec = _spec(
        tmp_path,
        preprocess="tests.user_code:preprocess_to_string",
        max_shard_attempts=3,
        same_error_limit=3,
        target_shard_bytes=2**20,
        max_shard_rows=20,
    )
    summary, ledger = _run(spec)
    assert len(ledger.plan.shards) == 12
    # the limit, plus at most the one shard read ahead while the third failed
    assert 3 <= summary.shards_failed <= 4 and summary.shards_committed == 0, summary
    assert summary.stopped_job is not None and "'str' object has no attribute" in summary.stopped_job
    status = Ledger.open(ledger.plan_uri).status()
    assert status.stopped == summary.stopped_job and status.finished and not status.succeeded
    assert {error for _, error in status.failures} == {summary.stopped_job}

    options = PipelineOptions(cpu_budget=1, preprocess_workers=0)
    late = Worker(Ledger.open(ledger.plan_uri), WorkerIdentity("w1"), JobCode.load(spec), options=options).run()
    assert (late.shards_failed, late.stopped_job) == (0, summary.stopped_job)  # done.json said so at its start
