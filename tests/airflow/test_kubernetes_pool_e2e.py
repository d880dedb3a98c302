"""The elastic pool end to end: ``launcher="kubernetes-pool"`` under ``dag.test()``, pods on the emulator.

The DAG is plan -> pool -> finalize; the pool task defers and ``dag.test()`` runs its trigger
in line, so the reconcile loop (list, ledger status, create/delete) talks HTTP to kmock's API
server while the test kubelet runs each pod's worker as a local process, within the node's
capacity (tests/kube_cluster.py). A background script changes the cluster mid-job.

In every scenario: every pod the loop sent is valid against the Kubernetes 1.33 schema (strict),
no two live pods share a slot, no pod is left once the task ends, and a finished job holds every
input row exactly once.

- capacity grows and shrinks mid-job: pods past capacity wait Unschedulable, are scheduled as
  slots appear, are preempted (DisruptionTarget) when the node shrinks, and are replaced on
  their own slot;
- a preemption storm: half the pods at once, each replaced within a tick plus its start;
- a triggerer restart: the trigger is cancelled mid-job and a new one, built from its
  serialized kwargs, adopts the pods by label (none created for a slot that still runs) and
  resumes the controller's memory from the pool status file;
- a bad image and a crash loop fail the task within seconds, naming the pod's reason, with
  every pod deleted and nothing committed twice.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import gc
import importlib
import json
import os
import threading
import time
from typing import TYPE_CHECKING, Any

import pytest

from airflow_antbatch import layout
from airflow_antbatch.ledger import Ledger
from airflow_antbatch.planning import resolve_plan_uri
from tests.airflow.test_dag_e2e import _load_dag as load_dag_file
from tests.conftest import committed_ids, write_transactions
from tests.kube_cluster import KubeCluster, Kubelet, PodRun, pod_validator, run_kube_cluster

if TYPE_CHECKING:
    import pathlib
    from collections.abc import Callable, Iterator

    import pyarrow as pa

pytestmark = [
    pytest.mark.airflow,
    pytest.mark.slow,
    # The provider's API clients leave pooled sockets to the garbage collector (see test_kubernetes_e2e).
    pytest.mark.filterwarnings("ignore:Exception ignored in. <socket.socket:pytest.PytestUnraisableExceptionWarning"),
]
DAG_ID = "antbatch_pool"
POOL_TASK = "batch_inference.pool"
IMAGE = "antbatch-worker:test"
BAD_IMAGE = "antbatch-worker:no-such-tag"


@pytest.fixture
def cluster(tmp_path: pathlib.Path, subprocess_env: dict[str, str]) -> Iterator[KubeCluster]:
    """The API server and one node with 4 pod slots."""
    root = tmp_path / "cluster"
    root.mkdir()
    with run_kube_cluster(root, entrypoints={IMAGE: ["antbatch"]}, unpullable={BAD_IMAGE}, capacity=4) as kube:
        yield kube
    gc.collect()
    assert not kube.kubelet.errors, kube.kubelet.errors


@pytest.fixture
def job(tmp_path: pathlib.Path, monkeypatch: pytest.MonkeyPatch, cluster: KubeCluster) -> tuple[pathlib.Path, pa.Table]:
    """24 shards of 50 rows, and the DAG file's settings pointing at them and the cluster."""
    table = write_transactions(tmp_path / "data" / "in", files=2, rows_per_file=600, row_group_size=50)
    monkeypatch.setenv("ANTBATCH_TEST_DATA_ROOT", str(tmp_path / "data"))
    monkeypatch.setenv("ANTBATCH_TEST_KUBECONFIG", str(cluster.kubeconfig))
    monkeypatch.setenv("ANTBATCH_TEST_BATCH_DELAY", "0.5")
    return tmp_path, table


def _load_dag(**pool: Any) -> Any:
    """The pool DAG, parsed afresh with these pool settings (the DAG file reads them at import)."""
    os.environ["ANTBATCH_TEST_POOL"] = json.dumps(pool)
    try:
        return load_dag_file("antbatch_pool_dags.py", DAG_ID)
    finally:
        del os.environ["ANTBATCH_TEST_POOL"]


class Script:
    """Steps run in order in a background thread while the DAG runs: (condition, action) pairs."""

    def __init__(self, steps: list[tuple[Callable[[], bool], Callable[[], None]]], timeout_s: float = 90.0) -> None:
        self.steps = steps
        self.done: list[float] = []
        self.error: BaseException | None = None
        self._deadline = time.monotonic() + timeout_s
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        try:
            for when, action in self.steps:
                while not when():
                    if time.monotonic() > self._deadline:
                        raise TimeoutError(f"step {len(self.done)} never came")
                    time.sleep(0.1)
                action()
                self.done.append(time.monotonic())
        except BaseException as exc:
            self.error = exc

    def __enter__(self) -> Script:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._thread.join(timeout=5)


def _committed(output: pathlib.Path) -> int:
    """Shards committed so far (0 before the plan exists)."""
    with contextlib.suppress(FileNotFoundError):
        return len(Ledger.open(resolve_plan_uri(str(output))).committed_shards())
    return 0


def _running(cluster: KubeCluster) -> int:
    return sum(run.occupies for run in cluster.kubelet.runs)


def _pool_pods(cluster: KubeCluster) -> list[dict[str, Any]]:
    return [p for p in cluster.created_pods() if p["metadata"]["labels"].get("antbatch/component") == "pool-worker"]


def _check_pods(cluster: KubeCluster) -> list[dict[str, Any]]:
    """Every pool pod sent is valid, carries its slot as worker id and labels; none is left."""
    validate = pod_validator()
    pods = _pool_pods(cluster)
    for pod in pods:
        validate({"apiVersion": "v1", "kind": "Pod", **pod})
        labels, base = pod["metadata"]["labels"], pod["spec"]["containers"][0]
        slot = labels["antbatch/slot"]
        args = base["args"]
        assert args[args.index("--worker-id") + 1] == f"slot-{slot}" == labels["antbatch/worker-id"]
        assert args[args.index("--slot") + 1] == f"{slot}/4"
        assert labels["kueue.x-k8s.io/queue-name"] == "team-a" and pod["spec"]["priorityClassName"] == "batch-low"
        assert [c["name"] for c in pod["spec"]["containers"]] == ["base"]  # no XCom sidecar
    assert cluster.live_pods() == []
    return pods


def _exactly_once(output: pathlib.Path, table: pa.Table) -> None:
    assert collections.Counter(committed_ids(str(output))) == collections.Counter(table.column("txn_id").to_pylist())


def _no_slot_twice(cluster: KubeCluster) -> Callable[[], None]:
    """A watcher: records any moment two occupying pods share a slot."""
    clashes: list[str] = []
    stop = threading.Event()

    def watch() -> None:
        while not stop.wait(0.05):
            slots = collections.Counter(
                run.labels.get("antbatch/slot") for run in list(cluster.kubelet.runs) if run.occupies
            )
            clashes.extend(f"slot {s} x{n}" for s, n in slots.items() if n > 1)

    thread = threading.Thread(target=watch, daemon=True)
    thread.start()

    def check() -> None:
        stop.set()
        thread.join()
        assert not clashes, clashes

    return check


def _pool_status(output: pathlib.Path) -> dict[str, Any]:
    ledger = Ledger.open(resolve_plan_uri(str(output)))
    data = ledger.store.read(layout.POOL_FILE)
    assert data is not None
    doc: dict[str, Any] = json.loads(data)
    return doc


def _successors(kubelet: Kubelet, victim: PodRun) -> list[PodRun]:
    """Pods the node started on the victim's slot after it."""
    slot = victim.labels["antbatch/slot"]
    return [
        r for r in list(kubelet.runs) if r.labels.get("antbatch/slot") == slot and r.admitted_at > victim.admitted_at
    ]


def _unschedulable(pod: dict[str, Any]) -> bool:
    return any(c.get("reason") == "Unschedulable" for c in pod["status"].get("conditions") or [])


def test_capacity_changes_and_a_preemption_storm_mid_job_and_every_row_is_committed_once(
    airflow_db: pathlib.Path, cluster: KubeCluster, job: tuple[pathlib.Path, pa.Table]
) -> None:
    """One node slot at first (the pool holds at one pending extra), then four, then a storm
    takes two of the four running pods at once, then the node shrinks to two."""
    root, table = job
    output = root / "data" / "out"
    kubelet = cluster.kubelet
    kubelet.set_capacity(1)
    victims: list[PodRun] = []
    seen: dict[str, Any] = {}

    def storm() -> None:
        seen["committed_at_storm"] = _committed(output)
        victims.extend(kubelet.preempt(2))

    steps = [
        (
            lambda: _committed(output) >= 1 and any(_unschedulable(p) for p in cluster.live_pods()),
            lambda: kubelet.set_capacity(4),
        ),
        (lambda: _running(cluster) >= 4, storm),
        (lambda: all(_successors(kubelet, r) for r in victims), lambda: kubelet.set_capacity(2)),
    ]
    no_clash = _no_slot_twice(cluster)
    with Script(steps) as script:
        run = _load_dag().test()
    assert script.error is None and len(script.done) == 3, script.error
    assert run.state == "success"
    no_clash()
    _exactly_once(output, table)
    pods = _check_pods(cluster)
    assert seen["committed_at_storm"] < table.num_rows // 50, "the storm came after the job's end"
    # Each preempted pod was replaced on its own slot (the same worker id) within one tick
    # (0.3 s) plus its end (SIGTERM: the worker releases its shard) and the node's start.
    for victim in victims:
        assert victim.reported is not None and victim.reported["reason"] == "Preempted"
        assert victim.reported["conditions"][-1]["type"] == "DisruptionTarget"
        assert _successors(kubelet, victim)[0].admitted_at - script.done[1] < 8.0
    # Shrinking the node preempted more; the pool status file shows the decisions.
    assert sum(r.ended_by is not None for r in kubelet.runs) >= 3
    assert len(pods) >= 6
    status = _pool_status(output)
    assert status["state"] == "success" and status["history"], status
    assert any("unschedulable" in reason for _, _, reason in status["history"]), status["history"]


def test_a_restarted_triggerer_adopts_the_pool_and_creates_no_second_one(
    airflow_db: pathlib.Path,
    cluster: KubeCluster,
    job: tuple[pathlib.Path, pa.Table],
    monkeypatch: pytest.MonkeyPatch,
    capfd: pytest.CaptureFixture[str],
    caplog: pytest.LogCaptureFixture,
) -> None:
    """The first trigger is cancelled mid-job, as a triggerer shutdown does (cleanup, no on_kill);
    a second is built from its serialized kwargs, as the next triggerer does, and finishes."""
    from airflow.sdk.definitions import dag as dag_module

    root, table = job
    output = root / "data" / "out"
    inline = dag_module._run_inline_trigger
    seen: dict[str, Any] = {}

    def restart_midway(trigger: Any, ti: Any) -> Any:
        async def first_life() -> None:
            task = asyncio.ensure_future(anext(trigger.run()))
            while _committed(output) < 2 or _running(cluster) < 4:
                await asyncio.sleep(0.1)
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
            await trigger.cleanup()

        asyncio.run(first_life())
        seen["pods_before"] = {p["metadata"]["name"] for p in cluster.live_pods()}
        seen["created_before"] = len(_pool_pods(cluster))
        classpath, kwargs = trigger.serialize()
        module, _, name = classpath.rpartition(".")
        fresh = getattr(importlib.import_module(module), name)(**json.loads(json.dumps(kwargs)))
        return inline(fresh, ti)

    monkeypatch.setattr(dag_module, "_run_inline_trigger", restart_midway)
    no_clash = _no_slot_twice(cluster)
    run = _load_dag().test()
    assert run.state == "success"
    no_clash()
    _exactly_once(output, table)
    pods = _check_pods(cluster)
    # The second trigger adopted the four running pods by their labels: it created none
    # (no second pool), and it resumed the controller's memory from the pool status file.
    assert len(seen["pods_before"]) == 4
    assert len(pods) == seen["created_before"], [p["metadata"]["name"] for p in pods[seen["created_before"] :]]
    out, err = capfd.readouterr()
    assert "pool: resuming with the controller state published at" in out + err + caplog.text


@pytest.mark.parametrize(
    ("pool", "reason"),
    [
        pytest.param({"image": BAD_IMAGE}, r"cannot pull its image: ErrImagePull", id="bad-image"),
        pytest.param(
            {"cmds": ["python", "-c", "import sys; sys.exit(3)"], "crash_loop_limit": 2},
            r"failed 2 times in a row with Error .*: a crash loop",
            id="crash-loop",
        ),
    ],
)
def test_a_broken_pod_fails_the_task_within_seconds_naming_its_reason(
    airflow_db: pathlib.Path,
    cluster: KubeCluster,
    job: tuple[pathlib.Path, pa.Table],
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
    capfd: pytest.CaptureFixture[str],
    pool: dict[str, Any],
    reason: str,
) -> None:
    import re

    from airflow_antbatch.pool import controller

    monkeypatch.setattr(controller, "IMAGE_PULL_GRACE_S", 1.0)  # minutes on a cluster; a second here
    root, _ = job
    started = time.monotonic()
    run = _load_dag(**pool).test()
    assert run.state == "failed"
    assert time.monotonic() - started < 60
    states = {ti.task_id.rsplit(".", 1)[-1]: ti.state for ti in run.get_task_instances()}
    assert states["pool"] == "failed" and states["finalize"] == "upstream_failed"
    out, err = capfd.readouterr()
    logs = out + err + caplog.text
    assert re.search(reason, logs), logs[-3000:]
    _check_pods(cluster)
    assert _committed(root / "data" / "out") == 0
