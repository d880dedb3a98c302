"""Nightly fraud scoring: a day's card transactions in, a score per transaction out.

The example DAG of airflow-antbatch, run by ``make demo`` and by the tests. Input and output
are partitioned by the run's logical date (``ds``; with Airflow 3's default cron timetable that
is the day the run is for); the model and its hooks are plain Python referenced by
import path (``airflow_antbatch/examples/tabular.py``: a small MLP built in code, no
downloaded weights). Parsing this file imports neither torch nor the kubernetes client.

``ANTBATCH_DATA_ROOT`` says where the data lives (default: the repository's ``.demo/data``);
in production it would be an ``s3://`` URI.
"""

from __future__ import annotations

import datetime as dt
import os
import pathlib

from airflow.sdk import Param, dag

from airflow_antbatch.task_group import elastic_batch_inference

DATA_ROOT = os.environ.get("ANTBATCH_DATA_ROOT") or str(
    pathlib.Path(__file__).resolve().parent.parent / ".demo" / "data"
)
EXAMPLE = "airflow_antbatch.examples.tabular"


@dag(
    dag_id="nightly_batch_inference",
    schedule="@daily",
    start_date=dt.datetime(2026, 1, 1, tzinfo=dt.UTC),
    catchup=False,
    max_active_runs=1,
    params={
        "force_rerun": Param(
            False, type="boolean", description="Recompute every shard in a fresh attempt (new plan, new output files)"
        )
    },
    tags=["antbatch", "example"],
    doc_md=__doc__,
)
def nightly_batch_inference() -> None:
    # [START howto_elastic_batch_inference]
    elastic_batch_inference(
        group_id="score_transactions",
        input_uri=DATA_ROOT + "/transactions/ds={{ ds }}/",
        output_uri=DATA_ROOT + "/predictions/ds={{ ds }}/",
        model=f"{EXAMPLE}:build_model",
        preprocess=f"{EXAMPLE}:preprocess",
        postprocess=f"{EXAMPLE}:postprocess",
        id_column="txn_id",
        keep_columns=("merchant",),
        batch_size=512,
        max_shard_rows=2_000,  # ~30k rows a night -> ~15 shards shared by 3 workers
        lease_ttl_s=10.0,  # a killed worker's shard is taken over after ~10 s
        launcher="local",
        max_workers=3,
        worker_retries=2,
        worker_retry_delay=dt.timedelta(seconds=5),
        poke_interval=5,
        force_rerun="{{ params.force_rerun }}",
    )
    # [END howto_elastic_batch_inference]


nightly_batch_inference()
