"""A three-model chain over local files, for the OpenLineage test (tests/airflow/operators/test_lineage.py).

Symlinked into the test DAGs folder; the data lives under $ANTBATCH_TEST_DATA_ROOT, read when
the DAG file is parsed.
"""

from __future__ import annotations

import datetime as dt
import os

from airflow.sdk import dag

from airflow_antbatch.task_group import elastic_batch_inference

ROOT = os.environ.get("ANTBATCH_TEST_DATA_ROOT", "/nonexistent/antbatch-test-data")
CHAIN = "tests.chain_models"


@dag(schedule=None, start_date=dt.datetime(2026, 1, 1, tzinfo=dt.UTC), catchup=False)
def antbatch_lineage() -> None:
    """One worker; the embedding is kept as a column."""
    elastic_batch_inference(
        input_uri=ROOT + "/in/",
        output_uri=ROOT + "/out/",
        stages=[
            {"name": "embed", "model": f"{CHAIN}:build_embedder", "output_column": "embedding"},
            {"name": "classify", "model": f"{CHAIN}:build_classifier"},
            {"name": "rerank", "model": f"{CHAIN}:build_reranker", "adapter": f"{CHAIN}:rerank_input"},
        ],
        preprocess="airflow_antbatch.examples.tabular:preprocess",
        postprocess=f"{CHAIN}:score_column",
        id_column="txn_id",
        max_shard_rows=200,
        max_workers=1,
        worker_retries=0,
        poke_interval=1,
        sensor_timeout=120,
        worker_kwargs={"torch_threads": 1, "preprocess_workers": 0},
    )


antbatch_lineage()
