"""ShardLedgerTrigger against a real ledger on local files: completes, fails fast, times out.

Each test drives ``run()`` in an event loop of its own, as the triggerer would, while the
test commits or fails shards from a thread through the real ledger.
"""

from __future__ import annotations

import asyncio
import importlib
import time
from typing import TYPE_CHECKING, Any

import pytest
from airflow.sdk.exceptions import AirflowFailException
from airflow.triggers.base import BaseTrigger

from airflow_antbatch.errors import StoreError
from airflow_antbatch.get_provider_info import get_provider_info
from airflow_antbatch.ledger import Lease, Ledger, WorkerIdentity
from airflow_antbatch.sensors.ledger import ShardLedgerSensor
from airflow_antbatch.triggers.ledger import ShardLedgerTrigger
from tests.airflow.sensors.test_ledger import _commit

if TYPE_CHECKING:
    from airflow.triggers.base import TriggerEvent

WORKER = WorkerIdentity("worker-0")


def _trigger(ledger: Ledger, **kwargs: Any) -> ShardLedgerTrigger:
    return ShardLedgerTrigger(plan_uri=ledger.plan_uri, poll_interval=0.05, **kwargs)


async def _first_event(trigger: ShardLedgerTrigger) -> TriggerEvent:
    async for event in trigger.run():
        return event
    raise AssertionError("the trigger ended without an event")


def _fail_for_good(ledger: Ledger, shard_id: str) -> None:
    for attempt in range(ledger.plan.spec.max_shard_attempts):
        lease = ledger.try_claim(shard_id, WORKER)
        assert isinstance(lease, Lease)
        ledger.release(lease, reason="error", failed=True, error=f"ValueError: corrupt row (try {attempt})")


def test_waits_logging_progress_then_succeeds_with_the_compact_status(
    ledger: Ledger, capsys: pytest.CaptureFixture[str]
) -> None:
    first, *rest = ledger.plan.shard_ids
    for shard_id in rest:
        _commit(ledger, shard_id, WORKER)

    async def scenario() -> TriggerEvent:
        task = asyncio.create_task(_first_event(_trigger(ledger)))
        await asyncio.sleep(0.3)
        assert not task.done()  # 2 of 3 committed: it keeps waiting
        await asyncio.to_thread(_commit, ledger, first, WORKER)
        return await asyncio.wait_for(task, timeout=10)

    event = asyncio.run(scenario())
    assert event.payload == {
        "status": "success",
        "message": f"every shard of {ledger.plan_uri} is committed",
        "result": {"plan_uri": ledger.plan_uri, "shards": 3, "committed": 3, "rows": 0, "workers": []},
    }
    # one progress line per poll, in the task's log (Airflow's structured log writes to stdout here)
    lines = [line for line in capsys.readouterr().out.splitlines() if "shards committed" in line]
    assert "2/3 shards committed" in lines[0] and "3/3 shards committed" in lines[-1]
    assert "0/3000 rows, 0.0 rows/s, ETA -" in lines[0]


def test_fails_fast_with_the_reason_when_shards_failed_for_good(ledger: Ledger) -> None:
    first, *rest = ledger.plan.shard_ids
    for shard_id in rest:
        _commit(ledger, shard_id, WORKER)
    _fail_for_good(ledger, first)
    started = time.monotonic()
    event = asyncio.run(_first_event(_trigger(ledger, deadline=time.time() + 60)))
    assert time.monotonic() - started < 5  # the first read settles it; the deadline plays no part
    assert event.payload["status"] == "failed"
    assert "1 of 3 shards failed for good (2 committed)" in event.payload["message"]
    assert f"shard {first} failed 2 tries: ValueError: corrupt row (try 1)" in event.payload["message"]


def test_fails_fast_when_work_is_left_and_no_worker_runs(ledger: Ledger) -> None:
    ledger.heartbeat(WORKER, 1, state="finished", stats={})
    event = asyncio.run(_first_event(_trigger(ledger, stall_timeout=60)))
    assert event.payload["status"] == "failed"
    assert "3 of 3 shards are left but no worker is running" in event.payload["message"]


def test_times_out_at_its_deadline_with_the_progress_in_the_message(ledger: Ledger) -> None:
    _commit(ledger, ledger.plan.shard_ids[0], WORKER)
    started = time.monotonic()
    event = asyncio.run(_first_event(_trigger(ledger, deadline=time.time() + 0.5)))
    assert 0.4 < time.monotonic() - started < 5
    assert event.payload["status"] == "timeout"
    assert event.payload["message"].startswith(f"timed out waiting for {ledger.plan_uri}: 1/3 shards committed")


def test_reads_the_ledger_in_a_thread_so_the_event_loop_keeps_running(
    ledger: Ledger, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A slow store (here: every status read takes 0.5 s) must not stall other triggers."""
    real_status = Ledger.status

    def slow_status(self: Ledger) -> Any:
        time.sleep(0.5)
        return real_status(self)

    monkeypatch.setattr(Ledger, "status", slow_status)
    for shard_id in ledger.plan.shard_ids:
        _commit(ledger, shard_id, WORKER)

    async def scenario() -> int:
        ticks = 0
        task = asyncio.create_task(_first_event(_trigger(ledger)))
        while not task.done():
            await asyncio.sleep(0.01)
            ticks += 1
        assert (await task).payload["status"] == "success"
        return ticks

    assert asyncio.run(scenario()) > 10


def test_serialize_is_plain_values_and_round_trips(ledger: Ledger) -> None:
    trigger = ShardLedgerTrigger(
        plan_uri=ledger.plan_uri,
        storage_options={"auto_mkdir": True},
        poll_interval=5.0,
        stall_timeout=30.0,
        store_patience=300.0,
        deadline=1_800_000_000.0,
        conn_id="lake_s3",
    )
    classpath, kwargs = trigger.serialize()
    assert classpath == "airflow_antbatch.triggers.ledger.ShardLedgerTrigger"
    assert kwargs == {
        "plan_uri": ledger.plan_uri,
        "storage_options": {"auto_mkdir": True},
        "poll_interval": 5.0,
        "stall_timeout": 30.0,
        "store_patience": 300.0,
        "deadline": 1_800_000_000.0,
        "conn_id": "lake_s3",  # the connection's name: it is looked up in the triggerer
    }
    module, _, name = classpath.rpartition(".")
    again = getattr(importlib.import_module(module), name)(**kwargs)
    assert again.serialize() == (classpath, kwargs)


def test_the_provider_info_names_the_trigger_module() -> None:
    [entry] = get_provider_info()["triggers"]
    assert "airflow_antbatch.triggers.ledger" in entry["python-modules"]
    assert issubclass(importlib.import_module("airflow_antbatch.triggers.ledger").ShardLedgerTrigger, BaseTrigger)


def test_execute_complete_turns_events_into_the_xcom_value_or_a_failure() -> None:
    sensor = ShardLedgerSensor(task_id="wait_for_shards", plan_uri="p", deferrable=True)
    result = {"plan_uri": "p", "shards": 1, "committed": 1, "rows": 5, "workers": ["worker-0"]}
    ctx: Any = {}
    assert sensor.execute_complete(ctx, {"status": "success", "message": "done", "result": result}) == result
    for status in ("failed", "timeout"):
        with pytest.raises(AirflowFailException, match="^why it stopped$"):
            sensor.execute_complete(ctx, {"status": status, "message": "why it stopped"})


def test_any_exception_in_run_ends_in_an_error_event_naming_it(ledger: Ledger, monkeypatch: pytest.MonkeyPatch) -> None:
    def broken(self: Ledger) -> Any:
        raise KeyError("format")

    monkeypatch.setattr(Ledger, "status", broken)
    event = asyncio.run(_first_event(_trigger(ledger)))
    assert event.payload == {
        "status": "error",
        "message": f"waiting on the ledger of {ledger.plan_uri} failed: KeyError: 'format'",
    }


def test_store_errors_are_retried_then_an_outage_past_the_patience_is_an_error_event(
    ledger: Ledger, monkeypatch: pytest.MonkeyPatch
) -> None:
    real = Ledger.status
    calls = {"n": 0}

    def flaky(self: Ledger) -> Any:
        calls["n"] += 1
        if calls["n"] <= 2:
            raise StoreError("connection refused")
        return real(self)

    monkeypatch.setattr(Ledger, "status", flaky)
    monkeypatch.setattr("airflow_antbatch.worker.backoff.FIRST_DELAY_S", 0.01)
    for shard_id in ledger.plan.shard_ids:
        _commit(ledger, shard_id, WORKER)
    assert asyncio.run(_first_event(_trigger(ledger))).payload["status"] == "success"
    assert calls["n"] == 3

    def down(self: Ledger) -> Any:
        raise StoreError("connection refused")

    monkeypatch.setattr(Ledger, "status", down)
    event = asyncio.run(_first_event(_trigger(ledger, store_patience=0.1)))
    assert event.payload["status"] == "error"
    assert "StoreError: connection refused (gave up after" in event.payload["message"]
