"""ShardLedgerSensor: success from the ledger, fast failure with a sample, no endless wait."""

from __future__ import annotations

import logging
import threading
from typing import TYPE_CHECKING, Any

import pytest
from airflow.sdk.exceptions import AirflowException, AirflowFailException

from airflow_antbatch.errors import StoreError
from airflow_antbatch.ledger import JobStatus, Lease, Ledger, WorkerIdentity, WorkerStatus
from airflow_antbatch.operators.plan import PlanBatchInferenceOperator
from airflow_antbatch.sensors.ledger import BeatWatch, JobFailed, ShardLedgerSensor, judge, progress_line
from tests.airflow.conftest import TABULAR, FakeTaskInstance, FinishedJob
from tests.airflow.test_dag_e2e import _load_dag

if TYPE_CHECKING:
    import pathlib

    import pyarrow as pa

CTX = FakeTaskInstance().context()  # the sensor reads nothing from its context


def _sensor(plan_uri: str, **kwargs: Any) -> ShardLedgerSensor:
    return ShardLedgerSensor(task_id="wait_for_shards", plan_uri=plan_uri, **kwargs)


@pytest.fixture
def ledger(transactions: tuple[pathlib.Path, pa.Table]) -> Ledger:
    """A planned job of 3 shards (one per input file), with at most 2 tries per shard."""
    directory, _ = transactions
    ti = FakeTaskInstance()
    PlanBatchInferenceOperator(
        task_id="plan",
        input_uri=str(directory),
        output_uri=str(directory.parent / "out"),
        model=f"{TABULAR}:build_model",
        max_shard_rows=1000,
        max_shard_attempts=2,
        lease_ttl_s=5,
    ).execute(ti.context())
    return Ledger.open(str(ti.xcom["plan_uri"]))


def _commit(ledger: Ledger, shard_id: str, worker: WorkerIdentity) -> None:
    lease = ledger.try_claim(shard_id, worker)
    assert isinstance(lease, Lease)
    ledger.commit(lease, file=f"part-{shard_id}.parquet", rows=1000)


def test_succeeds_from_a_finished_ledger_with_a_compact_xcom(finished_job: FinishedJob) -> None:
    result = _sensor(finished_job.plan_uri).poke(CTX)
    assert result.is_done
    assert result.xcom_value == {
        "plan_uri": finished_job.plan_uri,
        "shards": 4,
        "committed": 4,
        "rows": finished_job.rows,
        "workers": ["worker-0"],
    }


def test_succeeds_when_every_shard_is_committed_although_a_worker_died_holding_a_lease(ledger: Ledger) -> None:
    dead, alive = WorkerIdentity("worker-0"), WorkerIdentity("worker-1")
    first, *rest = ledger.plan.shard_ids
    assert isinstance(ledger.try_claim(first, dead), Lease)  # claimed, never committed nor released
    ledger.heartbeat(dead, 1, state="running", stats={})
    for shard_id in rest:
        _commit(ledger, shard_id, alive)
    ledger.heartbeat(alive, 1, state="running", stats={"shards_committed": len(rest)})  # status reads heartbeats
    assert not _sensor(ledger.plan_uri).poke(CTX).is_done
    _commit(ledger, first, alive)  # the other worker took the shard over
    ledger.heartbeat(alive, 2, state="running", stats={"shards_committed": len(rest) + 1})
    assert _sensor(ledger.plan_uri).poke(CTX).is_done


def test_fails_fast_with_the_count_and_a_sample_when_shards_failed_for_good(ledger: Ledger) -> None:
    worker = WorkerIdentity("worker-0")
    first, *rest = ledger.plan.shard_ids
    for shard_id in rest:
        _commit(ledger, shard_id, worker)
    sensor = _sensor(ledger.plan_uri)
    for attempt in range(2):
        assert not sensor.poke(CTX).is_done
        lease = ledger.try_claim(first, worker)
        assert isinstance(lease, Lease)
        ledger.release(lease, reason="error", failed=True, error=f"ValueError: corrupt row (try {attempt})")
    with pytest.raises(AirflowFailException, match=r"1 of 3 shards failed for good \(2 committed\)") as info:
        sensor.poke(CTX)
    assert f"shard {first} failed 2 tries: ValueError: corrupt row (try 1)" in str(info.value)
    assert str(info.value).count(first) == 1  # each shard named once


def test_with_a_stall_timeout_fails_when_work_is_left_and_no_worker_runs(ledger: Ledger) -> None:
    worker = WorkerIdentity("worker-0")
    first, *_ = ledger.plan.shard_ids
    _commit(ledger, first, worker)
    assert not _sensor(ledger.plan_uri).poke(CTX).is_done  # without a stall timeout: keep waiting
    ledger.heartbeat(worker, 1, state="running", stats={})
    assert not _sensor(ledger.plan_uri, stall_timeout=60).poke(CTX).is_done  # a live worker: keep waiting
    ledger.heartbeat(worker, 2, state="finished", stats={})
    with pytest.raises(AirflowFailException, match="2 of 3 shards are left but no worker is running"):
        _sensor(ledger.plan_uri, stall_timeout=60).poke(CTX)


def _status(**fields: Any) -> JobStatus:
    base: dict[str, Any] = dict(
        planned=10,
        committed=4,
        leased=2,
        failed=0,
        rows_committed=4000,
        rows_planned=10000,
        rows_per_s=250.0,
        eta_s=24.0,
        workers=(),
        failures=(),
    )
    return JobStatus(**{**base, **fields})


def test_progress_line() -> None:
    assert progress_line(_status()) == (
        "4/10 shards committed (2 leased, 4 pending, 0 failed); 4000/10000 rows, 250.0 rows/s, ETA 24s"
    )
    assert progress_line(_status(eta_s=None, rows_planned=None)).endswith("4000 rows, 250.0 rows/s, ETA -")


class _Clock:
    """A monotonic clock the test moves."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def _worker(beat: int, state: str = "running", age: float = 0.0) -> WorkerStatus:
    return WorkerStatus("w--1", "w", state, 0, 0, 0.0, last_beat_age_s=age, current_shard="s", beat=beat)


def test_judge_times_a_stalled_beat_by_the_observers_clock_not_the_heartbeats_wall_clock() -> None:
    clock = _Clock()
    beats = BeatWatch(clock)
    # a heartbeat "written 10 hours ago" by a worker with a skewed clock, whose beat moves: alive
    for beat in (1, 2, 3):
        status = _status(workers=(_worker(beat, age=36000.0),))
        beats.observe(status.workers)
        assert judge(status, "plan", stall_timeout=60, beats=beats) is False
        clock.now += 50
    # the beat stands still: alive until this observer has watched it for stall_timeout
    status = _status(workers=(_worker(3, age=0.0),))
    beats.observe(status.workers)
    assert judge(status, "plan", stall_timeout=60, beats=beats) is False  # still for 50 s
    clock.now += 10
    with pytest.raises(JobFailed, match="no running worker's heartbeat has moved for 60s"):
        judge(status, "plan", stall_timeout=60, beats=beats)
    assert judge(status, "plan", stall_timeout=120, beats=beats) is False
    # without a watch (one look), a running worker counts as live however old its heartbeat
    assert judge(_status(workers=(_worker(3, age=9999.0),)), "plan", stall_timeout=60) is False


def test_judge_needs_no_waiting_when_no_worker_runs() -> None:
    with pytest.raises(JobFailed, match="no worker has sent a heartbeat"):
        judge(_status(), "plan", stall_timeout=60)
    with pytest.raises(JobFailed, match="every worker has exited"):
        judge(_status(workers=(_worker(7, state="finished"),)), "plan", stall_timeout=60)


def test_poke_rides_out_store_errors_and_logs_each_retry(
    ledger: Ledger, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    worker = WorkerIdentity("worker-0")
    for shard_id in ledger.plan.shard_ids:
        _commit(ledger, shard_id, worker)
    real = Ledger.status
    errors = iter([StoreError("s3 is restarting"), ConnectionError("connection refused")])

    def flaky(self: Ledger) -> JobStatus:
        error = next(errors, None)
        if error is not None:
            raise error
        return real(self)

    monkeypatch.setattr(Ledger, "status", flaky)
    monkeypatch.setattr("airflow_antbatch.worker.backoff.FIRST_DELAY_S", 0.01)
    caplog.set_level(logging.WARNING, logger="airflow_antbatch.worker.backoff")
    assert _sensor(ledger.plan_uri).poke(CTX).is_done
    retries = [r.getMessage() for r in caplog.records if "retrying" in r.getMessage()]
    assert len(retries) == 2 and "s3 is restarting" in retries[0] and "connection refused" in retries[1]


def test_poke_gives_up_after_the_store_patience(ledger: Ledger, monkeypatch: pytest.MonkeyPatch) -> None:
    def down(self: Ledger) -> JobStatus:
        raise StoreError("s3 is down")

    monkeypatch.setattr(Ledger, "status", down)
    monkeypatch.setattr("airflow_antbatch.worker.backoff.FIRST_DELAY_S", 0.05)
    with pytest.raises(StoreError, match=r"s3 is down \(gave up after"):
        _sensor(ledger.plan_uri, store_patience=0.2).poke(CTX)


def test_execute_complete_raises_a_clear_error_from_each_event() -> None:
    sensor = _sensor("p")
    with pytest.raises(AirflowFailException, match="2 of 3 shards failed"):
        sensor.execute_complete(CTX, {"status": "failed", "message": "2 of 3 shards failed for good"})
    with pytest.raises(AirflowException, match="StoreError: s3 is down") as info:
        sensor.execute_complete(CTX, {"status": "error", "message": "waiting failed: StoreError: s3 is down"})
    assert not isinstance(info.value, AirflowFailException)  # the sensor's retries may get past it


def test_refuses_a_missing_plan_uri() -> None:
    with pytest.raises(AirflowFailException, match="plan task did not push one"):
        _sensor("None").poke(CTX)


class _OnMessage(logging.Handler):
    """Sets an event when a log record contains ``text``."""

    def __init__(self, text: str) -> None:
        super().__init__()
        self.text = text
        self.seen = threading.Event()

    def emit(self, record: logging.LogRecord) -> None:
        if self.text in record.getMessage():
            self.seen.set()


@pytest.mark.airflow
@pytest.mark.parametrize("last_shard", ["committed", "failed"])
def test_deferrable_through_dag_test_waits_in_the_trigger_for_the_last_shard(
    airflow_db: pathlib.Path,
    ledger: Ledger,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
    capsys: pytest.CaptureFixture[str],
    last_shard: str,
) -> None:
    """The first check finds 2 of 3 shards committed and defers; once the trigger runs (inline in
    dag.test), a thread settles the last shard, and the trigger's event ends the task."""
    worker = WorkerIdentity("worker-0")
    first, *rest = ledger.plan.shard_ids
    for shard_id in rest:
        _commit(ledger, shard_id, worker)
    monkeypatch.setenv("ANTBATCH_TEST_PLAN_URI", ledger.plan_uri)
    dag = _load_dag("antbatch_sensor_dags.py", "antbatch_deferred_sensor")
    deferred = _OnMessage("running trigger in line")
    caplog.set_level(logging.INFO, logger="airflow.sdk.definitions.dag")
    logging.getLogger("airflow.sdk.definitions.dag").addHandler(deferred)

    def settle_last_shard() -> None:
        assert deferred.seen.wait(60)
        if last_shard == "committed":
            _commit(ledger, first, worker)
            return
        for _ in range(2):
            lease = ledger.try_claim(first, worker)
            assert isinstance(lease, Lease)
            ledger.release(lease, reason="error", failed=True, error="ValueError: corrupt row")

    thread = threading.Thread(target=settle_last_shard)
    thread.start()
    try:
        run = dag.test()
    finally:
        thread.join(60)
        logging.getLogger("airflow.sdk.definitions.dag").removeHandler(deferred)
    assert deferred.seen.is_set()
    [ti] = run.get_task_instances()
    if last_shard == "committed":
        assert run.state == ti.state == "success"
        assert ti.xcom_pull(task_ids="wait_for_shards")["committed"] == 3
    else:
        assert run.state == ti.state == "failed"
        # the trigger's reason, raised by execute_complete (Airflow's task log goes to stdout here)
        assert "AirflowFailException: 1 of 3 shards failed for good (2 committed)" in capsys.readouterr().out


def test_deferrable_follows_the_deployments_default_unless_given(monkeypatch: pytest.MonkeyPatch) -> None:
    assert _sensor("p").deferrable is False  # [operators] default_deferrable is False by default
    monkeypatch.setenv("AIRFLOW__OPERATORS__DEFAULT_DEFERRABLE", "True")
    assert _sensor("p").deferrable is True
    assert _sensor("p", deferrable=False).deferrable is False
