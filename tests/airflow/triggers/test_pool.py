"""ElasticPoolTrigger: its persisted kwargs, how it reads pods, and what a tick costs at 2,000 pods.

The request counts are taken at the Kubernetes API emulator (tests/kube_cluster.py), which
counts every request by caller; its node does not run processes here (``run_processes=False``),
so 2,000 pods fit on a small machine. No worker runs in that test, so nothing is committed:
exactly-once is checked by the end-to-end scenarios (tests/airflow/test_kubernetes_pool_e2e.py).
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from typing import TYPE_CHECKING, Any

import pytest

from airflow_antbatch.ledger import Ledger
from airflow_antbatch.operators.plan import PlanBatchInferenceOperator
from airflow_antbatch.pool import PoolController, PoolSettings
from airflow_antbatch.triggers.pool import ElasticPoolTrigger, PoolLoop, pod_view, slot_pod
from tests.airflow.conftest import TABULAR, FakeTaskInstance
from tests.conftest import write_transactions
from tests.kube_cluster import KubeCluster, pod_validator, run_kube_cluster

if TYPE_CHECKING:
    import pathlib
    from collections.abc import Iterator

PODS = 2_000
SELECTOR = {"dag_id": "nightly", "task_id": "batch_inference.pool", "run_id": "manual-1", "antbatch/component": "pool"}
TEMPLATE: dict[str, Any] = {
    "apiVersion": "v1",
    "kind": "Pod",
    "metadata": {
        "name": "batch-inference-pool",
        "namespace": "antbatch",
        "labels": {**SELECTOR, "antbatch/plan": "p1"},
    },
    "spec": {
        "restartPolicy": "Never",
        "priorityClassName": "batch-low",
        "containers": [
            {
                "name": "base",
                "image": "antbatch-worker:1",
                "command": ["antbatch"],
                "args": ["worker", "--spec", "s3://b/plan.arrow", "--worker-id", "slot-0", "--cpu-budget", "2"],
            }
        ],
    },
}


def _trigger(plan_uri: str, cluster: KubeCluster | None = None, **settings: Any) -> ElasticPoolTrigger:
    import yaml

    return ElasticPoolTrigger(
        plan_uri=plan_uri,
        storage_options=None,
        namespace="antbatch",
        pod_template=TEMPLATE,
        selector=SELECTOR,
        plan_label="p1",
        settings={"min_workers": 0, "max_workers": 4, **settings},
        run_started_at=1_800_000_000.0,
        try_number=2,
        tick_interval=0.2,
        config_dict=yaml.safe_load(cluster.kubeconfig.read_text()) if cluster else None,
    )


def test_serialize_is_the_persisted_contract() -> None:
    classpath, kwargs = _trigger("file:///tmp/out/_antbatch/attempt-000/plan.arrow").serialize()
    assert classpath == "airflow_antbatch.triggers.pool.ElasticPoolTrigger"
    assert kwargs == {
        "plan_uri": "file:///tmp/out/_antbatch/attempt-000/plan.arrow",
        "storage_options": None,
        "namespace": "antbatch",
        "pod_template": TEMPLATE,
        "selector": SELECTOR,
        "plan_label": "p1",
        "settings": {"min_workers": 0, "max_workers": 4},
        "run_started_at": 1_800_000_000.0,
        "try_number": 2,
        "deadline": None,
        "tick_interval": 0.2,
        "base_container": "base",
        "kubernetes_conn_id": None,
        "config_dict": None,
        "in_cluster": None,
        "cluster_context": None,
        "connection_extras": None,
    }


def test_a_slot_pod_is_the_template_with_its_own_name_worker_id_and_slot() -> None:
    pod = slot_pod(TEMPLATE, 3, 8)
    pod_validator()(pod)
    meta, args = pod["metadata"], pod["spec"]["containers"][0]["args"]
    assert (
        meta["name"].startswith("batch-inference-pool-s3-")
        and meta["name"] != slot_pod(TEMPLATE, 3, 8)["metadata"]["name"]
    )
    assert meta["labels"] == {**TEMPLATE["metadata"]["labels"], "antbatch/slot": "3", "antbatch/worker-id": "slot-3"}
    assert args == [
        "worker",
        "--spec",
        "s3://b/plan.arrow",
        "--worker-id",
        "slot-3",
        "--cpu-budget",
        "2",
        "--slot",
        "3/8",
    ]
    assert TEMPLATE["spec"]["containers"][0]["args"][4] == "slot-0"  # the template is not touched


def _pod(phase: str, *, status: dict[str, Any] | None = None, **meta: Any) -> dict[str, Any]:
    return {
        "metadata": {
            "name": "p",
            "labels": {"antbatch/slot": "1"},
            "creationTimestamp": "2026-12-03T10:00:00Z",
            **meta,
        },
        "status": {"phase": phase, **(status or {})},
    }


def _terminated(reason: str, code: int) -> dict[str, Any]:
    return {"containerStatuses": [{"name": "base", "state": {"terminated": {"reason": reason, "exitCode": code}}}]}


@pytest.mark.parametrize(
    ("pod", "expected"),
    [
        pytest.param(_pod("Running"), ("Running", None, None, False, False), id="running"),
        pytest.param(
            _pod(
                "Pending",
                status={"conditions": [{"type": "PodScheduled", "status": "False", "reason": "Unschedulable"}]},
            ),
            ("Pending", None, None, True, False),
            id="unschedulable",
        ),
        pytest.param(
            _pod(
                "Failed",
                status={
                    "conditions": [{"type": "DisruptionTarget", "status": "True", "reason": "PreemptionByScheduler"}],
                    **_terminated("Error", 143),
                },
            ),
            ("Failed", "DisruptionTarget", 143, False, False),
            id="preempted",
        ),
        pytest.param(
            _pod("Failed", status={"reason": "Evicted", **_terminated("Error", 75)}),
            ("Failed", "Evicted", 75, False, False),
            id="evicted",
        ),
        pytest.param(
            _pod("Failed", status=_terminated("OOMKilled", 137)), ("Failed", "OOMKilled", 137, False, False), id="oom"
        ),
        pytest.param(_pod("Failed", status=_terminated("Error", 3)), ("Failed", "Error", 3, False, False), id="error"),
        pytest.param(
            _pod("Succeeded", status=_terminated("Completed", 0)), ("Succeeded", None, 0, False, False), id="done"
        ),
        pytest.param(
            _pod(
                "Pending",
                status={"containerStatuses": [{"name": "base", "state": {"waiting": {"reason": "ErrImagePull"}}}]},
            ),
            ("Pending", "ErrImagePull", None, False, False),
            id="image-pull",
        ),
        pytest.param(
            _pod("Running", deletionTimestamp="2026-12-03T10:00:05Z"),
            ("Running", None, None, False, True),
            id="deleting",
        ),
    ],
)
def test_a_listed_pod_is_read_into_what_the_controller_needs(pod: dict[str, Any], expected: tuple[Any, ...]) -> None:
    view = pod_view(pod, now=1_796_292_010.0)  # 10 s after creation
    assert view is not None and view.slot == 1 and view.age_s == pytest.approx(10.0)
    assert (view.phase, view.reason, view.exit_code, view.unschedulable, view.deleting) == expected


def test_a_pod_without_a_slot_label_is_not_the_pools() -> None:
    assert pod_view({"metadata": {"name": "x", "labels": {}}, "status": {}}, now=0.0) is None


@pytest.fixture
def big_plan(tmp_path: pathlib.Path) -> str:
    """2,000 shards of 2 rows: pending work for 2,000 pods."""
    write_transactions(tmp_path / "in", files=1, rows_per_file=2 * PODS, row_group_size=2)
    ti = FakeTaskInstance()
    PlanBatchInferenceOperator(
        task_id="plan",
        input_uri=str(tmp_path / "in"),
        output_uri=str(tmp_path / "out"),
        model=f"{TABULAR}:build_model",
        max_shard_rows=2,
        max_workers=PODS,
    ).execute(ti.context())
    plan_uri = str(ti.xcom["plan_uri"])
    assert len(Ledger.open(plan_uri).plan.shards) == PODS
    return plan_uri


@pytest.mark.slow
def test_a_steady_tick_over_2000_pods_costs_one_request(big_plan: str, tmp_path: pathlib.Path) -> None:
    """Creating and deleting cost one request per pod; a tick with nothing to change costs one list."""
    root = tmp_path / "cluster"
    root.mkdir()
    with run_kube_cluster(root, run_processes=False, kubelet_tick_s=0.5, fast_pods=True) as cluster:
        trigger = _trigger(big_plan, cluster, min_workers=PODS, max_workers=PODS)
        loop = PoolLoop(trigger)
        controller = PoolController(PoolSettings(**trigger.settings))

        async def scenario(api: Any) -> dict[str, Any]:
            counts: dict[str, Any] = {}
            before = cluster.client_requests()
            assert await loop.tick(api, controller) is None
            counts["first"] = cluster.client_requests() - before
            deadline = time.monotonic() + 120
            while sum(r.occupies for r in cluster.kubelet.runs) < PODS:
                assert time.monotonic() < deadline, "the node did not start every pod"
                await asyncio.sleep(0.5)
            before = cluster.client_requests()
            assert await loop.tick(api, controller) is None
            counts["steady"] = cluster.client_requests() - before
            before = cluster.client_requests()
            counts["deleted"] = await loop.delete_all(api)
            counts["delete"] = cluster.client_requests() - before
            return counts

        counts = asyncio.run(trigger._with_api(scenario))
        created = cluster.created_pods()
    assert counts["first"] == {"GET /api/v1/namespaces/*/pods": 1, "POST /api/v1/namespaces/*/pods": PODS}
    assert counts["steady"] == {"GET /api/v1/namespaces/*/pods": 1}
    assert counts["deleted"] == PODS
    assert counts["delete"] == {"GET /api/v1/namespaces/*/pods": 1, "DELETE /api/v1/namespaces/*/pods/*": PODS}
    validate = pod_validator()
    for pod in created:
        validate({"apiVersion": "v1", "kind": "Pod", **pod})
    assert sorted(int(p["metadata"]["labels"]["antbatch/slot"]) for p in created) == list(range(PODS))


@pytest.fixture
def idle_cluster(tmp_path: pathlib.Path) -> Iterator[KubeCluster]:
    """A node that runs no processes: pods come up Running and stay so, nothing is committed."""
    root = tmp_path / "cluster"
    root.mkdir()
    with run_kube_cluster(root, run_processes=False, fast_pods=True) as cluster:
        yield cluster


def test_the_execution_deadline_deletes_the_pool_then_fires_timeout(ledger: Ledger, idle_cluster: KubeCluster) -> None:
    trigger = _trigger(ledger.plan_uri, idle_cluster, min_workers=2)
    trigger.deadline = time.time() + 1.5
    event = asyncio.run(asyncio.wait_for(trigger.steer(), timeout=30))
    assert event["status"] == "timeout" and "execution timeout passed: 0/3 shards committed" in event["message"]
    assert len(idle_cluster.created_pods()) >= 2 and idle_cluster.live_pods() == []


def test_on_kill_deletes_the_pool_and_cleanup_leaves_it(ledger: Ledger, idle_cluster: KubeCluster) -> None:
    """A user's kill (clear, mark failed) deletes the pods; a triggerer shutdown (cleanup only) does not."""
    trigger = _trigger(ledger.plan_uri, idle_cluster, min_workers=2)

    async def scenario() -> None:
        task = asyncio.create_task(trigger.steer())
        while len(idle_cluster.live_pods()) < 2:
            await asyncio.sleep(0.1)
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
        await trigger.cleanup()
        assert len(idle_cluster.live_pods()) >= 2
        await trigger.on_kill()

    asyncio.run(asyncio.wait_for(scenario(), timeout=30))
    assert idle_cluster.live_pods() == []
