"""``antbatch status``: the table, ``--json`` and ``--watch`` on a real ledger mid-run and after finish."""

from __future__ import annotations

import io
import json
import pathlib
import threading
import time

import pytest
from rich.console import Console

from airflow_antbatch import cli, layout
from airflow_antbatch.ledger import Lease
from airflow_antbatch.progress import JobProgress, throughput_timeline
from airflow_antbatch.status_view import duration, show, watch
from tests.progress_jobs import QUARANTINE_REASON, ROWS_PER_SHARD, SHARDS, RunningJob, mid_run
from tests.s3_servers import StoreLocation


def _status(capsys: pytest.CaptureFixture[str], *args: str) -> str:
    argv = list(args) if "status" in args else ["status", *args]
    assert cli.main(argv) == 0
    return capsys.readouterr().out


def test_table_mid_run_shows_shards_rows_workers_and_quarantine(
    tmp_path: pathlib.Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("COLUMNS", "200")
    job = mid_run(tmp_path)
    out = _status(capsys, str(tmp_path / "out"))  # the output URI resolves to the plan
    assert job.plan_uri in out and "running" in out
    assert f"3/{SHARDS} shards committed (38%)" in out
    # committed, leased, pending, failed, rows, rows/s, ETA, quarantined
    rows = 3 * ROWS_PER_SHARD - 2
    assert f"3 │      1 │       4 │      0 │ {rows} / {SHARDS * ROWS_PER_SHARD} │" in out
    assert "2 rows" in out
    worker_line = next(line for line in out.splitlines() if "worker-0" in line)
    assert "running" in worker_line and "125.0" in worker_line and "0s ago" in worker_line
    assert job.ledger.plan.shards[3].shard_id in worker_line  # the shard in hand
    assert "STALE" not in out


def test_json_mid_run_then_after_finish(tmp_path: pathlib.Path, capsys: pytest.CaptureFixture[str]) -> None:
    job = mid_run(tmp_path)
    doc = json.loads(_status(capsys, job.plan_uri, "--json"))
    assert (doc["planned"], doc["committed"], doc["leased"], doc["pending"], doc["failed"]) == (SHARDS, 3, 1, 4, 0)
    assert doc["rows_committed"] == 3 * ROWS_PER_SHARD - 2 and doc["rows_planned"] == SHARDS * ROWS_PER_SHARD
    assert doc["finished"] is False and doc["eta_s"] > 0
    assert doc["quarantined_rows"] == 2
    [quarantine] = doc["quarantine_files"]
    assert quarantine["rows"] == 2
    assert quarantine["uri"].endswith(layout.quarantine_name(job.ledger.plan.attempt, quarantine["shard_id"], 0))
    [worker] = doc["workers"]
    assert worker["worker_id"] == "worker-0" and worker["stale"] is False and worker["rows_per_s"] == 125.0
    assert doc["manifest_uri"] == str(tmp_path / "out" / "_SUCCESS")
    assert sum(p["rows_per_s"] for p in doc["timeline"]) > 0

    for i in range(3, SHARDS):
        job.commit(i)
    job.heartbeat("finished")
    done = json.loads(_status(capsys, str(tmp_path / "out"), "--json"))
    assert (done["committed"], done["leased"], done["pending"], done["finished"], done["succeeded"]) == (
        SHARDS,
        0,
        0,
        True,
        True,
    )
    assert done["eta_s"] == 0.0 and done["quarantined_rows"] == 2
    assert done["workers"][0]["state"] == "finished"


def test_table_after_finish_says_succeeded(
    tmp_path: pathlib.Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("COLUMNS", "200")
    job = RunningJob.plan(tmp_path)
    for i in range(SHARDS):
        job.commit(i)
    job.heartbeat("finished")
    out = _status(capsys, job.plan_uri)
    assert "succeeded" in out and f"{SHARDS}/{SHARDS} shards committed (100%)" in out
    assert "0 rows" in out  # nothing quarantined


@pytest.mark.parametrize("state", ["running", "draining"])  # draining: NOTE [drain], SIGKILLed mid-drain
def test_a_silent_live_worker_is_marked_stale(tmp_path: pathlib.Path, state: str) -> None:
    job = RunningJob.plan(tmp_path, lease_ttl_s=1.0)
    job.hold(0)
    job.heartbeat(state)
    console = Console(file=io.StringIO(), width=200)
    threading.Event().wait(1.2)  # the heartbeat goes quiet for longer than the lease TTL
    snap = show(JobProgress(job.plan_uri), as_json=False, console=console)
    assert snap.stale_workers() == [job.identity.token]
    assert "STALE" in console.file.getvalue()  # type: ignore[attr-defined]


def test_watch_redraws_until_the_job_is_settled(tmp_path: pathlib.Path) -> None:
    job = RunningJob.plan(tmp_path)
    progress = JobProgress(job.plan_uri)

    def finish() -> None:
        for i in range(SHARDS):
            job.commit(i)

    committer = threading.Timer(0.3, finish)
    committer.start()
    console = Console(file=io.StringIO(), width=200, force_terminal=True)
    snap = watch(progress, interval_s=0.1, console=console)
    committer.join()
    assert snap.status.succeeded
    drawn = console.file.getvalue()  # type: ignore[attr-defined]
    assert "0/8 shards committed" in drawn and "8/8 shards committed" in drawn


def test_quarantine_reasons_are_read_from_the_quarantine_files(tmp_path: pathlib.Path) -> None:
    job = mid_run(tmp_path)
    progress = JobProgress(job.plan_uri)
    snap = progress.snapshot()
    [q] = snap.quarantine_files
    assert progress.quarantine_reasons(snap.quarantine_files) == {q.shard_id: {QUARANTINE_REASON: 2}}


def test_watch_and_json_are_exclusive_and_seconds_must_be_positive(capsys: pytest.CaptureFixture[str]) -> None:
    for argv in (["status", "x", "--json", "--watch"], ["status", "x", "--watch", "0"]):
        with pytest.raises(SystemExit):
            cli.build_parser().parse_args(argv)
    assert "not allowed with argument" in capsys.readouterr().err


def test_timeline_buckets_rows_per_second() -> None:
    timeline = throughput_timeline([(100.0, 10), (101.0, 10), (110.0, 40)], buckets=5)
    assert [t for t, _ in timeline] == [100.0, 102.0, 104.0, 106.0, 108.0]
    assert [rate for _, rate in timeline] == [10.0, 0.0, 0.0, 0.0, 20.0]
    assert throughput_timeline([], buckets=5) == ()
    assert [duration(s) for s in (None, 42, 185, 3725)] == ["-", "42s", "3m05s", "1h02m"]


@pytest.mark.slow
def test_json_on_an_s3_ledger(
    tmp_path: pathlib.Path, moto_location: StoreLocation, capsys: pytest.CaptureFixture[str]
) -> None:
    """On S3 the commit times come from LastModified, and the quarantine file is read through s3fs."""
    options = moto_location.storage_options
    job = RunningJob.plan(tmp_path, output_uri=moto_location.url, storage_options=options)
    job.commit(0, quarantined=3)
    job.commit(1)
    started = time.time()
    doc = json.loads(_status(capsys, "--storage-options", json.dumps(options), "status", moto_location.url, "--json"))
    assert (doc["committed"], doc["quarantined_rows"], doc["plan_uri"]) == (2, 3, job.plan_uri)
    assert abs(doc["timeline"][0]["t"] - started) < 120  # a real modification time, not "now"
    progress = JobProgress(job.plan_uri, options)
    snap = progress.snapshot()
    assert progress.quarantine_reasons(snap.quarantine_files) == {
        snap.quarantine_files[0].shard_id: {QUARANTINE_REASON: 3}
    }


def test_failed_shards_are_listed_once_with_their_tries_and_last_error(
    tmp_path: pathlib.Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("COLUMNS", "200")
    job = RunningJob.plan(tmp_path)
    shard_id = job.ledger.plan.shards[0].shard_id
    for attempt in range(2):
        lease = job.ledger.try_claim(shard_id, job.identity)
        assert isinstance(lease, Lease)
        job.ledger.release(lease, reason="error", failed=True, error=f"ValueError: bad row (try {attempt})")
    job.heartbeat()
    out = _status(capsys, job.plan_uri)
    assert "Failed shards" in out
    [line] = [line for line in out.splitlines() if shard_id in line]
    assert line.split() == [shard_id, "│", "2", "│", "ValueError:", "bad", "row", "(try", "1)"]
