"""The pod launcher's DAG for tests/airflow/test_kubernetes_e2e.py (symlinked into the test DAGs folder).

Workers run as pods through ``launcher="kubernetes"`` against the Kubernetes API on loopback
that tests/kube_cluster.py starts. Read when the DAG file is parsed: the data under
$ANTBATCH_TEST_DATA_ROOT, the cluster's kubeconfig at $ANTBATCH_TEST_KUBECONFIG, and the slow
model's settings (passed to the pods as env, the way a user passes settings to a worker image).
"""

from __future__ import annotations

import datetime as dt
import os

from airflow.sdk import dag

from airflow_antbatch.task_group import elastic_batch_inference

ROOT = os.environ.get("ANTBATCH_TEST_DATA_ROOT", "/nonexistent/antbatch-test-data")
KUBECONFIG = os.environ.get("ANTBATCH_TEST_KUBECONFIG", "/nonexistent/kubeconfig")
NAMESPACE = "antbatch"
IMAGE = "antbatch-worker:test"


@dag(schedule=None, start_date=dt.datetime(2026, 1, 1, tzinfo=dt.UTC), catchup=False)
def antbatch_kubernetes() -> None:
    """Up to 3 worker pods over a slow model, each retried twice after a second."""
    elastic_batch_inference(
        input_uri=ROOT + "/in/",
        output_uri=ROOT + "/out/",
        model="tests.slow_model:build_slow_model",
        preprocess="airflow_antbatch.examples.tabular:preprocess",
        id_column="txn_id",
        batch_size=50,
        max_shard_rows=100,
        lease_ttl_s=2.0,
        max_workers=3,
        worker_retries=2,
        worker_retry_delay=dt.timedelta(seconds=1),
        poke_interval=1,
        sensor_timeout=120,
        launcher="kubernetes",
        worker_kwargs={
            "namespace": NAMESPACE,
            "image": IMAGE,
            "config_file": KUBECONFIG,
            "termination_grace_period": 5,
            "env_vars": {
                "ANTBATCH_TEST_BATCH_DELAY": os.environ.get("ANTBATCH_TEST_BATCH_DELAY", "0.05"),
                "ANTBATCH_TEST_MARKER_DIR": os.environ.get("ANTBATCH_TEST_MARKER_DIR", ""),
            },
            # The test kubelet starts a pod within a tick: check its phase every second, not 5.
            "startup_check_interval_seconds": 1,
            # Small pods on a small test machine: one core, preprocess in a thread (no pool to
            # start and stop in every pod).
            "cpu_budget": 1,
            "preprocess_workers": 0,
            "torch_threads": 1,
        },
    )


antbatch_kubernetes()
