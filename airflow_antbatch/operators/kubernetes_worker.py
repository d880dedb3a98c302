"""The ``kubernetes`` launcher: one mapped task runs one ``antbatch worker`` pod.

Built on the cncf-kubernetes provider's KubernetesPodOperator: every pod option of that
operator is accepted and passed through. What this class adds is the worker's command line,
labels for reattach and cleanup, a CPU budget derived from the container's resources, and
guards against the provider's known failure modes on a preemptible cluster:

- a retry never reattaches to a pod that was evicted, preempted, is being deleted or whose
  worker already exited, and pods of earlier tries of the same worker that are still running
  are deleted before a new one starts (no two pods of one worker side by side);
- a pod deleted before it started or while it ran (404) is a retryable error that says so;
- why the pod stopped (Evicted, Preempted, OOMKilled, DeadlineExceeded, exit code 75 =
  SIGTERM with shards released) is logged and returned in the summary as ``pod_termination``,
  and exit codes map to task errors as for the local launcher (``worker_exit``).
"""

from __future__ import annotations

import contextlib
import hashlib
import math
from typing import TYPE_CHECKING, Any

from kubernetes.client import models as k8s  # type: ignore[import-untyped]
from kubernetes.client.exceptions import ApiException  # type: ignore[import-untyped]
from kubernetes.utils import parse_quantity  # type: ignore[import-untyped]

from airflow_antbatch.operators.kpo_adapter import (
    KubernetesPodOperator,
    PodNotFoundException,
    PodOperatorAdapter,
    generic_api_retry,
    make_safe_label_value,
)
from airflow_antbatch.operators.pod_termination import PodTermination, is_active, is_reusable, pod_termination
from airflow_antbatch.operators.worker_exit import raise_for_exit
from airflow_antbatch.plugins.links import AntBatchJobLink
from airflow_antbatch.spec import credential_keys
from airflow_antbatch.version_compat import AirflowException, AirflowSkipException

if TYPE_CHECKING:
    from collections.abc import Iterator, Mapping, Sequence

    from airflow_antbatch.version_compat import Context

# The worker, on SIGTERM, stops claiming, keeps scoring the shards in hand that commit within the
# grace period less DRAIN_MARGIN_S (15 s), releases the others and writes its summary (NOTE
# [drain] in worker/drain.py). Its heartbeat keeps its leases alive meanwhile.
TERMINATION_GRACE_S = 60
SUMMARY_FILE = "/airflow/xcom/return.json"  # where the provider's XCom sidecar reads the result
LABEL_COMPONENT = "antbatch/component"
LABEL_WORKER = "antbatch/worker-id"
LABEL_PLAN = "antbatch/plan"
ANNOTATION_PLAN_URI = "antbatch/plan-uri"
# Environment variable names whose literal value would put a credential into the pod spec.
_CREDENTIAL_NAME_PARTS = ("SECRET", "TOKEN", "PASSWORD", "PASSWD", "ACCESS_KEY", "API_KEY", "PRIVATE_KEY")


class WorkerPodOperator(PodOperatorAdapter):
    """A KubernetesPodOperator whose pod runs ``antbatch worker``: what both Kubernetes
    launchers (this module's and the pool's) add to the provider's pod surface.

    :param storage_options: fsspec options for the ledger's store, passed as
        ``--storage-options`` (no credentials: they come from ``env_from`` secrets or workload
        identity).
    :param cpu_budget: cores the worker may use; default the container's CPU limit (or request),
        rounded down, at least 1; without either, the worker counts the CPUs it sees.
    :param preprocess_workers: a fixed preprocess pool size (0: in a thread); default elastic.
    :param torch_threads: model intra-op threads; default derived from the CPU budget.
    :param container_resources: ``V1ResourceRequirements`` or the same as a dict.
    :param termination_grace_period: seconds the worker gets on SIGTERM (preemption, a spot
        reclaim, a deleted pod): it finishes the shards in hand that commit within this less 15 s,
        and releases the others.
    """

    def __init__(
        self,
        *,
        storage_options: dict[str, Any] | None = None,
        cpu_budget: int | None = None,
        preprocess_workers: int | None = None,
        torch_threads: int | None = None,
        container_resources: k8s.V1ResourceRequirements | Mapping[str, Any] | None = None,
        cmds: list[str] | None = None,
        termination_grace_period: int | None = TERMINATION_GRACE_S,
        **kwargs: Any,
    ) -> None:
        if isinstance(container_resources, dict):
            container_resources = k8s.V1ResourceRequirements(**container_resources)
        super().__init__(
            cmds=cmds or ["antbatch"],
            container_resources=container_resources,
            termination_grace_period=termination_grace_period,
            **kwargs,
        )
        self.storage_options = storage_options
        self.cpu_budget = cpu_budget
        self.preprocess_workers = preprocess_workers
        self.torch_threads = torch_threads
        refuse_literal_credentials(self.task_id, storage_options, self.env_vars)

    def antbatch_arguments(self, plan_uri: str, worker_id: str, **options: Any) -> list[str]:
        """``antbatch`` arguments running one worker with this operator's sizing (plus ``options``)."""
        from airflow_antbatch.worker.drain import drain_budget
        from airflow_antbatch.worker.local import worker_arguments

        return worker_arguments(
            plan_uri,
            worker_id,
            storage_options=self.storage_options,
            cpu_budget=self.cpu_budget or cpu_budget_of(self.container_resources),
            preprocess_workers=self.preprocess_workers,
            torch_threads=self.torch_threads,
            drain_s=drain_budget(self.termination_grace_period),
            **options,
        )


class KubernetesBatchWorkerOperator(WorkerPodOperator):
    """Runs one elastic worker in a pod until no shard is left for it; returns its summary.

    The summary is what the worker writes to ``/airflow/xcom/return.json`` (shards and rows
    committed, throughput), plus ``pod_termination``: how the pod ended. The ledger stays the
    source of truth.

    :param plan_uri: the plan written by the plan task (mapped from its output).
    :param worker_id: stable id of this worker slot, e.g. ``worker-0`` (mapped likewise).
    :param slot: ``"I/N"``, the share of the plan this worker claims first (mapped likewise);
        None starts from a point hashed from the worker id.

    ``storage_options``, ``cpu_budget``, ``preprocess_workers``, ``torch_threads``,
    ``container_resources`` (e.g. ``{"limits": {"cpu": "8", "nvidia.com/gpu": "1"}}``) and
    ``termination_grace_period``: :class:`WorkerPodOperator`'s. Everything else (image,
    namespace, kubernetes_conn_id, config_file, in_cluster, node_selector, tolerations,
    affinity, priority_class_name, service_account_name, env_vars, env_from, secrets,
    on_finish_action, get_logs, durable, deferrable, ...) is KubernetesPodOperator's, with
    these defaults: ``cmds=["antbatch"]``, ``do_xcom_push=True``, ``log_events_on_failure=True``.
    """

    template_fields: Sequence[str] = (*KubernetesPodOperator.template_fields, "plan_uri", "worker_id", "slot")
    ui_color = "#e8f4fe"
    operator_extra_links = (AntBatchJobLink(),)  # the job's progress page in the Airflow UI

    def __init__(
        self,
        *,
        plan_uri: str,
        worker_id: str,
        slot: str | None = None,
        do_xcom_push: bool = True,
        log_events_on_failure: bool = True,
        **kwargs: Any,
    ) -> None:
        super().__init__(do_xcom_push=do_xcom_push, log_events_on_failure=log_events_on_failure, **kwargs)
        self.plan_uri = plan_uri
        self.worker_id = worker_id
        self.slot = slot

    # -- the pod ---------------------------------------------------------------------------

    def build_pod_request_obj(self, context: Context | None = None, *, dry_run: bool = False) -> k8s.V1Pod:
        """KubernetesPodOperator's pod, running this worker; also the dry-run path."""
        self.arguments = self.worker_arguments()
        self.labels = {**self.labels, **self.worker_labels()}
        self.annotations = {**self.annotations, ANNOTATION_PLAN_URI: self.plan_uri}
        if self.name is None:  # the worker id in the pod name, for kubectl get pods
            self.name = self.safe_pod_name(f"{self.task_id}-{self.worker_id}")
        pod: k8s.V1Pod = super().build_pod_request_obj(context, dry_run=dry_run)
        return pod

    def worker_arguments(self) -> list[str]:
        """``antbatch`` arguments: the worker, its sizing, the summary where the sidecar reads it."""
        return self.antbatch_arguments(
            self.plan_uri,
            self.worker_id,
            slot=self.slot,
            # Without the sidecar's volume there is no /airflow/xcom to write to.
            summary_file=SUMMARY_FILE if self.do_xcom_push else None,
        )

    def worker_labels(self) -> dict[str, str]:
        """Labels that find this job's pods (the provider adds dag_id, run_id, map_index, try_number)."""
        return {
            LABEL_COMPONENT: "worker",
            LABEL_WORKER: make_safe_label_value(self.worker_id),
            LABEL_PLAN: plan_label(self.plan_uri),
        }

    # -- retries: no reuse of a dead pod, no two pods of one worker -------------------------

    def get_or_create_pod(self, pod_request_obj: k8s.V1Pod, context: Context) -> k8s.V1Pod:
        self._retire_earlier_pods(pod_request_obj, context)
        pod: k8s.V1Pod = super().get_or_create_pod(pod_request_obj, context)
        return pod

    def _retire_earlier_pods(self, request: k8s.V1Pod, context: Context) -> None:
        """Leave at most one earlier pod of this task instance, and only a healthy one to reattach to.

        The provider reattaches (``durable``) to any earlier pod not labelled
        ``already_checked``, fails on two of them, and, without ``durable``, starts a new pod
        beside one that still runs (the worker killed with the Airflow task left it behind).
        Here every earlier pod but the one to reattach to is labelled checked, and deleted if
        it still runs, before the provider looks.
        """
        ti_labels = self.ti_pod_labels(context, include_try_number=False)
        selector = ",".join(f"{key}={value}" for key, value in sorted(ti_labels.items()))
        pods = self._list_pods(request.metadata.namespace, f"{selector},!airflow-worker")
        keep = self._pod_to_reattach(pods, request) if self.durable else None
        for pod in pods:
            if pod is keep:
                continue
            labels = pod.metadata.labels or {}
            if labels.get(self.POD_CHECKED_KEY) != "True":
                self.patch_already_checked(pod, reraise=False)
            if is_active(pod):
                self.log.warning(
                    "Deleting pod %s of try %s (%s) of %s: a new pod must not run beside it",
                    pod.metadata.name,
                    labels.get("try_number"),
                    pod_termination(pod, pod.metadata.name, self.base_container_name).describe(),
                    self.worker_id,
                )
                self.pod_manager.delete_pod(pod)  # with the pod's own grace period: it releases its shard
            elif labels.get(self.POD_CHECKED_KEY) != "True":
                self.log.info("Pod %s of an earlier try ended: not reattaching to it", pod.metadata.name)
                self.process_pod_deletion(pod, reraise=False)

    @generic_api_retry  # type: ignore[untyped-decorator]  # the provider's retry on transient API errors
    def _list_pods(self, namespace: str, label_selector: str) -> list[k8s.V1Pod]:
        found = self.client.list_namespaced_pod(namespace=namespace, label_selector=label_selector)
        pods: list[k8s.V1Pod] = found.items
        return pods

    def _pod_to_reattach(self, pods: list[k8s.V1Pod], request: k8s.V1Pod) -> k8s.V1Pod | None:
        """The newest earlier pod running this same worker on this same plan, if it is healthy."""
        wanted = {key: request.metadata.labels[key] for key in (LABEL_WORKER, LABEL_PLAN)}
        candidates = [
            pod
            for pod in pods
            if (pod.metadata.labels or {}).get(self.POD_CHECKED_KEY) != "True"
            and all((pod.metadata.labels or {}).get(key) == value for key, value in wanted.items())
            and is_reusable(pod, self.base_container_name)
        ]
        if not candidates:
            return None
        return max(candidates, key=_age_order)

    # -- how it ended -------------------------------------------------------------------------

    def execute(self, context: Context) -> Any:
        with self._pod_gone_is_retryable():
            return super().execute(context)

    def trigger_reentry(self, context: Context, event: dict[str, Any]) -> Any:
        with self._pod_gone_is_retryable():
            return super().trigger_reentry(context, event)

    def cleanup(
        self,
        pod: k8s.V1Pod,
        remote_pod: k8s.V1Pod,
        xcom_result: dict[str, Any] | None = None,
        context: Context | None = None,
    ) -> None:
        """The provider's cleanup, on a fresh read of the pod, with why it ended in the summary and error."""
        if self.killed or not remote_pod:
            super().cleanup(pod, remote_pod, xcom_result, context)
            return
        fresh = self._read_pod_or_none(remote_pod)
        termination = pod_termination(fresh, remote_pod.metadata.name, self.base_container_name)
        summary: dict[str, Any] = xcom_result if isinstance(xcom_result, dict) else {"worker_id": self.worker_id}
        summary["pod_termination"] = termination.to_dict()
        if termination.cause == "completed":
            self.log.info("%s", termination.describe())
        else:
            self.log.warning("%s", termination.describe())
        if fresh is None:
            if summary.get("outcome") == "finished":
                return  # deleted after it finished: nothing left to clean
            if self.do_xcom_push and context is not None:
                context["ti"].xcom_push(key="return_value", value=summary)
            self._raise_for(termination, summary)
        try:
            super().cleanup(pod, fresh, summary, context)
        except AirflowSkipException:
            raise
        except AirflowException:
            self._raise_for(termination, summary)
            raise  # the worker exited 0 but the pod failed (e.g. a sidecar): the provider's error

    def _raise_for(self, termination: PodTermination, summary: dict[str, Any]) -> None:
        """The worker's exit code as the local launcher maps it, or the pod's fate if it never exited."""
        code = termination.worker_code
        if code is not None:
            raise_for_exit(self.log, self.worker_id, code, summary, detail=termination.describe())
            return
        if termination.cause in ("pending", "running"):
            raise AirflowException(
                f"{self.worker_id}: {termination.describe()} when the task stopped waiting for it "
                "(see the error this one follows); on_finish_action decides whether it is deleted"
            )
        if termination.cause == "deleted":
            raise self._gone(termination.pod)
        raise AirflowException(
            f"{self.worker_id}: {termination.describe()} before the worker exited; "
            "a retry starts a new pod, which skips committed shards"
        )

    def _gone(self, pod_name: str) -> AirflowException:
        return AirflowException(
            f"{self.worker_id}: pod {pod_name} was deleted before the worker exited (preempted before it started, "
            "evicted, drained or deleted by hand); a retry starts a new pod, which skips committed shards"
        )

    def _read_pod_or_none(self, pod: k8s.V1Pod) -> k8s.V1Pod | None:
        try:
            fresh: k8s.V1Pod = self.pod_manager.read_pod(pod)
        except ApiException as exc:
            if exc.status != 404:
                raise
            return None
        return fresh

    @contextlib.contextmanager
    def _pod_gone_is_retryable(self) -> Iterator[None]:
        """A pod not found (preempted before it started, deleted while it ran) as one clear, retryable error."""
        try:
            yield
        except (PodNotFoundException, ApiException) as exc:
            if isinstance(exc, ApiException) and exc.status != 404:
                raise
            pod = self.pod or self.pod_request_obj
            raise self._gone(pod.metadata.name if pod is not None else "(not created)") from exc


def _age_order(pod: k8s.V1Pod) -> tuple[str, int]:
    """Newest last: by creation time (whole seconds), then by the try that created it."""
    try_number = str((pod.metadata.labels or {}).get("try_number", "0"))
    return str(pod.metadata.creation_timestamp or ""), int(try_number) if try_number.isdigit() else 0


def cpu_budget_of(resources: k8s.V1ResourceRequirements | None) -> int | None:
    """Whole cores from the CPU limit, else the request (at least 1); None when neither is set."""
    for amounts in (getattr(resources, "limits", None), getattr(resources, "requests", None)):
        if amounts and amounts.get("cpu") is not None:
            return max(1, int(math.floor(parse_quantity(amounts["cpu"]))))
    return None


def plan_label(plan_uri: str) -> str:
    """A label value naming the job attempt: the plan URI is too long and has '/' and ':'."""
    return hashlib.sha256(plan_uri.encode()).hexdigest()[:16]


def refuse_literal_credentials(task_id: str, storage_options: Mapping[str, Any] | None, env_vars: Any) -> None:
    """A pod spec is readable by anyone who can list pods: no credential goes into it literally."""
    secrets = credential_keys(storage_options or {}) + _literal_credentials(env_vars)
    if secrets:
        raise ValueError(
            f"{task_id}: credentials {secrets} would be written into the pod spec; "
            "reference a Kubernetes secret (env_from, secrets) or use workload identity instead"
        )


def _literal_credentials(env_vars: Any) -> list[str]:
    """Names of env vars that look like credentials and carry a literal value, not a secret reference."""
    items = env_vars.items() if isinstance(env_vars, dict) else ((v.name, v.value) for v in env_vars or ())
    return sorted(
        name for name, value in items if value and any(part in name.upper() for part in _CREDENTIAL_NAME_PARTS)
    )
