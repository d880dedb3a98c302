"""The ``kubernetes-pool`` launcher: one task owns a pool of worker pods and steers it.

``ElasticBatchInferenceOperator`` is a KubernetesPodOperator subclass for its pod-spec surface
(image, resources, tolerations, affinity, secrets, priority class, service account, the
connection and its hook) but it never runs one pod: it builds the worker pod once as a
template, checks it against the Kubernetes schema (an invalid template fails before any pod
exists), and hands the pool to :class:`~airflow_antbatch.triggers.pool.ElasticPoolTrigger`,
which grows, shrinks and replaces pods until the ledger says the job is over. Each pod is the
template with its slot: worker id ``slot-{slot}``, ``--slot {slot}/{max_workers}``, and labels.

Deferred (the default follows ``[operators] default_deferrable``, as every deferrable
operator here) the loop runs in the triggerer and the task holds no worker slot; otherwise
the task runs the same coroutine itself. Where pods go on every exit path, and how a restart,
a crash, a clear and a kill are recovered from labels and the ledger:
docs/adr/0005-elastic-pool.md.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import time
from typing import TYPE_CHECKING, Any

from kubernetes.client import ApiClient  # type: ignore[import-untyped]
from kubernetes.client import models as k8s

from airflow_antbatch.errors import SpecError
from airflow_antbatch.hooks.storage import split_conn_id
from airflow_antbatch.operators.kpo_adapter import KubernetesPodOperator, make_safe_label_value
from airflow_antbatch.operators.kubernetes_worker import LABEL_COMPONENT, LABEL_PLAN, WorkerPodOperator, plan_label
from airflow_antbatch.plugins.links import AntBatchJobLink
from airflow_antbatch.pool import PoolSettings, worker_id
from airflow_antbatch.version_compat import AirflowException, AirflowFailException

if TYPE_CHECKING:
    from collections.abc import Sequence

    from airflow_antbatch.triggers.pool import ElasticPoolTrigger
    from airflow_antbatch.version_compat import Context

COMPONENT = "pool-worker"  # the antbatch/component label of every pool pod
KUEUE_QUEUE_LABEL = "kueue.x-k8s.io/queue-name"
KUBERNETES_VERSION = "1.33"  # the API schema the template is checked against
# Airflow's deferral timeout backs up the trigger's own deadline, which deletes the pool first.
DEFERRAL_GRACE_S = 120.0


class ElasticBatchInferenceOperator(WorkerPodOperator):
    """Runs a job's workers as an elastic pool of pods; returns the job's compact status.

    :param plan_uri: the plan written by the plan task (templated: usually its XCom).
    :param max_workers: pods at most; also the plan's slot count (``--slot I/N``).
    :param min_workers: pods kept while there is work (0: none while nothing is pending).
    :param ramp_factor: while shards wait, the pool grows to ``max(1, pods) x ramp_factor``.
    :param unschedulable_timeout: seconds a pod may stay unschedulable before the pool stops
        adding and deletes the pending extras (the cluster is full: do not hoard its queue).
    :param crash_loop_limit: one slot failing with the same reason this many times in a row,
        without committing a shard, fails the task.
    :param deadline: finish by this long after the run started (a ``timedelta``) or by this
        time of day (a ``datetime.time``, UTC unless it has a tzinfo; the first one after the
        run's start): the pool is sized to remaining rows / (rows/s per worker x time left).
    :param tick_interval: seconds between two reconcile ticks (each one list request).
    :param kueue_queue: the Kueue LocalQueue to admit the pods through (the
        ``kueue.x-k8s.io/queue-name`` label); None: no Kueue.

    ``storage_options``, ``cpu_budget``, ``preprocess_workers``, ``torch_threads``,
    ``container_resources`` and ``termination_grace_period``: the worker's, as
    :class:`~airflow_antbatch.operators.kubernetes_worker.WorkerPodOperator` takes them.
    Everything else is KubernetesPodOperator's (image, namespace, kubernetes_conn_id,
    config_file, in_cluster, node_selector, tolerations, affinity,
    priority_class_name, service_account_name, env_vars, env_from, secrets, labels,
    annotations, deferrable, ...), with ``cmds=["antbatch"]``. Per-pod lifecycle options
    (``on_finish_action``, ``get_logs``, ``do_xcom_push`` of a pod's file) do not apply: the
    pool deletes its pods itself, and the job's state is in the ledger.
    """

    template_fields: Sequence[str] = (*KubernetesPodOperator.template_fields, "plan_uri")
    ui_color = "#dff0fb"
    launches_pool = True  # the task-group builder: one task instead of mapped workers and the sensor
    operator_extra_links = (AntBatchJobLink(),)

    def __init__(
        self,
        *,
        plan_uri: str,
        max_workers: int,
        min_workers: int = 0,
        ramp_factor: float = 2.0,
        unschedulable_timeout: float = 120.0,
        crash_loop_limit: int = 3,
        deadline: dt.timedelta | dt.time | None = None,
        tick_interval: float = 10.0,
        kueue_queue: str | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        self.plan_uri = plan_uri
        self.deadline = deadline
        self.tick_interval = tick_interval
        self.kueue_queue = kueue_queue
        if deadline is not None and not isinstance(deadline, (dt.timedelta, dt.time)):
            raise SpecError(f"{self.task_id}: deadline must be a datetime.timedelta or datetime.time, got {deadline!r}")
        if not tick_interval > 0:
            raise SpecError(f"{self.task_id}: tick_interval must be > 0 seconds, got {tick_interval}")
        # Checked now, so that a wrong bound fails when the DAG is parsed, not at night.
        self.pool_settings = PoolSettings(
            min_workers=min_workers,
            max_workers=max_workers,
            ramp_factor=ramp_factor,
            unschedulable_timeout_s=unschedulable_timeout,
            crash_loop_limit=crash_loop_limit,
        )
        self._selector: dict[str, str] | None = None

    # -- the pod template --------------------------------------------------------------------

    @property
    def worker_plan_uri(self) -> str:
        """The plan URI without the Airflow connection it may name: what pods see."""
        return split_conn_id(self.plan_uri)[0]

    def pool_labels(self, context: Context) -> dict[str, str]:
        """What selects this task instance's pool, across tries, clears and triggerer restarts."""
        return {**self.ti_pod_labels(context, include_try_number=False), LABEL_COMPONENT: COMPONENT}

    def pod_template(self, context: Context) -> dict[str, Any]:
        """The worker pod as JSON, every slot's starting point (slot_pod adds worker id and slot)."""
        # Workers never get the Airflow connection a plan URI may name (s3://conn_id@bucket/...).
        self.arguments = self.antbatch_arguments(self.worker_plan_uri, worker_id(0))  # slot_pod sets each pod's
        self.labels = {
            **self.labels,
            **self.pool_labels(context),
            LABEL_PLAN: plan_label(self.worker_plan_uri),
            **({KUEUE_QUEUE_LABEL: make_safe_label_value(self.kueue_queue)} if self.kueue_queue else {}),
        }
        # The pool reads nothing from a pod's /airflow/xcom: no sidecar (the task's own return
        # value still goes to XCom, as any operator's).
        push, self.do_xcom_push = self.do_xcom_push, False
        try:
            pod: k8s.V1Pod = self.build_pod_request_obj(context, dry_run=True)  # no API client needed
        finally:
            self.do_xcom_push = push
        pod.metadata.name = self.safe_pod_name(self.task_id)  # slot_pod adds the slot and a suffix
        doc: dict[str, Any] = ApiClient().sanitize_for_serialization(pod)
        return {"apiVersion": "v1", "kind": "Pod", **doc}

    def validate_template(self, template: dict[str, Any]) -> None:
        """Refuse a pod the API server would refuse, before any pod is created."""
        import kubernetes_validate  # type: ignore[import-untyped]

        from airflow_antbatch.triggers.pool import slot_pod

        try:
            kubernetes_validate.validate(slot_pod(template, 0, 1), KUBERNETES_VERSION, strict=True)
        except kubernetes_validate.ValidationError as exc:
            path = ".".join(str(p) for p in exc.absolute_path) or "(the pod)"
            raise AirflowFailException(
                f"{self.task_id}: the worker pod is not a valid Kubernetes {KUBERNETES_VERSION} Pod at {path}: "
                f"{exc.message}; no pod was created"
            ) from exc

    # -- running the pool ----------------------------------------------------------------------

    def execute(self, context: Context) -> Any:
        if not self.plan_uri or self.plan_uri == "None":
            raise AirflowFailException(f"{self.task_id}: no plan URI: the plan task did not push one")
        trigger = self.make_trigger(context)
        self.validate_template(trigger.pod_template)
        self.log.info(
            "Steering a pool of %d-%d worker pods (selector %s)",
            self.pool_settings.min_workers,
            self.pool_settings.max_workers,
            trigger.selector,
        )
        if self.deferrable:
            timeout = None
            if trigger.deadline is not None:
                timeout = dt.timedelta(seconds=trigger.deadline - time.time() + DEFERRAL_GRACE_S)
            self.defer(trigger=trigger, method_name="execute_complete", timeout=timeout)
        try:
            event = asyncio.run(trigger.steer())
        except BaseException:  # killed, timed out: the pool must not outlive the task
            self.delete_pool()
            raise
        return self.execute_complete(context, event)

    def make_trigger(self, context: Context) -> ElasticPoolTrigger:
        from airflow_antbatch.triggers.pool import ElasticPoolTrigger

        run_start = _run_start(context)
        deadline_s = _deadline_seconds(self.deadline, run_start)
        settings = PoolSettings(**{**_fields(self.pool_settings), "deadline_s": deadline_s})
        template = self.pod_template(context)
        self._selector = self.pool_labels(context)
        timeout = self.execution_timeout
        return ElasticPoolTrigger(
            plan_uri=self.plan_uri,
            storage_options=self.storage_options,
            namespace=template["metadata"]["namespace"],
            pod_template=template,
            selector=self._selector,
            plan_label=plan_label(self.worker_plan_uri),
            settings=_fields(settings),
            run_started_at=run_start.timestamp(),
            try_number=int(context["ti"].try_number or 1),
            deadline=time.time() + timeout.total_seconds() if timeout is not None else None,
            tick_interval=self.tick_interval,
            base_container=self.base_container_name,
            kubernetes_conn_id=self.kubernetes_conn_id,
            config_dict=self.kube_config_dict(),
            in_cluster=self.in_cluster,
            cluster_context=self.cluster_context,
            # The triggerer reads the connection itself (it has the same secrets backend).
        )

    def execute_complete(self, context: Context, event: dict[str, Any]) -> Any:
        """The loop's end: the job's compact status, or its failure once no pod of the pool is left."""
        from airflow_antbatch.triggers.pool import ERROR, SUCCESS

        message = event.get("message") or f"unexpected pool event {event!r}"
        if event.get("status") == SUCCESS:
            self.log.info("%s", message)
            return event.get("result")
        self._selector = self._selector or self.pool_labels(context)
        self.delete_pool()  # the loop deleted them already, unless it broke: make sure
        if event.get("status") == ERROR:  # the loop broke (API or store down): a retry may do better
            raise AirflowException(message)
        raise AirflowFailException(message)  # crash loop, bad image, failed shards, timeout

    def on_kill(self) -> None:
        """Killed (marked failed, cleared, timed out) while steering in this process: the pool goes."""
        self._killed = True
        self.delete_pool()

    def delete_pool(self) -> None:
        """Delete every pod of this task's pool (one list, one delete per pod); errors are logged."""
        if self._selector is None:
            return
        from kubernetes.client.exceptions import ApiException  # type: ignore[import-untyped]

        from airflow_antbatch.triggers.pool import selector_of

        namespace = self.namespace or self.hook.get_namespace() or "default"
        try:
            pods = self.client.list_namespaced_pod(namespace, label_selector=selector_of(self._selector)).items
            for pod in pods:
                if pod.metadata.deletion_timestamp is None:
                    self.client.delete_namespaced_pod(pod.metadata.name, pod.metadata.namespace)
        except ApiException as exc:
            if exc.status != 404:
                self.log.exception("Could not delete the pool's pods (%s)", self._selector)
        else:
            self.log.info("Deleted %d pods of the pool", len(pods))


def _fields(settings: PoolSettings) -> dict[str, Any]:
    import dataclasses

    return dataclasses.asdict(settings)


def _run_start(context: Context) -> dt.datetime:
    dag_run = context.get("dag_run")
    start = getattr(dag_run, "start_date", None) or getattr(dag_run, "run_after", None)
    return start if isinstance(start, dt.datetime) else dt.datetime.now(dt.UTC)


def _deadline_seconds(deadline: dt.timedelta | dt.time | None, run_start: dt.datetime) -> float | None:
    """Seconds from the run's start to the deadline: a timedelta as is, a time of day the first
    such moment after the start (UTC unless the time carries a tzinfo)."""
    if deadline is None:
        return None
    if isinstance(deadline, dt.timedelta):
        return deadline.total_seconds()
    start = run_start.astimezone(deadline.tzinfo or dt.UTC)
    moment = dt.datetime.combine(start.date(), deadline.replace(tzinfo=None), tzinfo=start.tzinfo)
    if moment <= start:
        moment += dt.timedelta(days=1)
    return (moment - start).total_seconds()
