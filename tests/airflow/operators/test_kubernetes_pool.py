"""ElasticBatchInferenceOperator: its pod template, its refusals, its deadline, and the pool
steered without deferring (and killed), on the test cluster of tests/kube_cluster.py.

The deferred path through ``dag.test()`` is tests/airflow/test_kubernetes_pool_e2e.py's.
"""

from __future__ import annotations

import collections
import datetime as dt
import signal
import threading
import time
import types
from typing import TYPE_CHECKING, Any

import pytest
from airflow.sdk.exceptions import AirflowFailException

from airflow_antbatch.errors import SpecError
from airflow_antbatch.operators.finalize import FinalizeBatchInferenceOperator
from airflow_antbatch.operators.kubernetes_pool import (
    ElasticBatchInferenceOperator,
    _deadline_seconds,
)
from airflow_antbatch.operators.kubernetes_worker import plan_label
from airflow_antbatch.operators.plan import PlanBatchInferenceOperator
from airflow_antbatch.task_group import launcher_operator
from tests.airflow.conftest import FakeTaskInstance
from tests.conftest import committed_ids, write_transactions
from tests.kube_cluster import KubeCluster, pod_validator, run_kube_cluster

if TYPE_CHECKING:
    import pathlib
    from collections.abc import Iterator

IMAGE = "antbatch-worker:test"
PLAN_URI = "s3://lake/scores/_antbatch/attempt-000/plan.arrow"
SETUP: dict[str, Any] = {
    "image": "registry.example.com/antbatch-worker:1.4",
    "container_resources": {"limits": {"cpu": "4", "memory": "16Gi", "nvidia.com/gpu": "1"}},
    "tolerations": [{"key": "cloud.google.com/gke-spot", "operator": "Equal", "value": "true", "effect": "NoSchedule"}],
    "priority_class_name": "batch-low",
    "kueue_queue": "team-a",
    "service_account_name": "antbatch-worker",
}


def _context(try_number: int = 1) -> dict[str, Any]:
    ti = FakeTaskInstance()
    vars(ti).update(dag_id="nightly", task_id="batch_inference.pool", map_index=-1, try_number=try_number)
    run = types.SimpleNamespace(start_date=dt.datetime(2026, 12, 3, 1, 0, tzinfo=dt.UTC))
    return {
        **ti.context(),
        "run_id": "scheduled__2026-12-03T00:00:00+00:00",
        "dag": types.SimpleNamespace(),
        "dag_run": run,
    }


def _pool(**kwargs: Any) -> ElasticBatchInferenceOperator:
    return ElasticBatchInferenceOperator(
        task_id="batch_inference.pool",
        namespace="ml-batch",
        storage_options={"anon": False},
        **{"plan_uri": PLAN_URI, "max_workers": 64, **SETUP, **kwargs},
    )


def test_the_builder_registers_it_as_the_kubernetes_pool_launcher() -> None:
    assert launcher_operator("kubernetes-pool") is ElasticBatchInferenceOperator


def test_the_template_is_a_valid_pod_labelled_for_the_pool_and_its_shared_cluster() -> None:
    op = _pool()
    trigger = op.make_trigger(_context())
    pod = trigger.pod_template
    pod_validator()(pod)
    labels, spec = pod["metadata"]["labels"], pod["spec"]
    assert trigger.selector == {
        "dag_id": "nightly",
        "task_id": "batch_inference.pool",
        "run_id": labels["run_id"],
        "kubernetes_pod_operator": "True",
        "antbatch/component": "pool-worker",
    }
    assert "try_number" not in trigger.selector  # a retry or a clear finds the same pool
    assert labels["antbatch/plan"] == plan_label(PLAN_URI) == trigger.plan_label
    assert labels["kueue.x-k8s.io/queue-name"] == "team-a" and spec["priorityClassName"] == "batch-low"
    assert spec["tolerations"][0]["key"] == "cloud.google.com/gke-spot"
    assert spec["serviceAccountName"] == "antbatch-worker" and spec["terminationGracePeriodSeconds"] == 60
    [base] = spec["containers"]  # no XCom sidecar: the pool reads the ledger, not pod files
    assert base["image"] == SETUP["image"] and base["resources"]["limits"]["nvidia.com/gpu"] == "1"
    assert base["command"] == ["antbatch"]
    assert base["args"][:6] == ["--storage-options", '{"anon": false}', "worker", "--spec", PLAN_URI, "--worker-id"]
    assert base["args"][base["args"].index("--cpu-budget") + 1] == "4"  # from the CPU limit
    assert trigger.namespace == "ml-batch" and trigger.settings["max_workers"] == 64
    assert (
        trigger.try_number == 1 and trigger.run_started_at == dt.datetime(2026, 12, 3, 1, 0, tzinfo=dt.UTC).timestamp()
    )


def test_pods_never_get_the_connection_a_plan_uri_names() -> None:
    """The plan task pushes ``s3://conn_id@bucket/...`` when the job reads through a connection."""
    through_connection = "s3://lake_conn@lake/scores/_antbatch/attempt-000/plan.arrow"
    trigger = _pool(plan_uri=through_connection).make_trigger(_context())
    args = trigger.pod_template["spec"]["containers"][0]["args"]
    assert args[args.index("--spec") + 1] == PLAN_URI and "lake_conn" not in str(trigger.pod_template)
    assert trigger.plan_label == plan_label(PLAN_URI)
    assert trigger.plan_uri == through_connection  # the trigger reads the ledger through it


@pytest.mark.parametrize(
    ("kwargs", "error"),
    [
        ({"max_workers": 0}, "max_workers must be >= max"),
        ({"min_workers": 8, "max_workers": 4}, "max_workers must be >= max"),
        ({"crash_loop_limit": 0}, "crash_loop_limit must be >= 1"),
        ({"deadline": 3600}, "deadline must be a datetime.timedelta or datetime.time"),
        ({"tick_interval": 0}, "tick_interval must be > 0"),
    ],
)
def test_bad_pool_settings_fail_when_the_dag_is_parsed(kwargs: dict[str, Any], error: str) -> None:
    with pytest.raises(SpecError, match=error):
        _pool(**kwargs)


def test_credentials_never_go_into_the_pod_spec() -> None:
    with pytest.raises(ValueError, match=r"credentials \['AWS_SECRET_ACCESS_KEY'\]"):
        _pool(env_vars={"AWS_SECRET_ACCESS_KEY": "abc"})


@pytest.mark.parametrize(
    ("deadline", "seconds"),
    [
        (dt.timedelta(hours=5), 5 * 3600.0),
        (dt.time(6, 30), 5.5 * 3600),  # the run started at 01:00 UTC
        (dt.time(0, 30), 23.5 * 3600),  # already past today: tomorrow's
        (dt.time(7, 0, tzinfo=dt.timezone(dt.timedelta(hours=2))), 4 * 3600.0),  # 05:00 UTC
    ],
)
def test_a_deadline_is_seconds_from_the_runs_start(deadline: dt.timedelta | dt.time, seconds: float) -> None:
    assert _deadline_seconds(deadline, dt.datetime(2026, 12, 3, 1, 0, tzinfo=dt.UTC)) == pytest.approx(seconds)
    assert _pool(deadline=deadline).make_trigger(_context()).settings["deadline_s"] == pytest.approx(seconds)


# -- against the test cluster ------------------------------------------------------------------


@pytest.fixture
def cluster(tmp_path: pathlib.Path, subprocess_env: dict[str, str]) -> Iterator[KubeCluster]:
    root = tmp_path / "cluster"
    root.mkdir()
    with run_kube_cluster(root, entrypoints={IMAGE: ["antbatch"]}) as running:
        yield running
    assert not running.kubelet.errors, running.kubelet.errors


def _cluster_pool(cluster: KubeCluster, plan_uri: str, **kwargs: Any) -> ElasticBatchInferenceOperator:
    return ElasticBatchInferenceOperator(
        task_id="batch_inference.pool",
        plan_uri=plan_uri,
        max_workers=2,
        namespace=cluster.namespace,
        config_file=str(cluster.kubeconfig),
        image=IMAGE,
        deferrable=False,
        tick_interval=0.3,
        termination_grace_period=5,
        cpu_budget=1,
        preprocess_workers=0,
        torch_threads=1,
        **kwargs,
    )


def test_an_invalid_template_fails_before_any_pod_is_created(cluster: KubeCluster) -> None:
    op = _cluster_pool(cluster, PLAN_URI, node_selector={"disktype": 1})  # label values are strings
    with pytest.raises(AirflowFailException, match=r"not a valid Kubernetes 1.33 Pod at spec.nodeSelector.disktype"):
        op.execute(_context())
    assert cluster.created_pods() == [] and not cluster.client_requests()


@pytest.fixture
def small_job(tmp_path: pathlib.Path) -> tuple[str, pathlib.Path, int]:
    """4 shards of 50 rows over the slow model: (plan URI, output, rows)."""
    table = write_transactions(tmp_path / "in", files=1, rows_per_file=200, row_group_size=50)
    ti = FakeTaskInstance()
    PlanBatchInferenceOperator(
        task_id="plan",
        input_uri=str(tmp_path / "in"),
        output_uri=str(tmp_path / "out"),
        model="tests.slow_model:build_slow_model",
        preprocess="airflow_antbatch.examples.tabular:preprocess",
        id_column="txn_id",
        max_shard_rows=50,
        lease_ttl_s=2.0,
        max_workers=2,
    ).execute(ti.context())
    return str(ti.xcom["plan_uri"]), tmp_path / "out", table.num_rows


@pytest.mark.slow
def test_not_deferred_it_steers_the_pool_in_the_task_and_a_kill_deletes_every_pod(
    cluster: KubeCluster, small_job: tuple[str, pathlib.Path, int]
) -> None:
    """One run killed mid-job as Airflow kills a task (SIGTERM: on_kill, then an exception in
    execute); a second run of the task adopts nothing left behind and finishes the job."""
    plan_uri, output, rows = small_job
    cluster.kubelet.image_env["ANTBATCH_TEST_BATCH_DELAY"] = "0.5"  # the slow model's, in every pod
    op = _cluster_pool(cluster, plan_uri)

    class Killed(Exception):
        pass

    def on_sigterm(signum: int, frame: Any) -> None:
        op.on_kill()
        raise Killed

    def kill_when_running() -> None:
        deadline = time.monotonic() + 60
        while sum(run.occupies for run in cluster.kubelet.runs) < 2 and time.monotonic() < deadline:
            time.sleep(0.1)
        signal.raise_signal(signal.SIGUSR1)  # delivered to the main thread, inside execute

    previous = signal.signal(signal.SIGUSR1, on_sigterm)
    try:
        threading.Thread(target=kill_when_running, daemon=True).start()
        with pytest.raises(Killed):
            op.execute(_context())
    finally:
        signal.signal(signal.SIGUSR1, previous)
    assert len(cluster.created_pods()) == 2
    assert cluster.live_pods() == []  # on_kill and execute's own exit path deleted the pool

    result = _cluster_pool(cluster, plan_uri).execute(_context(try_number=2))
    assert result["committed"] == result["shards"] == 4 and result["rows"] == rows
    assert cluster.live_pods() == []
    FinalizeBatchInferenceOperator(task_id="finalize", plan_uri=plan_uri).execute(FakeTaskInstance().context())
    assert sorted(collections.Counter(committed_ids(str(output))).values()) == [1] * rows
