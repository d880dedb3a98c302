"""The elastic pool's DAG for tests/airflow/test_kubernetes_pool_e2e.py (symlinked into the test DAGs folder).

``launcher="kubernetes-pool"``: one task steers a pool of worker pods on the Kubernetes API on
loopback that tests/kube_cluster.py starts. Read when the DAG file is parsed: the data under
$ANTBATCH_TEST_DATA_ROOT, the kubeconfig at $ANTBATCH_TEST_KUBECONFIG, the slow model's
settings (passed to the pods as env), and the pool's shape from ANTBATCH_TEST_POOL_* (a test
sets a bad image or a crashing command there).
"""

from __future__ import annotations

import datetime as dt
import json
import os

from airflow.sdk import dag

from airflow_antbatch.task_group import elastic_batch_inference

ROOT = os.environ.get("ANTBATCH_TEST_DATA_ROOT", "/nonexistent/antbatch-test-data")
KUBECONFIG = os.environ.get("ANTBATCH_TEST_KUBECONFIG", "/nonexistent/kubeconfig")
POOL = json.loads(os.environ.get("ANTBATCH_TEST_POOL", "{}"))


@dag(schedule=None, start_date=dt.datetime(2026, 1, 1, tzinfo=dt.UTC), catchup=False)
def antbatch_pool() -> None:
    """Up to 4 worker pods steered by one task, ticking every 0.3 s."""
    elastic_batch_inference(
        input_uri=ROOT + "/in/",
        output_uri=ROOT + "/out/",
        model="tests.slow_model:build_slow_model",
        preprocess="airflow_antbatch.examples.tabular:preprocess",
        id_column="txn_id",
        batch_size=50,
        max_shard_rows=50,
        lease_ttl_s=2.0,
        max_workers=POOL.pop("max_workers", 4),
        worker_retries=0,
        launcher="kubernetes-pool",
        worker_kwargs={
            "namespace": "antbatch",
            "image": "antbatch-worker:test",
            "config_file": KUBECONFIG,
            "termination_grace_period": 5,
            "tick_interval": 0.3,
            "deferrable": True,
            "env_vars": {
                "ANTBATCH_TEST_BATCH_DELAY": os.environ.get("ANTBATCH_TEST_BATCH_DELAY", "0.05"),
                "ANTBATCH_TEST_MARKER_DIR": os.environ.get("ANTBATCH_TEST_MARKER_DIR", ""),
            },
            "priority_class_name": "batch-low",
            "kueue_queue": "team-a",
            # Small pods on a small test machine: one core, preprocess in a thread.
            "cpu_budget": 1,
            "preprocess_workers": 0,
            "torch_threads": 1,
            **POOL,
        },
    )


antbatch_pool()
