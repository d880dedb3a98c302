"""The pod launcher end to end: the whole DAG under ``dag.test()``, workers as pods.

The real KubernetesPodOperator subclass, its API calls, mapping, retries, the sensor and
finalize all run; the cluster is kmock's API server on 127.0.0.1 plus the test kubelet of
tests/kube_cluster.py, which runs each pod's command as a local process. ``dag.test()`` runs
mapped tasks one after another, so the first worker pod commits every shard unless something
stops it, and later pods (and retries) find the shards committed.

- a clean run: 3 worker pods with the expected labels, args and env; every input row exactly
  once; then clearing one worker task of the finished run starts a pod that skips every
  committed shard (judged from the ledger, which it leaves untouched);
- disruptions in one run: a pod evicted mid-shard (SIGTERM, released shard, phase Failed,
  reason Evicted), a pod preempted before it starts (deleted while Pending: 404 for the
  operator) and a pod deleted out from under its running task are each retried by Airflow,
  and the job still commits every row exactly once;
- the test kubelet itself SIGKILLs a pod that ignores SIGTERM once its grace period is over.
"""

from __future__ import annotations

import collections
import gc
import importlib.util
import re
import time
from typing import TYPE_CHECKING, Any

import pytest

from airflow_antbatch import layout
from airflow_antbatch.finalize import read_manifest
from airflow_antbatch.ledger import Ledger
from airflow_antbatch.planning import resolve_plan_uri
from tests.airflow.conftest import DAGS_FOLDER
from tests.conftest import committed_ids, write_transactions
from tests.kube_cluster import Disruption, KubeCluster, PodRun, run_kube_cluster

if TYPE_CHECKING:
    import pathlib
    from collections.abc import Iterator

    import pyarrow as pa

pytestmark = [
    pytest.mark.airflow,
    pytest.mark.slow,
    # The provider's API clients (a KubernetesHook per task, never closed: a real task process
    # exits) leave their pooled sockets to the loopback API server to the garbage collector.
    pytest.mark.filterwarnings("ignore:Exception ignored in. <socket.socket:pytest.PytestUnraisableExceptionWarning"),
]
DAG_FILE = "antbatch_kubernetes_dags.py"
DAG_ID = "antbatch_kubernetes"
WORKER_TASK = "batch_inference.worker"
IMAGE = "antbatch-worker:test"
SUMMARY_PATH = "/airflow/xcom/return.json"


@pytest.fixture
def kube_cluster(tmp_path: pathlib.Path, subprocess_env: dict[str, str]) -> Iterator[KubeCluster]:
    """The API server and one node; the worker image's ENTRYPOINT is ``antbatch``."""
    root = tmp_path / "cluster"
    root.mkdir()
    with run_kube_cluster(root, entrypoints={IMAGE: ["antbatch"]}) as cluster:
        yield cluster
    # Collect the provider's unclosed API clients now, under this module's warning filter,
    # rather than at some later point in the session.
    gc.collect()
    assert not cluster.kubelet.errors, cluster.kubelet.errors


@pytest.fixture
def job_input(
    tmp_path: pathlib.Path, monkeypatch: pytest.MonkeyPatch, kube_cluster: KubeCluster
) -> tuple[pathlib.Path, pa.Table]:
    """6 shards of 100 rows, and the DAG file's settings pointing at them and the cluster."""
    table = write_transactions(tmp_path / "data" / "in", files=2, rows_per_file=300, row_group_size=100)
    monkeypatch.setenv("ANTBATCH_TEST_DATA_ROOT", str(tmp_path / "data"))
    monkeypatch.setenv("ANTBATCH_TEST_KUBECONFIG", str(kube_cluster.kubeconfig))
    markers = tmp_path / "markers"
    markers.mkdir()
    monkeypatch.setenv("ANTBATCH_TEST_MARKER_DIR", str(markers))
    return tmp_path, table


def _load_dag() -> Any:
    """Import the DAG file afresh (it reads its settings at import)."""
    spec = importlib.util.spec_from_file_location(f"under_test_{DAG_ID}", DAGS_FOLDER / DAG_FILE)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return getattr(module, DAG_ID)()


def _states(dag_run: Any) -> dict[tuple[str, int], str | None]:
    return {(ti.task_id.rsplit(".", 1)[-1], ti.map_index): ti.state for ti in dag_run.get_task_instances()}


def _ledger_files(ledger: Ledger) -> dict[str, bytes | None]:
    kinds = (layout.CLAIMS_DIR, layout.RELEASES_DIR, layout.COMMITS_DIR)
    names = [f"{d}/{n}" for d in kinds for n in ledger.store.list(d)]
    return {name: ledger.store.read(name) for name in names}


def _worker_pods(cluster: KubeCluster) -> dict[tuple[str, str], dict[str, Any]]:
    """Created worker pods by (map_index, try_number)."""
    pods = {}
    for pod in cluster.created_pods():
        labels = pod["metadata"]["labels"]
        if labels.get("task_id") == WORKER_TASK:
            pods[labels["map_index"], labels["try_number"]] = pod
    return pods


def _base(pod: dict[str, Any]) -> dict[str, Any]:
    return next(c for c in pod["spec"]["containers"] if c["name"] == "base")


def _task_logs(capfd: pytest.CaptureFixture[str], caplog: pytest.LogCaptureFixture) -> str:
    """What the tasks logged: ``dag.test()`` prints task logs, the worker's included (stdout or
    stderr), and some reach logging instead: all three are read."""
    out, err = capfd.readouterr()
    return out + err + caplog.text


def _scoring(markers: pathlib.Path) -> Any:
    """A Disruption condition: the pod's worker process is scoring a batch (the slow model's marker)."""
    return lambda run: run.pid is not None and (markers / str(run.pid)).exists()


def test_worker_pods_score_every_row_once_and_a_cleared_worker_skips_committed_shards(
    airflow_db: pathlib.Path,
    kube_cluster: KubeCluster,
    job_input: tuple[pathlib.Path, pa.Table],
    capfd: pytest.CaptureFixture[str],
    caplog: pytest.LogCaptureFixture,
) -> None:
    root, table = job_input
    output = str(root / "data" / "out")
    dag = _load_dag()

    run = dag.test()
    assert run.state == "success", _states(run)
    ids = committed_ids(output)
    assert collections.Counter(ids) == collections.Counter(table.column("txn_id").to_pylist())
    manifest = read_manifest(output)
    assert manifest is not None and manifest["rows"] == table.num_rows

    # One pod per mapped worker, built by the operator as documented.
    pods = _worker_pods(kube_cluster)
    assert sorted(pods) == [("0", "1"), ("1", "1"), ("2", "1")]
    ledger = Ledger.open(resolve_plan_uri(output))
    for (index, _), pod in pods.items():
        labels, base = pod["metadata"]["labels"], _base(pod)
        assert labels["dag_id"] == DAG_ID and labels["kubernetes_pod_operator"] == "True"
        assert pod["metadata"]["namespace"] == kube_cluster.namespace
        assert base["image"] == IMAGE
        args = base.get("command", []) + base["args"]
        assert args[args.index("--spec") + 1] == ledger.plan_uri
        assert args[args.index("--worker-id") + 1] == f"worker-{index}"
        assert args[args.index("--summary-file") + 1] == SUMMARY_PATH
        env = {e["name"]: e.get("value") for e in base.get("env", [])}
        assert env["ANTBATCH_TEST_BATCH_DELAY"] == "0.05"
        assert pod["spec"]["terminationGracePeriodSeconds"] == 5
    # Every pod ran to exit 0 on the node, and none is left behind; the worker's own log
    # reached the task log through the pod log endpoint.
    assert all(r.base().exit_code == 0 for r in kube_cluster.kubelet.runs)
    assert kube_cluster.live_pods() == []
    assert "[base] " in _task_logs(capfd, caplog)

    summaries = {
        ti.map_index: ti.xcom_pull(task_ids=WORKER_TASK, map_indexes=ti.map_index)
        for ti in run.get_task_instances()
        if ti.task_id == WORKER_TASK
    }
    assert sum(s["shards_committed"] for s in summaries.values()) == len(ledger.plan.shards) == 6

    # Clearing one worker task of the finished run, as the UI does, starts a fresh pod that
    # finds every shard committed: no claim, release or commit is written.
    before = _ledger_files(ledger)
    summary = _clear_and_run(dag, run, map_index=1)
    assert summary["shards_committed"] == 0 and summary["shards_skipped"] == 6
    assert _ledger_files(ledger) == before
    assert ("1", "2") in _worker_pods(kube_cluster)
    assert committed_ids(output) == ids and read_manifest(output) == manifest


def _clear_and_run(dag: Any, run: Any, *, map_index: int) -> dict[str, Any]:
    """Clear one mapped worker task (downstream untouched) and run it as the scheduler would."""
    from airflow.models.taskinstance import clear_task_instances
    from airflow.sdk.definitions.dag import _run_task
    from airflow.utils.session import create_session

    with create_session() as session:
        tis = [
            ti
            for ti in run.get_task_instances(session=session)
            if (ti.task_id, ti.map_index) == (WORKER_TASK, map_index)
        ]
        clear_task_instances(tis, session)
    with create_session() as session:
        ti = next(
            ti
            for ti in run.get_task_instances(session=session)
            if (ti.task_id, ti.map_index) == (WORKER_TASK, map_index)
        )
        ti.try_number += 1
        session.commit()
        _run_task(ti=ti, task=dag.task_dict[WORKER_TASK])
        assert ti.state == "success"
        summary: dict[str, Any] = ti.xcom_pull(task_ids=WORKER_TASK, map_indexes=map_index)
    return summary


def test_evicted_preempted_and_deleted_pods_are_retried_and_every_row_is_committed_once(
    airflow_db: pathlib.Path,
    kube_cluster: KubeCluster,
    job_input: tuple[pathlib.Path, pa.Table],
    monkeypatch: pytest.MonkeyPatch,
    capfd: pytest.CaptureFixture[str],
    caplog: pytest.LogCaptureFixture,
) -> None:
    root, table = job_input
    monkeypatch.setenv("ANTBATCH_TEST_BATCH_DELAY", "0.2")  # a shard takes ~0.4 s: time to act mid-shard
    scoring = _scoring(root / "markers")
    kubelet = kube_cluster.kubelet
    evicted = kubelet.disrupt(Disruption({"map_index": "0", "try_number": "1"}, "evict", when=scoring))
    preempted = kubelet.disrupt(Disruption({"map_index": "1", "try_number": "1"}, "preempt_pending"))
    deleted = kubelet.disrupt(Disruption({"map_index": "2", "try_number": "1"}, "delete", when=scoring))
    dag = _load_dag()

    run = dag.test()
    assert run.state == "success", _states(run)
    assert collections.Counter(committed_ids(str(root / "data" / "out"))) == collections.Counter(
        table.column("txn_id").to_pylist()
    )
    # Each disruption hit its pod, and Airflow retried each worker once, in a new pod.
    assert all(d.fired_on is not None for d in (evicted, preempted, deleted))
    assert sorted(_worker_pods(kube_cluster)) == [
        ("0", "1"),
        ("0", "2"),
        ("1", "1"),
        ("1", "2"),
        ("2", "1"),
        ("2", "2"),
    ]
    tries = {ti.map_index: ti.try_number for ti in run.get_task_instances() if ti.task_id == WORKER_TASK}
    assert tries == {0: 2, 1: 2, 2: 2}

    # The evicted and the deleted worker got SIGTERM mid-shard and released it (exit 75)
    # well within the grace period; the preempted pod never started.
    evicted_run, deleted_run = _run(evicted), _run(deleted)
    assert evicted_run.base().exit_code == 75 and evicted_run.reported is not None
    assert evicted_run.reported["phase"] == "Failed" and evicted_run.reported["reason"] == "Evicted"
    assert deleted_run.base().exit_code == 75
    assert _run(preempted).containers == {}
    # The task log says what happened to each pod.
    log = _task_logs(capfd, caplog)
    assert re.search(rf"pod {evicted_run.name} evicted, .*reason Evicted \(The node was low on resource", log)
    for gone in (_run(preempted), deleted_run):
        assert re.search(rf"pod (?:{gone.namespace}/)?{gone.name} (?:was )?deleted before the worker exited", log)
    ledger = Ledger.open(resolve_plan_uri(str(root / "data" / "out")))
    status = ledger.status()
    assert status.committed == status.planned == 6
    assert sum(n.startswith(f"{layout.RELEASES_DIR}/") for n in _ledger_files(ledger)) >= 2


def _run(disruption: Disruption) -> PodRun:
    assert disruption.fired_on is not None
    return disruption.fired_on


def test_the_test_kubelet_kills_a_pod_that_ignores_sigterm_once_its_grace_period_is_over(
    kube_cluster: KubeCluster,
) -> None:
    """Eviction as a kubelet does it: SIGTERM, SIGKILL after terminationGracePeriodSeconds."""
    evict = kube_cluster.kubelet.disrupt(Disruption({"app": "stubborn"}, "evict", reason="Preempted"))
    pod = {
        "metadata": {"name": "stubborn", "labels": {"app": "stubborn"}},
        "spec": {
            "terminationGracePeriodSeconds": 1,
            "restartPolicy": "Never",
            "containers": [{"name": "base", "image": "busybox", "command": ["sh", "-c", "trap '' TERM; sleep 30"]}],
        },
    }
    kube_cluster.client.create_namespaced_pod(kube_cluster.namespace, pod)
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        status = kube_cluster.client.read_namespaced_pod("stubborn", kube_cluster.namespace).status
        if status.phase == "Failed":
            break
        time.sleep(0.1)
    assert status.phase == "Failed" and status.reason == "Preempted"
    assert status.container_statuses[0].state.terminated.exit_code == 137  # SIGKILL
    assert [c.type for c in status.conditions][-1] == "DisruptionTarget"
    assert evict.fired_on is not None
