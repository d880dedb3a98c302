"""A small-files DAG for tests/airflow/test_small_files_e2e.py: merge -> plan -> workers -> sensor.

Objects live under $ANTBATCH_TEST_DATA_ROOT/objects, read when the DAG file is parsed.
"""

from __future__ import annotations

import datetime as dt
import os

from airflow.sdk import dag

from airflow_antbatch.task_group import elastic_batch_inference

ROOT = os.environ.get("ANTBATCH_TEST_DATA_ROOT", "/nonexistent/antbatch-test-data")


@dag(schedule=None, start_date=dt.datetime(2026, 1, 1, tzinfo=dt.UTC), catchup=False)
def antbatch_small_files() -> None:
    """Many small binary objects, packed first; the hook scores each object's bytes."""
    elastic_batch_inference(
        input_uri=ROOT + "/objects/",
        output_uri=ROOT + "/out/",
        model="tests.user_code:build_object_model",
        preprocess="tests.user_code:object_features",
        id_column="path",
        merge_small_files=True,
        merge_kwargs={"target_pack_bytes": 64 * 1024, "concurrency": 8},
        max_shard_rows=20,
        max_workers=1,
        lease_ttl_s=5.0,
        worker_retries=0,
        poke_interval=1,
        sensor_timeout=120,
    )


antbatch_small_files()
