"""The JSONL DAG a new user wrote (issue 15): many small JSONL files, ``max_shard_rows=700``,
``max_workers=3``. Used by tests/airflow/test_jsonl_e2e.py; data under $ANTBATCH_TEST_DATA_ROOT."""

from __future__ import annotations

import datetime as dt
import os

from airflow.sdk import dag

from airflow_antbatch.task_group import elastic_batch_inference

ROOT = os.environ.get("ANTBATCH_TEST_DATA_ROOT", "/nonexistent/antbatch-test-data")
TABULAR = "airflow_antbatch.examples.tabular"


@dag(schedule=None, start_date=dt.datetime(2026, 1, 1, tzinfo=dt.UTC), catchup=False)
def antbatch_jsonl_user_case() -> None:
    elastic_batch_inference(
        input_uri=ROOT + "/in/",
        output_uri=ROOT + "/out/",
        model=f"{TABULAR}:build_model",
        preprocess=f"{TABULAR}:preprocess",
        postprocess=f"{TABULAR}:postprocess",
        id_column="txn_id",
        max_shard_rows=700,
        max_workers=3,
        worker_kwargs={"torch_threads": 1, "preprocess_workers": 0},  # no process pools: a quick test
        worker_retries=0,
        poke_interval=1,
        sensor_timeout=120,
    )


antbatch_jsonl_user_case()
