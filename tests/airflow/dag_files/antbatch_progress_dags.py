"""A job's plan task alone, for the UI plugin's tests (symlinked into the DAGs folder).

The run leaves what the plugin looks up, the plan URI in the plan task's XCom, and a fresh
ledger that the tests then move forward shard by shard. The input is under
$ANTBATCH_TEST_PROGRESS_ROOT, read when the DAG file is parsed.
"""

from __future__ import annotations

import datetime as dt
import os

from airflow.sdk import TaskGroup, dag

from airflow_antbatch.operators.plan import PlanBatchInferenceOperator
from airflow_antbatch.sensors.ledger import ShardLedgerSensor
from tests.progress_jobs import ROWS_PER_SHARD

ROOT = os.environ.get("ANTBATCH_TEST_PROGRESS_ROOT", "/nonexistent")


@dag(schedule=None, start_date=dt.datetime(2026, 1, 1, tzinfo=dt.UTC), catchup=False)
def antbatch_progress() -> None:
    with TaskGroup("job"):
        plan = PlanBatchInferenceOperator(
            task_id="plan",
            input_uri=f"{ROOT}/in",
            output_uri=f"{ROOT}/out",
            model="airflow_antbatch.examples.tabular:build_model",
            max_shard_rows=ROWS_PER_SHARD,
        )
        # Marked success by the tests (dag.test's mark_success_pattern), not run: it gives the
        # run a second task of the job, from whose page the plugin must find the same plan.
        plan >> ShardLedgerSensor(
            task_id="wait_for_shards", plan_uri="{{ ti.xcom_pull(task_ids='job.plan', key='plan_uri') }}"
        )


antbatch_progress()
