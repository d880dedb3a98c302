"""Fault-injection DAGs for tests/airflow/test_dag_e2e.py (symlinked into the test DAGs folder).

Data lives under $ANTBATCH_TEST_DATA_ROOT, read when the DAG file is parsed.
"""

from __future__ import annotations

import datetime as dt
import os
from typing import Any

from airflow.sdk import dag

from airflow_antbatch.task_group import elastic_batch_inference

ROOT = os.environ.get("ANTBATCH_TEST_DATA_ROOT", "/nonexistent/antbatch-test-data")
TABULAR = "airflow_antbatch.examples.tabular"
COMMON: dict[str, Any] = dict(
    input_uri=ROOT + "/in/",
    output_uri=ROOT + "/out/",
    preprocess=f"{TABULAR}:preprocess",
    id_column="txn_id",
    max_shard_rows=500,
    lease_ttl_s=2.0,
    worker_retries=0,
    poke_interval=1,
    sensor_timeout=120,
)


@dag(schedule=None, start_date=dt.datetime(2026, 1, 1, tzinfo=dt.UTC), catchup=False)
def antbatch_killed_worker() -> None:
    """The first worker process to score a batch is SIGKILLed; the other takes its shard over."""
    elastic_batch_inference(model="tests.user_code:build_model_killing_first_process", max_workers=2, **COMMON)


@dag(schedule=None, start_date=dt.datetime(2026, 1, 1, tzinfo=dt.UTC), catchup=False)
def antbatch_failing_shards() -> None:
    """Every batch fails: the worker task fails for good and the sensor fails fast."""
    elastic_batch_inference(
        model=f"{TABULAR}:build_model",
        max_workers=1,
        max_shard_attempts=1,
        **{**COMMON, "preprocess": "tests.user_code:failing_preprocess"},
    )


@dag(schedule=None, start_date=dt.datetime(2026, 1, 1, tzinfo=dt.UTC), catchup=False)
def antbatch_chain() -> None:
    """Three models in a chain, the first with its own batch size; the embedding is kept as a column."""
    chain = "tests.chain_models"
    elastic_batch_inference(
        stages=[
            {"name": "embed", "model": f"{chain}:build_embedder", "batch_size": 64, "output_column": "embedding"},
            {"name": "classify", "model": f"{chain}:build_classifier"},
            {"name": "rerank", "model": f"{chain}:build_reranker", "adapter": f"{chain}:rerank_input"},
        ],
        postprocess=f"{chain}:score_column",
        max_workers=2,
        **COMMON,
    )


antbatch_killed_worker()
antbatch_failing_shards()
antbatch_chain()
