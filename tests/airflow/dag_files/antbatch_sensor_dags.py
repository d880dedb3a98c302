"""A lone deferrable ShardLedgerSensor, for tests/airflow/sensors/test_ledger.py (symlinked into the DAGs folder).

The plan it waits on is $ANTBATCH_TEST_PLAN_URI, read when the DAG file is parsed; the test
commits the shards from a thread while the sensor's trigger runs.
"""

from __future__ import annotations

import datetime as dt
import os

from airflow.sdk import dag

from airflow_antbatch.sensors.ledger import ShardLedgerSensor


@dag(schedule=None, start_date=dt.datetime(2026, 1, 1, tzinfo=dt.UTC), catchup=False)
def antbatch_deferred_sensor() -> None:
    ShardLedgerSensor(
        task_id="wait_for_shards",
        plan_uri=os.environ.get("ANTBATCH_TEST_PLAN_URI", "/nonexistent/plan.json"),
        deferrable=True,
        poke_interval=0.1,
        timeout=60,
    )


antbatch_deferred_sensor()
