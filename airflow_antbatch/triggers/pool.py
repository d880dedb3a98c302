"""``ElasticPoolTrigger``: the elastic pool's reconcile loop, run in the triggerer (or, not
deferred, in the task itself: the operator runs the same coroutine).

Each tick (NOTE [pool controller] in :mod:`airflow_antbatch.pool.controller`):

1. ONE list of the pool's pods by label selector (dag, task, run, component), read as plain
   JSON: at 2,000 pods, deserialising client models would cost seconds per tick;
2. the ledger's status with the workers' idle markers (blocking fsspec I/O, so in a thread),
   through the sensor's :class:`~airflow_antbatch.sensors.ledger.LedgerWatch` (store errors
   ridden out);
3. ``PoolController.tick``; then one create or delete request per pod it names, a bounded
   number at a time; pods of the same task labelled with another plan (an earlier attempt's
   pool) are deleted too: never two pools;
4. the pool status file (``layout.POOL_FILE`` beside the plan) when it changed: what the UI
   page shows, and the controller's small memory, which a restarted triggerer reads back.

A steady tick is therefore one API request. The loop ends by deleting every pod of the pool
when the job is done, when the controller fails it (crash loop, image pull), at the task's
execution deadline, and in :meth:`ElasticPoolTrigger.on_kill` (mark failed/success, clear);
``cleanup`` (every exit, a triggerer shutdown included) deletes nothing, so that the next
triggerer adopts the pods (docs/adr/0005-elastic-pool.md). Whatever goes wrong in ``run()``
ends in an ``error`` event, never in a dead trigger.
"""

from __future__ import annotations

import asyncio
import copy
import dataclasses
import datetime as dt
import json
import secrets
import time
from typing import TYPE_CHECKING, Any

from airflow_antbatch import layout
from airflow_antbatch.pool import PodView, PoolController, PoolSettings, TickPlan, worker_id
from airflow_antbatch.sensors.ledger import JobFailed, LedgerWatch, compact, progress_line
from airflow_antbatch.version_compat import BaseTrigger, TriggerEvent

if TYPE_CHECKING:
    from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Mapping

    from airflow_antbatch.ledger import JobStatus

# Event statuses, the persisted contract with the operator's execute_complete (as the ledger
# trigger's): finished (success), cannot finish (failed), deadline passed (timeout), loop broke (error).
SUCCESS, FAILED, TIMEOUT, ERROR = "success", "failed", "timeout", "error"
LABEL_SLOT = "antbatch/slot"
# Create/delete requests in flight at once: 2,000 replacements must not open 2,000 sockets.
API_CONCURRENCY = 32
# The status file is rewritten when what it shows changes, and at least this often (the page's "updated").
PUBLISH_EVERY_S = 60.0
KEEP_HISTORY = 20  # decisions with their time, for the job page
_NOT_SCHEDULED = frozenset({"Unschedulable", "SchedulingGated"})  # PodScheduled=False reasons: waiting for room


def pod_view(pod: Mapping[str, Any], now: float, base_container: str = "base") -> PodView | None:
    """A listed pod (JSON) as the controller sees it; None for a pod without a slot label."""
    meta, status = pod.get("metadata") or {}, pod.get("status") or {}
    slot = (meta.get("labels") or {}).get(LABEL_SLOT, "")
    if not str(slot).isdigit():
        return None
    conditions = status.get("conditions") or []
    base: dict[str, Any] = next(
        (c for c in status.get("containerStatuses") or [] if c.get("name") == base_container), {}
    )
    state = base.get("state") or {}
    waiting = state.get("waiting") or {}
    terminated = state.get("terminated") or (base.get("lastState") or {}).get("terminated") or {}
    disrupted = any(c.get("type") == "DisruptionTarget" and c.get("status") == "True" for c in conditions)
    ended = terminated.get("reason")
    reason = (
        (ended if ended == "OOMKilled" else None)
        or status.get("reason")
        or ("DisruptionTarget" if disrupted else None)
        or waiting.get("reason")
        or (ended if ended not in (None, "Completed") else None)
    )
    # Unschedulable: no node fits it; SchedulingGated: held back, e.g. by Kueue until quota is free.
    unschedulable = any(
        c.get("type") == "PodScheduled" and c.get("status") == "False" and c.get("reason") in _NOT_SCHEDULED
        for c in conditions
    )
    return PodView(
        name=meta["name"],
        slot=int(slot),
        phase=status.get("phase") or "Pending",
        unschedulable=unschedulable,
        age_s=max(0.0, now - _epoch(meta.get("creationTimestamp"))),
        reason=reason,
        exit_code=terminated.get("exitCode"),
        deleting=meta.get("deletionTimestamp") is not None,
    )


def slot_pod(template: Mapping[str, Any], slot: int, max_workers: int, base_container: str = "base") -> dict[str, Any]:
    """The pool's pod template for one slot: its own name, slot labels and worker arguments
    (the template's ``--worker-id`` value replaced, ``--slot I/N`` added).

    The name gets a random suffix: a replacement is created in the tick that deletes its
    predecessor, which may still be terminating under the old name.
    """
    pod = copy.deepcopy(dict(template))
    meta = pod["metadata"]
    meta["name"] = f"{meta['name'][:45]}-s{slot}-{secrets.token_hex(3)}"
    meta["labels"] = {**meta.get("labels", {}), LABEL_SLOT: str(slot), "antbatch/worker-id": worker_id(slot)}
    base = next(c for c in pod["spec"]["containers"] if c["name"] == base_container)
    args = list(base.get("args") or [])
    at = args.index("--worker-id") + 1
    base["args"] = [*args[:at], worker_id(slot), *args[at + 1 :], "--slot", f"{slot}/{max_workers}"]
    return pod


def selector_of(labels: Mapping[str, str]) -> str:
    return ",".join(f"{key}={value}" for key, value in sorted(labels.items()))


def _epoch(timestamp: str | None) -> float:
    if not timestamp:
        return time.time()
    return dt.datetime.fromisoformat(timestamp.replace("Z", "+00:00")).timestamp()


class ElasticPoolTrigger(BaseTrigger):
    """Steers one pool until the job ends; fires ``success`` (with the compact status),
    ``failed``, ``timeout`` or ``error``, each with a ``message``.

    :param plan_uri: the job attempt's plan.
    :param storage_options: fsspec options of the ledger's store (no credentials: persisted).
    :param namespace: where the pool's pods run.
    :param pod_template: the pod every slot starts from (JSON), without worker id and slot.
    :param selector: labels every pod of this pool carries and that select it (dag, task, run,
        component); the plan label tells this attempt's pods from an earlier attempt's.
    :param plan_label: the ``antbatch/plan`` label value of this attempt's pods.
    :param settings: :class:`~airflow_antbatch.pool.PoolSettings` as a dict.
    :param run_started_at: Unix time the run started (the deadline policy's zero).
    :param try_number: the task try; the controller's memory is restored only within one try.
    :param deadline: Unix time (the task's execution timeout) at which the pool is deleted
        and the trigger fires ``timeout``; None: no limit.
    :param tick_interval: seconds between two ticks.
    :param kubernetes_conn_id, config_dict, in_cluster, cluster_context, connection_extras:
        how to reach the cluster, as the provider's own pod trigger takes them.
    """

    def __init__(
        self,
        *,
        plan_uri: str,
        storage_options: dict[str, Any] | None,
        namespace: str,
        pod_template: dict[str, Any],
        selector: dict[str, str],
        plan_label: str,
        settings: dict[str, Any],
        run_started_at: float,
        try_number: int = 1,
        deadline: float | None = None,
        tick_interval: float = 10.0,
        base_container: str = "base",
        kubernetes_conn_id: str | None = None,
        config_dict: dict[str, Any] | None = None,
        in_cluster: bool | None = None,
        cluster_context: str | None = None,
        connection_extras: dict[str, Any] | None = None,
    ) -> None:
        super().__init__()  # type: ignore[no-untyped-call]  # BaseTrigger is untyped
        self.plan_uri = plan_uri
        self.storage_options = storage_options
        self.namespace = namespace
        self.pod_template = pod_template
        self.selector = selector
        self.plan_label = plan_label
        self.settings = settings
        self.run_started_at = run_started_at
        self.try_number = try_number
        self.deadline = deadline
        self.tick_interval = tick_interval
        self.base_container = base_container
        self.kubernetes_conn_id = kubernetes_conn_id
        self.config_dict = config_dict
        self.in_cluster = in_cluster
        self.cluster_context = cluster_context
        self.connection_extras = connection_extras
        # the loop's ledger reads, idle markers included: an idle worker's pod goes on the next tick
        self.watch = LedgerWatch(plan_uri, storage_options, idle_markers=True)

    def serialize(self) -> tuple[str, dict[str, Any]]:
        return (
            f"{type(self).__module__}.{type(self).__qualname__}",
            {
                "plan_uri": self.plan_uri,
                "storage_options": self.storage_options,
                "namespace": self.namespace,
                "pod_template": self.pod_template,
                "selector": self.selector,
                "plan_label": self.plan_label,
                "settings": self.settings,
                "run_started_at": self.run_started_at,
                "try_number": self.try_number,
                "deadline": self.deadline,
                "tick_interval": self.tick_interval,
                "base_container": self.base_container,
                "kubernetes_conn_id": self.kubernetes_conn_id,
                "config_dict": self.config_dict,
                "in_cluster": self.in_cluster,
                "cluster_context": self.cluster_context,
                "connection_extras": self.connection_extras,
            },
        )

    async def run(self) -> AsyncIterator[TriggerEvent]:
        yield TriggerEvent(await self.steer())  # type: ignore[no-untyped-call]

    async def steer(self) -> dict[str, Any]:
        """The loop to its end, as an event payload; the operator's non-deferred mode calls this."""
        try:
            event: dict[str, Any] = await self._with_api(PoolLoop(self).run)
        except Exception as exc:  # a dead trigger would leave the pool unsteered
            self.log.exception("steering the pool of %s failed", self.plan_uri)
            return _event(ERROR, f"steering the pool of {self.plan_uri} failed: {type(exc).__name__}: {exc}")
        return event

    async def on_kill(self) -> None:
        """The user marked the task failed or success, or cleared it: the pool goes."""
        deleted = await self._with_api(lambda api: PoolLoop(self).delete_all(api))
        self.log.info("task killed: deleted %d pods of the pool", deleted)

    async def cleanup(self) -> None:
        """Every exit, a triggerer shutdown included: pods stay for the next triggerer to adopt."""
        self.watch.stop.set()
        await super().cleanup()

    async def _with_api(self, call: Callable[[PodApi], Awaitable[Any]]) -> Any:
        from kubernetes_asyncio.client import CoreV1Api

        from airflow_antbatch.operators.kpo_adapter import AsyncKubernetesHook

        hook = AsyncKubernetesHook(
            conn_id=self.kubernetes_conn_id,
            in_cluster=self.in_cluster,
            config_dict=self.config_dict,
            cluster_context=self.cluster_context,
            connection_extras=self.connection_extras,
        )
        async with hook.get_conn() as client:
            return await call(PodApi(CoreV1Api(client), self.namespace, selector_of(self.selector)))


class PodApi:
    """The pool's four Kubernetes calls, on raw JSON, each one request."""

    def __init__(self, core: Any, namespace: str, selector: str) -> None:
        self.core = core
        self.namespace = namespace
        self.selector = selector
        self._slots = asyncio.Semaphore(API_CONCURRENCY)

    async def list(self) -> list[dict[str, Any]]:
        response = await self.core.list_namespaced_pod(
            self.namespace, label_selector=self.selector, _preload_content=False
        )
        items: list[dict[str, Any]] = (await _body(response, f"list pods {self.selector}"))["items"]
        return items

    async def create(self, pod: dict[str, Any]) -> None:
        async with self._slots:
            response = await self.core.create_namespaced_pod(self.namespace, pod, _preload_content=False)
            await _body(response, f"create pod {pod['metadata']['name']}")

    async def delete(self, name: str) -> None:
        """With the pod's own grace period: its worker releases its shard on SIGTERM. Gone already is fine."""
        async with self._slots:
            response = await self.core.delete_namespaced_pod(name, self.namespace, _preload_content=False)
            await _body(response, f"delete pod {name}", missing_ok=True)


async def _body(response: Any, what: str, *, missing_ok: bool = False) -> dict[str, Any]:
    """The JSON body of a raw response; an HTTP error as one line naming the call."""
    data = await response.read()
    if missing_ok and response.status == 404:
        return {}
    if not 200 <= response.status <= 299:
        raise RuntimeError(f"{what}: HTTP {response.status}: {data[:300].decode('utf-8', 'replace')}")
    body: dict[str, Any] = json.loads(data)
    return body


@dataclasses.dataclass
class _Published:
    doc: dict[str, Any] | None = None
    at: float = 0.0


class PoolLoop:
    """One run of the reconcile loop for a trigger's pool (see the module doc)."""

    def __init__(self, trigger: ElasticPoolTrigger) -> None:
        self.t = trigger
        self.log = trigger.log
        self.settings = PoolSettings(**trigger.settings)
        self.history: list[list[Any]] = []  # [time, wanted, reason], newest last
        self.created = 0
        self._published = _Published()
        self._store: Any = None

    async def run(self, api: PodApi) -> dict[str, Any]:
        controller = await asyncio.to_thread(self.restore)
        while (ending := await self.tick(api, controller)) is None:
            await asyncio.sleep(self.t.tick_interval)
        return ending

    async def tick(self, api: PodApi, controller: PoolController) -> dict[str, Any] | None:
        """One reconcile tick; the event that ends the loop, or None to go on."""
        pods = await api.list()
        status = await asyncio.to_thread(self.t.watch.read)
        mine, strays = self._split(pods)
        now = time.time()
        views = [v for v in (pod_view(p, now, self.t.base_container) for p in mine) if v is not None]
        plan = controller.tick(views, status, time.monotonic(), now - self.t.run_started_at)
        self._log(plan, views, status, strays)
        await self._apply(api, plan, strays)
        ending = self._ending(plan, status)
        await asyncio.to_thread(self._publish, plan, controller, views, ending)
        if ending is not None and ending["status"] == TIMEOUT:
            await self.delete_all(api)
        return ending

    async def delete_all(self, api: PodApi) -> int:
        names = [p["metadata"]["name"] for p in await api.list() if not p["metadata"].get("deletionTimestamp")]
        await _gather(api.delete(name) for name in names)
        return len(names)

    def _split(self, pods: list[dict[str, Any]]) -> tuple[list[dict[str, Any]], list[str]]:
        """This attempt's pods, and the names of the task's pods from another plan (to delete)."""
        mine, strays = [], []
        for pod in pods:
            meta = pod["metadata"]
            if (meta.get("labels") or {}).get("antbatch/plan") == self.t.plan_label:
                mine.append(pod)
            elif not meta.get("deletionTimestamp"):
                strays.append(meta["name"])
        return mine, strays

    async def _apply(self, api: PodApi, plan: TickPlan, strays: list[str]) -> None:
        deletes = [api.delete(name) for name in (*plan.delete, *strays)]
        creates = [
            api.create(slot_pod(self.t.pod_template, slot, self.settings.max_workers, self.t.base_container))
            for slot in plan.create
        ]
        await _gather([*deletes, *creates])
        self.created += len(creates)

    def _ending(self, plan: TickPlan, status: JobStatus) -> dict[str, Any] | None:
        """The event that ends the loop, once this tick's deletions are sent; None to go on."""
        if plan.fail is not None:
            return _event(FAILED, f"{plan.fail}; every pod of the pool was deleted")
        if plan.done:
            try:
                if self.t.watch.judge(status, None):
                    result = {**compact(status, self.t.plan_uri), "pods_created": self.created}
                    return _event(SUCCESS, f"every shard of {self.t.plan_uri} is committed", result=result)
            except JobFailed as exc:
                return _event(FAILED, str(exc))
            return _event(FAILED, f"the job of {self.t.plan_uri} was stopped: {status.stopped}")
        if self.t.deadline is not None and time.time() >= self.t.deadline:
            return _event(TIMEOUT, f"the task's execution timeout passed: {progress_line(status)}")
        return None

    def _log(self, plan: TickPlan, views: list[PodView], status: JobStatus, strays: list[str]) -> None:
        decision = plan.decision
        if not self.history or self.history[-1][1:] != [decision.wanted, decision.reason]:
            self.history = [*self.history, [time.time(), decision.wanted, decision.reason]][-KEEP_HISTORY:]
            self.log.info("pool: %d pods wanted: %s", decision.wanted, decision.reason)
        if plan.create or plan.delete or strays:
            self.log.info(
                "pool: %d pods listed; creating slots %s; deleting %s%s",
                len(views),
                list(plan.create),
                list(plan.delete),
                f" and {len(strays)} pods of an earlier attempt" if strays else "",
            )
        self.log.info("%s", progress_line(status))

    # -- the status file --------------------------------------------------------------------

    def _status_store(self) -> Any:
        if self._store is None:
            from airflow_antbatch.hooks.storage import reach
            from airflow_antbatch.store import AtomicStore

            url, options = reach(self.t.plan_uri, None, self.t.storage_options)  # through its connection
            self._store = AtomicStore(url.rstrip("/").rsplit("/", 1)[0], options)
        return self._store

    def restore(self) -> PoolController:
        """The controller, with the memory a previous triggerer of this same try published."""
        data = self._status_store().read(layout.POOL_FILE)
        doc = json.loads(data) if data else {}
        if doc.get("try_number") != self.t.try_number or doc.get("selector") != self.t.selector:
            return PoolController(self.settings)
        self.history = list(doc.get("history") or [])
        self.created = int(doc.get("pods_created", 0))
        self.log.info("pool: resuming with the controller state published at %s", doc.get("updated_at"))
        return PoolController.from_dict(self.settings, doc.get("controller") or {})

    def _publish(
        self, plan: TickPlan, controller: PoolController, views: list[PodView], ending: dict[str, Any] | None
    ) -> None:
        snap = plan.snapshot
        doc = {
            "selector": self.t.selector,
            "try_number": self.t.try_number,
            "state": "running" if ending is None else ending["status"],
            "min_workers": self.settings.min_workers,
            "max_workers": self.settings.max_workers,
            "wanted": plan.decision.wanted,
            "reason": plan.decision.reason,
            "pods": len(views),
            "running": snap.running if snap else sum(v.phase == "Running" for v in views),
            "pending": snap.pending if snap else sum(v.phase == "Pending" for v in views),
            "unschedulable": snap.unschedulable if snap else sum(v.unschedulable for v in views),
            "pods_created": self.created,
            "history": self.history,
            "controller": controller.to_dict(),
        }
        now = time.time()
        if doc == self._published.doc and now - self._published.at < PUBLISH_EVERY_S:
            return
        self._status_store().put(layout.POOL_FILE, json.dumps({**doc, "updated_at": now}).encode(), kind="pool")
        self._published = _Published(doc, now)


async def _gather(calls: Iterable[Awaitable[None]]) -> None:
    """Every call, then the first error: one failed request must not leave the others unsent."""
    results = await asyncio.gather(*calls, return_exceptions=True)
    errors = [r for r in results if isinstance(r, BaseException)]
    if errors:
        raise errors[0]


def _event(status: str, message: str, **extra: Any) -> dict[str, Any]:
    """Plain values only: the event is persisted and handed to the operator's execute_complete."""
    return {"status": status, "message": message, **extra}
