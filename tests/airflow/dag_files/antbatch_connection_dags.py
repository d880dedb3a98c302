"""A job on S3 whose Airflow-side tasks reach the bucket only through an Airflow connection.

For tests/airflow/hooks/test_storage.py (symlinked into the test DAGs folder). Plan, sensor and
finalize go through connection ``antbatch_lake`` (the test defines it as AIRFLOW_CONN_ANTBATCH_LAKE;
the Airflow process has no AWS credentials); the worker pods through the Kubernetes secret
``lake-s3-credentials`` as environment, as docs/kubernetes.md documents. Read when the DAG file
is parsed: $ANTBATCH_TEST_S3_ROOT (s3://bucket/prefix), $ANTBATCH_TEST_S3_ENDPOINT and the test
cluster's $ANTBATCH_TEST_KUBECONFIG.
"""

from __future__ import annotations

import datetime as dt
import os

from airflow.sdk import dag
from kubernetes.client import models as k8s

from airflow_antbatch.task_group import elastic_batch_inference

ROOT = os.environ.get("ANTBATCH_TEST_S3_ROOT", "s3://nonexistent/antbatch")
ENDPOINT = os.environ.get("ANTBATCH_TEST_S3_ENDPOINT", "http://127.0.0.1:9")
KUBECONFIG = os.environ.get("ANTBATCH_TEST_KUBECONFIG", "/nonexistent/kubeconfig")
TABULAR = "airflow_antbatch.examples.tabular"


@dag(schedule=None, start_date=dt.datetime(2026, 1, 1, tzinfo=dt.UTC), catchup=False)
def antbatch_connection() -> None:
    """One worker pod; the job's only store access from Airflow is the connection."""
    elastic_batch_inference(
        input_uri=ROOT + "/in/",
        output_uri=ROOT + "/out/",
        conn_id="antbatch_lake",
        storage_options={"client_kwargs": {"endpoint_url": ENDPOINT}},  # no secret: workers get it too
        model=f"{TABULAR}:build_model",
        preprocess=f"{TABULAR}:preprocess",
        id_column="txn_id",
        max_shard_rows=200,
        lease_ttl_s=2.0,
        max_workers=1,
        worker_retries=0,
        poke_interval=1,
        sensor_timeout=120,
        launcher="kubernetes",
        worker_kwargs={
            "namespace": "antbatch",
            "image": "antbatch-worker:test",
            "config_file": KUBECONFIG,
            "termination_grace_period": 5,
            "env_vars": {"AWS_DEFAULT_REGION": "us-east-1", "AWS_EC2_METADATA_DISABLED": "true"},
            "env_from": [k8s.V1EnvFromSource(secret_ref=k8s.V1SecretEnvSource(name="lake-s3-credentials"))],
            "startup_check_interval_seconds": 1,
            "cpu_budget": 1,
            "preprocess_workers": 0,
            "torch_threads": 1,
        },
    )


antbatch_connection()
