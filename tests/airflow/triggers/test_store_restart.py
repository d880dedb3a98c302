"""A deferred wait rides out an object-store restart: SeaweedFS is stopped and started again
while ShardLedgerTrigger waits, the trigger's reads fail and are retried (a warning each), and
the job still finishes with a success event."""

from __future__ import annotations

import asyncio
import logging
import time
from typing import TYPE_CHECKING

import pytest

from airflow_antbatch.triggers.ledger import ShardLedgerTrigger
from tests.chaos.seaweed import restartable_seaweedfs
from tests.progress_jobs import SHARDS, RunningJob
from tests.s3_servers import s3_location

if TYPE_CHECKING:
    import pathlib

    from airflow.triggers.base import TriggerEvent

pytestmark = pytest.mark.slow


def test_a_seaweedfs_restart_during_a_deferred_wait_and_the_job_still_finishes(
    tmp_path: pathlib.Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger="airflow_antbatch.worker.backoff")
    with restartable_seaweedfs() as weed:
        where = s3_location(weed.server, monkeypatch)
        job = RunningJob.plan(tmp_path, output_uri=where.url, storage_options=where.storage_options)
        for i in range(SHARDS // 2):
            job.commit(i)
        trigger = ShardLedgerTrigger(
            plan_uri=job.plan_uri,
            storage_options=where.storage_options,
            poll_interval=0.2,
            stall_timeout=45.0,  # the worker's beat stands still during the outage: not for this long
            store_patience=60.0,
            deadline=time.time() + 90,
        )

        async def scenario() -> tuple[TriggerEvent, float]:
            events = trigger.run()
            waiting = asyncio.create_task(anext(events))
            await asyncio.sleep(1.0)
            assert not waiting.done()  # half the shards committed: it waits
            await asyncio.to_thread(weed.stop)
            await asyncio.sleep(1.5)  # polls fail and are retried
            outage = await asyncio.to_thread(weed.restart)
            assert not waiting.done()
            for i in range(SHARDS // 2, SHARDS):  # the worker carries on once the store is back
                await asyncio.to_thread(job.commit, i)
            await asyncio.to_thread(job.heartbeat, "finished")
            return await asyncio.wait_for(waiting, timeout=60), outage

        started = time.monotonic()
        event, outage = asyncio.run(scenario())
    assert event.payload["status"] == "success", event.payload
    assert event.payload["result"]["committed"] == SHARDS
    retries = [r.getMessage() for r in caplog.records if "retrying" in r.getMessage()]
    assert retries and all(f"reading the ledger of {job.plan_uri}" in m for m in retries)
    assert time.monotonic() - started < 60, f"took {time.monotonic() - started:.0f}s (restart {outage:.0f}s)"
