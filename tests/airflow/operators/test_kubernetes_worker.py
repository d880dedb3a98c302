"""KubernetesBatchWorkerOperator: its pods, checked against the Kubernetes 1.33 schema, and its retries.

Pods come from the operator's own dry-run path (no cluster, no kubeconfig) and are validated
with kubernetes-validate in strict mode (unknown fields are errors) for a CPU and a GPU setup.
The retry guards (no reuse of a dead pod, no two pods of one worker) run against the test
cluster of tests/kube_cluster.py: the real kubernetes client and provider code over HTTP.
"""

from __future__ import annotations

import re
import time
import types
from typing import TYPE_CHECKING, Any

import kubernetes_validate
import pytest
import yaml
from airflow.sdk.exceptions import AirflowException, AirflowFailException
from kubernetes.client import ApiClient
from kubernetes.client import models as k8s

from airflow_antbatch import exit_codes
from airflow_antbatch.cli import build_parser
from airflow_antbatch.operators.kubernetes_worker import (
    LABEL_PLAN,
    LABEL_WORKER,
    KubernetesBatchWorkerOperator,
    cpu_budget_of,
    plan_label,
)
from airflow_antbatch.operators.pod_termination import pod_termination
from airflow_antbatch.task_group import launcher_operator
from tests.airflow.conftest import FakeTaskInstance
from tests.conftest import REPO_ROOT
from tests.kube_cluster import Disruption, KubeCluster, run_kube_cluster

if TYPE_CHECKING:
    import pathlib
    from collections.abc import Iterator

KUBERNETES_VERSION = "1.33"
PLAN_URI = "s3://lake/predictions/ds=2026-11-26/_antbatch/attempt-000/plan.json"
STORAGE_OPTIONS = {"client_kwargs": {"endpoint_url": "http://minio.storage:9000"}}
IMAGE = "registry.example.com/ml/antbatch-worker:0.1.0"
# What Kubernetes accepts as a label value.
LABEL_VALUE = re.compile(r"^(([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9])?$")

CPU = {
    "image": f"{IMAGE}-cpu",
    "container_resources": {"requests": {"cpu": "3500m", "memory": "8Gi"}, "limits": {"cpu": "4", "memory": "8Gi"}},
    "service_account_name": "antbatch-worker",
    "env_from": [k8s.V1EnvFromSource(secret_ref=k8s.V1SecretEnvSource(name="lake-s3-credentials"))],
    "priority_class_name": "batch-low",
}
GPU = {
    "image": f"{IMAGE}-cuda12.8",
    "container_resources": k8s.V1ResourceRequirements(
        requests={"cpu": "7", "memory": "30Gi", "nvidia.com/gpu": "1"},
        limits={"cpu": "8", "memory": "32Gi", "nvidia.com/gpu": "1"},
    ),
    "node_selector": {"cloud.google.com/gke-accelerator": "nvidia-l4", "cloud.google.com/gke-spot": "true"},
    "tolerations": [
        k8s.V1Toleration(key="nvidia.com/gpu", operator="Exists", effect="NoSchedule"),
        k8s.V1Toleration(key="cloud.google.com/gke-spot", operator="Equal", value="true", effect="NoSchedule"),
    ],
    "affinity": k8s.V1Affinity(
        node_affinity=k8s.V1NodeAffinity(
            preferred_during_scheduling_ignored_during_execution=[
                k8s.V1PreferredSchedulingTerm(
                    weight=50,
                    preference=k8s.V1NodeSelectorTerm(
                        match_expressions=[
                            k8s.V1NodeSelectorRequirement(
                                key="topology.kubernetes.io/zone", operator="In", values=["a"]
                            )
                        ]
                    ),
                )
            ]
        )
    ),
    "priority_class_name": "batch-preemptible",
    "service_account_name": "antbatch-worker",
    "env_vars": [
        k8s.V1EnvVar(
            name="AWS_SECRET_ACCESS_KEY",
            value_from=k8s.V1EnvVarSource(secret_key_ref=k8s.V1SecretKeySelector(name="lake-s3", key="secret")),
        ),
        k8s.V1EnvVar(name="AWS_REGION", value="eu-west-1"),
    ],
    "torch_threads": 4,
    "preprocess_workers": 3,
}


def _worker(**kwargs: Any) -> KubernetesBatchWorkerOperator:
    return KubernetesBatchWorkerOperator(
        task_id="batch_inference.worker",
        plan_uri=PLAN_URI,
        worker_id="worker-3",
        namespace="ml-batch",
        storage_options=STORAGE_OPTIONS,
        **kwargs,
    )


def _context(try_number: int = 1, run_id: str = "scheduled__2026-11-26T00:00:00+00:00") -> dict[str, Any]:
    """What the provider reads off a task's context to label and find its pods."""
    ti = FakeTaskInstance()
    vars(ti).update(dag_id="nightly_scoring", task_id="batch_inference.worker", map_index=3, try_number=try_number)
    return {**ti.context(), "run_id": run_id, "dag": types.SimpleNamespace()}


def _as_dict(pod: k8s.V1Pod) -> dict[str, Any]:
    data: dict[str, Any] = ApiClient().sanitize_for_serialization(pod)
    return data


@pytest.mark.parametrize("setup", [CPU, GPU], ids=["cpu", "gpu"])
def test_the_dry_run_pod_is_valid_for_kubernetes_1_33(setup: dict[str, Any]) -> None:
    op = _worker(**setup)
    # What dry_run() prints, serialised as the API client sends it (dry_run prints model attribute names).
    pod = _as_dict(op.build_pod_request_obj(context=None, dry_run=True))
    assert kubernetes_validate.validate(pod, KUBERNETES_VERSION, strict=True) == KUBERNETES_VERSION
    # With the labels a task instance adds (run ids hold ':' and '+', sanitised by the provider).
    pod = _as_dict(op.build_pod_request_obj(_context(), dry_run=True))
    kubernetes_validate.validate(pod, KUBERNETES_VERSION, strict=True)
    labels = pod["metadata"]["labels"]
    assert {"dag_id", "run_id", "map_index", "try_number", LABEL_WORKER, LABEL_PLAN} <= labels.keys()
    assert all(LABEL_VALUE.match(value) and len(value) <= 63 for value in labels.values()), labels
    assert labels[LABEL_WORKER] == "worker-3" and labels[LABEL_PLAN] == plan_label(PLAN_URI)
    assert pod["metadata"]["annotations"]["antbatch/plan-uri"] == PLAN_URI
    assert pod["metadata"]["name"].startswith("batch-inference-worker-worker-3-")


@pytest.mark.parametrize("setup", [CPU, GPU], ids=["cpu", "gpu"])
def test_the_container_runs_the_worker_cli_with_the_pods_settings(setup: dict[str, Any]) -> None:
    pod = _as_dict(_worker(**setup).build_pod_request_obj(dry_run=True))
    spec = pod["spec"]
    base = spec["containers"][0]
    assert base["command"] == ["antbatch"]
    args = build_parser().parse_args(base["args"])
    assert (args.command, args.spec, args.worker_id) == ("worker", PLAN_URI, "worker-3")
    assert args.storage_options == STORAGE_OPTIONS
    assert args.summary_file == "/airflow/xcom/return.json"
    assert args.cpu_budget == (4 if setup is CPU else 8)  # from the CPU limit
    assert (args.torch_threads, args.preprocess_workers) == (
        setup.get("torch_threads"),
        setup.get("preprocess_workers"),
    )
    # The summary lands where the provider's XCom sidecar reads it.
    assert [c["name"] for c in spec["containers"]] == ["base", "airflow-xcom-sidecar"]
    assert {"mountPath": "/airflow/xcom", "name": "xcom"} in base["volumeMounts"]
    assert spec["terminationGracePeriodSeconds"] == 60 and spec["restartPolicy"] == "Never"
    assert spec["priorityClassName"] == setup["priority_class_name"]
    assert spec["serviceAccountName"] == "antbatch-worker"
    if setup is GPU:
        assert base["resources"]["limits"]["nvidia.com/gpu"] == "1"
        assert spec["nodeSelector"]["cloud.google.com/gke-accelerator"] == "nvidia-l4"
        assert {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"} in spec["tolerations"]


@pytest.mark.parametrize("setup", [CPU, GPU], ids=["cpu", "gpu"])
def test_credentials_reach_the_pod_only_by_secret_reference(setup: dict[str, Any]) -> None:
    base = _as_dict(_worker(**setup).build_pod_request_obj(dry_run=True))["spec"]["containers"][0]
    literal = {env["name"]: env["value"] for env in base.get("env", []) if "value" in env}
    assert not [name for name in literal if re.search("SECRET|TOKEN|PASSWORD|KEY", name)]
    assert not re.search("secret|token|password|aws_access", " ".join(base["args"]), re.IGNORECASE)
    references = [e for e in base.get("env", []) if "valueFrom" in e] + base.get("envFrom", [])
    assert references, "the credentials come from a Kubernetes secret"


@pytest.mark.parametrize(
    ("kwargs", "named"),
    [
        ({"storage_options": {"key": "AKIA...", "secret": "s3cr3t"}}, "['key', 'secret']"),
        ({"env_vars": {"AWS_SECRET_ACCESS_KEY": "s3cr3t", "AWS_REGION": "eu-west-1"}}, "['AWS_SECRET_ACCESS_KEY']"),
        ({"env_vars": [k8s.V1EnvVar(name="HF_TOKEN", value="hf_x")]}, "['HF_TOKEN']"),
    ],
)
def test_credentials_written_into_the_pod_spec_are_refused(kwargs: dict[str, Any], named: str) -> None:
    with pytest.raises(ValueError, match=re.escape(f"credentials {named} would be written into the pod spec")):
        KubernetesBatchWorkerOperator(task_id="worker", plan_uri=PLAN_URI, worker_id="worker-0", **kwargs)


@pytest.mark.parametrize(
    ("resources", "budget"),
    [
        ({"limits": {"cpu": "4"}, "requests": {"cpu": "2"}}, 4),
        ({"requests": {"cpu": "2500m"}}, 2),
        ({"requests": {"cpu": "500m"}}, 1),
        ({"limits": {"cpu": 6}}, 6),
        ({"limits": {"memory": "4Gi", "nvidia.com/gpu": "1"}}, None),
        (None, None),
    ],
)
def test_the_cpu_budget_comes_from_the_cpu_limit_or_request(
    resources: dict[str, Any] | None, budget: int | None
) -> None:
    requirements = k8s.V1ResourceRequirements(**resources) if resources else None
    assert cpu_budget_of(requirements) == budget
    args = build_parser().parse_args(_worker(container_resources=resources).worker_arguments())
    assert args.cpu_budget == budget
    explicit = build_parser().parse_args(_worker(container_resources=resources, cpu_budget=3).worker_arguments())
    assert explicit.cpu_budget == 3


def test_without_xcom_push_the_worker_writes_no_summary_file() -> None:
    args = build_parser().parse_args(_worker(do_xcom_push=False).worker_arguments())
    assert args.summary_file is None  # there is no /airflow/xcom volume to write to


def test_the_readme_example_builds_a_valid_gpu_worker_pod() -> None:
    text = (REPO_ROOT / "README.md").read_text()
    section = text[text.index("## Kubernetes") : text.index("## User code contract")]
    code = re.search(r"```python\n(.*?)```", section, re.DOTALL)
    assert code is not None
    namespace: dict[str, Any] = {}
    exec(compile(code.group(1), "README.md", "exec"), namespace)
    mapped = namespace["nightly_scoring_on_kubernetes"]().get_task("batch_inference.worker")
    assert mapped.operator_class is KubernetesBatchWorkerOperator
    pod = _as_dict(
        KubernetesBatchWorkerOperator(
            task_id="worker", plan_uri=PLAN_URI, worker_id="worker-0", **namespace["GPU_WORKER"]
        ).build_pod_request_obj(dry_run=True)
    )
    kubernetes_validate.validate(pod, KUBERNETES_VERSION, strict=True)
    assert build_parser().parse_args(pod["spec"]["containers"][0]["args"]).cpu_budget == 8


def test_the_manifests_in_the_kubernetes_doc_are_valid_for_kubernetes_1_33() -> None:
    text = (REPO_ROOT / "docs" / "kubernetes.md").read_text()
    manifests = [
        doc for block in re.findall(r"```yaml\n(.*?)```", text, re.DOTALL) for doc in yaml.safe_load_all(block) if doc
    ]
    kinds = sorted(doc["kind"] for doc in manifests)
    assert kinds == ["PriorityClass", "Role", "RoleBinding", "ServiceAccount"]
    for doc in manifests:
        assert kubernetes_validate.validate(doc, KUBERNETES_VERSION, strict=True) == KUBERNETES_VERSION


def test_the_kubernetes_launcher_is_this_operator() -> None:
    assert launcher_operator("kubernetes") is KubernetesBatchWorkerOperator


def _status(
    phase: str,
    *,
    reason: str | None = None,
    exit_code: int | None = None,
    container_reason: str | None = None,
    disruption: str | None = None,
) -> k8s.V1Pod:
    state = (
        k8s.V1ContainerState(terminated=k8s.V1ContainerStateTerminated(exit_code=exit_code, reason=container_reason))
        if exit_code is not None
        else k8s.V1ContainerState(running=k8s.V1ContainerStateRunning())
    )
    base = k8s.V1ContainerStatus(name="base", image=IMAGE, image_id="", ready=False, restart_count=0, state=state)
    conditions = [k8s.V1PodCondition(type="DisruptionTarget", status="True", reason=disruption)] if disruption else None
    return k8s.V1Pod(
        metadata=k8s.V1ObjectMeta(name="w3"),
        status=k8s.V1PodStatus(
            phase=phase,
            reason=reason,
            message=reason and f"{reason} by test",
            container_statuses=[base],
            conditions=conditions,
        ),
    )


@pytest.mark.parametrize(
    ("pod", "cause", "error", "message"),
    [
        (_status("Succeeded", exit_code=0, container_reason="Completed"), "completed", None, None),
        (
            _status("Failed", reason="Evicted", exit_code=exit_codes.PREEMPTED),
            "evicted",
            AirflowException,
            r"worker-3 was preempted \(SIGTERM\), shards released; retry continues \(pod w3 evicted, .*Evicted",
        ),
        (
            _status("Failed", exit_code=137, container_reason="OOMKilled"),
            "oom_killed",
            AirflowException,
            r"killed by SIGKILL \(pod w3 oom killed, .*exit code 137 \(SIGKILL\), container OOMKilled\)",
        ),
        (
            _status("Failed", reason="Evicted", exit_code=137, container_reason="Error"),
            "evicted",
            AirflowException,
            r"killed by SIGKILL \(pod w3 evicted, phase Failed, reason Evicted \(Evicted by test\)",
        ),
        (
            _status("Failed", reason="DeadlineExceeded"),
            "deadline_exceeded",
            AirflowException,
            r"pod w3 deadline exceeded, .* before the worker exited; a retry starts a new pod",
        ),
        (
            _status("Running", disruption="PreemptionByScheduler"),
            "preempted",
            AirflowException,
            r"pod w3 preempted, phase Running, disruption PreemptionByScheduler before the worker exited",
        ),
        (
            _status("Failed", reason="Terminated", exit_code=exit_codes.PREEMPTED),
            "preempted",
            AirflowException,
            r"preempted \(SIGTERM\).*reason Terminated",
        ),
        (
            _status("Failed", exit_code=exit_codes.SHARDS_FAILED, container_reason="Error"),
            "failed",
            AirflowFailException,
            r"shards failed for good",
        ),
        (_status("Failed", exit_code=1, container_reason="Error"), "failed", AirflowException, r"exited with code 1"),
        (
            _status("Failed", exit_code=exit_codes.PREEMPTED, container_reason="Error"),
            "preempted",
            AirflowException,
            r"preempted \(SIGTERM\), shards released; retry continues \(pod w3 preempted, .*exit code 75",
        ),
        (None, "deleted", AirflowException, r"pod w3 was deleted before the worker exited \(preempted before it"),
    ],
    ids=[
        "completed",
        "evicted-released",
        "oom",
        "evicted",
        "deadline",
        "preempting",
        "node-shutdown",
        "shards",
        "error",
        "drained",
        "gone",
    ],
)
def test_pod_terminations_are_named_and_mapped_like_local_exit_codes(
    pod: k8s.V1Pod | None, cause: str, error: type[Exception] | None, message: str | None
) -> None:
    termination = pod_termination(pod, "w3", "base")
    assert termination.cause == cause
    assert termination.to_dict()["cause"] == cause
    op = _worker()
    if error is None:
        op._raise_for(termination, {"shards_committed": 2})
        return
    with pytest.raises(error, match=message) as info:
        op._raise_for(termination, {"failed_for_good": ["s1"]})
    assert (error is AirflowFailException) == isinstance(info.value, AirflowFailException)


# -- retries against the test cluster -------------------------------------------------------


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[KubeCluster]:
    with run_kube_cluster(tmp_path_factory.mktemp("cluster")) as running:
        yield running
    assert not running.kubelet.errors, running.kubelet.errors


def _cluster_worker(cluster: KubeCluster, **kwargs: Any) -> KubernetesBatchWorkerOperator:
    return KubernetesBatchWorkerOperator(
        task_id="batch_inference.worker",
        plan_uri=PLAN_URI,
        worker_id="worker-3",
        namespace=cluster.namespace,
        config_file=str(cluster.kubeconfig),
        image=IMAGE,
        get_logs=False,
        **kwargs,
    )


def _earlier_pod(cluster: KubeCluster, context: dict[str, Any], command: list[str]) -> str:
    """A pod as an earlier try of this task created it, running ``command``; its name."""
    request = _cluster_worker(cluster).build_pod_request_obj(context)
    request.spec.containers[0].command, request.spec.containers[0].args = command, []
    cluster.client.create_namespaced_pod(cluster.namespace, request)
    return str(request.metadata.name)


def _wait_for(cluster: KubeCluster, name: str, phase: str | None = None) -> dict[str, Any]:
    """The pod once it reaches ``phase``, or (None) once its worker container has exited."""
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        pod = next((p for p in cluster.live_pods() if p["metadata"]["name"] == name), {})
        status = pod.get("status", {})
        base = next((c for c in status.get("containerStatuses", []) if c["name"] == "base"), {})
        if (status.get("phase") == phase) if phase else "terminated" in base.get("state", {}):
            return pod
        time.sleep(0.1)
    raise AssertionError(f"pod {name} did not reach {phase or 'a worker exit'}")


SLEEP = ["python", "-c", "import time; time.sleep(120)"]


def test_a_retry_deletes_the_earlier_try_still_running_instead_of_running_beside_it(cluster: KubeCluster) -> None:
    first = _context(1, run_id="orphan")
    orphan = _earlier_pod(cluster, first, SLEEP)
    _wait_for(cluster, orphan, "Running")
    op = _cluster_worker(cluster, durable=False)
    retry = _context(2, run_id="orphan")
    created = op.get_or_create_pod(op.build_pod_request_obj(retry), retry)
    live = {p["metadata"]["name"] for p in cluster.live_pods() if p["metadata"]["labels"]["run_id"] == "orphan"}
    assert live == {created.metadata.name} and created.metadata.name != orphan


def test_a_durable_retry_reattaches_to_the_newest_healthy_pod_and_retires_the_others(cluster: KubeCluster) -> None:
    first = _context(1, run_id="durable")
    older = _earlier_pod(cluster, first, SLEEP)
    _wait_for(cluster, older, "Running")
    newer = _earlier_pod(cluster, _context(2, run_id="durable"), SLEEP)
    _wait_for(cluster, newer, "Running")
    op = _cluster_worker(cluster, durable=True)
    retry = _context(3, run_id="durable")
    # The provider alone fails here: two unchecked pods of one task instance.
    attached = op.get_or_create_pod(op.build_pod_request_obj(retry), retry)
    assert attached.metadata.name == newer
    live = {p["metadata"]["name"] for p in cluster.live_pods() if p["metadata"]["labels"]["run_id"] == "durable"}
    assert live == {newer}


def test_a_durable_retry_never_reuses_an_evicted_pod(cluster: KubeCluster) -> None:
    first = _context(1, run_id="evicted")
    evicted = _earlier_pod(cluster, first, SLEEP)
    cluster.kubelet.disrupt(Disruption({"run_id": "evicted"}, "evict", reason="Evicted"))
    _wait_for(cluster, evicted, "Failed")
    op = _cluster_worker(cluster, durable=True, on_finish_action="keep_pod")
    retry = _context(2, run_id="evicted")
    created = op.get_or_create_pod(op.build_pod_request_obj(retry), retry)
    assert created.metadata.name != evicted
    pods = {p["metadata"]["name"]: p for p in cluster.live_pods() if p["metadata"]["labels"]["run_id"] == "evicted"}
    assert pods[evicted]["metadata"]["labels"]["already_checked"] == "True"  # kept, never reattached to


def test_cleanup_puts_why_the_pod_ended_into_the_summary_and_the_error(cluster: KubeCluster) -> None:
    context = _context(1, run_id="sigterm")
    name = _earlier_pod(cluster, context, ["python", "-c", f"raise SystemExit({exit_codes.PREEMPTED})"])
    pod = k8s.V1Pod(metadata=k8s.V1ObjectMeta(name=name, namespace=cluster.namespace))
    _wait_for(cluster, name)  # the XCom sidecar keeps the pod Running until the operator stops it
    summary: dict[str, Any] = {"worker_id": "worker-3", "outcome": "preempted"}
    op = _cluster_worker(cluster)
    with pytest.raises(AirflowException, match=r"worker-3 was preempted \(SIGTERM\), shards released"):
        op.cleanup(pod, op.pod_manager.read_pod(pod), summary, context)
    assert summary["pod_termination"]["cause"] == "preempted"
    assert summary["pod_termination"]["exit_code"] == exit_codes.PREEMPTED
    assert context["ti"].xcom["return_value"]["pod_termination"]["cause"] == "preempted"
    assert name not in {p["metadata"]["name"] for p in cluster.live_pods()}  # on_finish_action=delete_pod


def test_a_pod_gone_before_it_started_is_a_clear_retryable_error(cluster: KubeCluster, tmp_path: pathlib.Path) -> None:
    op = _cluster_worker(cluster, startup_timeout_seconds=20, startup_check_interval_seconds=1)
    cluster.kubelet.disrupt(Disruption({"run_id": "gone"}, "preempt_pending", pending_s=0.5))
    with pytest.raises(
        AirflowException,
        match=r"pod batch-inference-worker-worker-3-\w+ was deleted before the worker exited \(preempted",
    ):
        op.execute(_context(1, run_id="gone"))
