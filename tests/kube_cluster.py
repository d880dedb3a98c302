"""A Kubernetes API on 127.0.0.1 and a test kubelet, for the pod launcher's end-to-end tests.

No kube-apiserver, kind or k3s runs here. kmock's ``KubernetesEmulator`` is an in-memory API
server that the real ``kubernetes`` client and KubernetesPodOperator talk to over HTTP; this
module adds the parts of a cluster it lacks, each at the network boundary:

- admission: on create, what the API server fills in (uid, creationTimestamp,
  resourceVersion, ``status.phase=Pending``); and label selectors on list (the operator finds
  its pods by labels on reattach and retry);
- a kubelet (:class:`Kubelet`, a thread): it watches pods through the API like any client,
  runs each container's command + args as a local subprocess with the pod's env (volume mount
  paths mapped to per-pod directories), and reports phases and container statuses back;
- what the API server proxies to kubelets: ``exec`` over a websocket (the operator reads the
  XCom file ``/airflow/xcom/return.json`` through the ``airflow-xcom-sidecar`` container and
  stops the sidecar that way) and container logs (``/log``, followed, with timestamps).

The XCom sidecar is the one container not run as a process: it is emulated (running until the
operator's interactive ``sh`` exec tells it to stop), because its stop command
(``kill -2 $(pgrep -u $(id -u) -f 'sh')``) would signal every shell of this user here.

What the cluster does to pods on purpose is described by :class:`Disruption`: eviction
(SIGTERM, SIGKILL after the grace period, phase Failed with a reason), preemption before the
pod starts (deleted while Pending), deletion out from under a running task.

A capacity model, for the elastic pool: the node has ``capacity`` pod slots (None: no limit).
Pods past it stay Pending with ``PodScheduled=False``, reason ``Unschedulable``, and are
scheduled, oldest first, as slots free up or :meth:`Kubelet.set_capacity` grows the node;
shrinking it preempts the newest running pods (SIGTERM, then phase Failed, reason
``Preempted``, condition ``DisruptionTarget``), as does :meth:`Kubelet.preempt` (a storm).
With ``run_processes=False`` a pod's containers are not started: they count as running until
the pod is deleted or preempted (thousands of pods, for request counts). The API server counts
every request by caller and route (:attr:`ApiServer.requests`); the kubelet calls with its own
token, so a test can tell its requests from the operator's.

Known differences from a real cluster: a deleted pod disappears at once (no Terminating
phase; its processes still get SIGTERM and the grace period), merge patches overwrite lists,
there is one node, and no images: every container runs on this machine's Python environment.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import copy
import dataclasses
import datetime as dt
import functools
import itertools
import json
import logging
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

import aiohttp.web
import attrs
import kmock

if TYPE_CHECKING:
    from collections.abc import Callable, Iterator, Mapping

    from kubernetes.client import CoreV1Api  # type: ignore[import-untyped]

SIDECAR = "airflow-xcom-sidecar"
# Bearer tokens: the operators' (the kubeconfig tests hand out) and the test kubelet's own.
CLIENT_TOKEN = "antbatch-test-token"
KUBELET_TOKEN = "antbatch-test-kubelet"
# How often the kubelet lists pods and reports their statuses.
TICK_S = 0.1
# A pod's own terminationGracePeriodSeconds wins; this is the Kubernetes default.
DEFAULT_GRACE_S = 30.0
# Requests kmock keeps for matching: more than can be in flight at once (the pool sends 32 at a time).
_REQUESTS_KEPT = 64
# Paths the API server proxies to the kubelet.
_POD_PROXY = re.compile(r"/api/v1/namespaces/([^/]+)/pods/([^/]+)/(exec|log)")
# What the fast pod store serves: list (all or one namespace), create, get, delete, patch (status too).
_POD_PATHS = re.compile(r"/api/v1(?:/namespaces/([^/]+))?/pods(?:/([^/]+)(/status)?)?")


def _now() -> str:
    return dt.datetime.now(dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def selector_matches(selector: str, labels: Mapping[str, str]) -> bool:
    """Whether ``labels`` satisfy a Kubernetes label selector (=, ==, !=, in, notin, exists, !)."""
    # Split on commas outside parentheses: "a in (x,y),b!=c".
    for term in (t.strip() for t in re.split(r",(?![^(]*\))", selector) if t.strip()):
        if m := re.fullmatch(r"([\w./-]+)\s+(in|notin)\s+\((.*)\)", term):
            key, op, values = m.group(1), m.group(2), {v.strip() for v in m.group(3).split(",")}
            if (labels.get(key) in values) != (op == "in"):
                return False
        elif m := re.fullmatch(r"([\w./-]+)\s*(!=|==|=)\s*([\w./-]*)", term):
            key, op, value = m.groups()
            if (labels.get(key) == value) != (op != "!="):
                return False
        elif term.startswith("!"):
            if term[1:].strip() in labels:
                return False
        elif term not in labels:
            return False
    return True


def route_of(path: str) -> str:
    """A request path with namespace and object names as ``*``: what the request count is keyed by."""
    return re.sub(r"/(namespaces|pods|events|secrets|configmaps)/[^/]+", r"/\1/*", path)


@attrs.define(kw_only=True)
class ApiServer(kmock.KubernetesEmulator):
    """kmock's emulator plus admission defaults, label selectors and the kubelet proxy."""

    kubelet: Kubelet | None = None
    # Every pod as its creator sent it (after admission), deleted ones included, in order.
    created: list[dict[str, Any]] = attrs.field(factory=list)
    # (bearer token, "METHOD /route") -> requests served, e.g. "GET /api/v1/namespaces/*/pods".
    requests: collections.Counter[tuple[str, str]] = attrs.field(factory=collections.Counter)
    # Pods in a plain dict instead of kmock's store (see _serve_pod); None: kmock's.
    fast_pods: dict[tuple[str, str], dict[str, Any]] | None = None
    _versions: Iterator[int] = attrs.field(factory=lambda: itertools.count(1))

    async def __call__(self, raw_request: aiohttp.web.BaseRequest) -> aiohttp.web.StreamResponse:
        # kmock matches each request to its reactions by scanning every request served so far:
        # quadratic, minutes at a few thousand pods. Only the ones in flight need keeping.
        del self._requests[:-_REQUESTS_KEPT]
        token = raw_request.headers.get("Authorization", "").removeprefix("Bearer ")
        self.requests[token, f"{raw_request.method} {route_of(raw_request.path)}"] += 1
        proxied = _POD_PROXY.fullmatch(raw_request.path)
        if proxied and self.kubelet is not None:
            namespace, name, what = proxied.groups()
            if what == "exec":
                return await self.kubelet.serve_exec(raw_request, namespace, name)
            return await self.kubelet.serve_log(raw_request, namespace, name)
        if self.fast_pods is not None and (pods := _POD_PATHS.fullmatch(raw_request.path)):
            return await self._serve_pod(raw_request, *pods.groups())
        return await super().__call__(raw_request)

    async def _serve_pod(
        self, request: aiohttp.web.BaseRequest, namespace: str | None, name: str | None, status: str | None
    ) -> aiohttp.web.Response:
        """Pods without kmock: its reaction matching costs a scan of recent requests per request,
        about 0.1 s each here, minutes for thousands of pods. The same admission and selectors."""
        store = cast("dict[tuple[str, str], dict[str, Any]]", self.fast_pods)
        if name is None and request.method == "GET":
            selector = request.query.get("labelSelector", "")
            items = [
                pod
                for (ns, _), pod in store.items()
                if namespace in (None, ns) and selector_matches(selector, pod["metadata"].get("labels") or {})
            ]
            return aiohttp.web.json_response({"kind": "PodList", "apiVersion": "v1", "metadata": {}, "items": items})
        if name is None and request.method == "POST" and namespace is not None:
            pod = await request.json()
            meta = pod.setdefault("metadata", {})
            meta.setdefault("namespace", namespace)
            if (namespace, meta.get("name")) in store:
                return _status_error(409, "AlreadyExists", f'pods "{meta.get("name")}" already exists')
            meta.update(uid=str(uuid.uuid4()), creationTimestamp=_now(), resourceVersion=str(next(self._versions)))
            pod["status"] = {"phase": "Pending", "qosClass": "BestEffort"}
            store[namespace, meta["name"]] = pod
            self.created.append(copy.deepcopy(pod))
            return aiohttp.web.json_response(pod, status=201)
        pod = store.get((namespace or "", name or ""))
        if pod is None:
            return _status_error(404, "NotFound", f'pods "{name}" not found')
        if request.method == "DELETE":
            del store[namespace or "", name or ""]
        elif request.method == "PATCH":
            _merge(pod, await request.json())
            pod["metadata"]["resourceVersion"] = str(next(self._versions))
        return aiohttp.web.json_response(pod)

    async def _handle(self, request: kmock.Request) -> aiohttp.web.StreamResponse:
        resource = request.resource
        if (
            request.action == kmock.action.CREATE
            and resource is not None
            and resource.plural == "pods"
            and isinstance(request.data, dict)
        ):
            meta = request.data.setdefault("metadata", {})
            meta.setdefault("namespace", request.namespace)
            meta.update(uid=str(uuid.uuid4()), creationTimestamp=_now(), resourceVersion=str(next(self._versions)))
            request.data["status"] = {"phase": "Pending", "qosClass": "BestEffort"}
            self.created.append(copy.deepcopy(request.data))
        return await super()._handle(request)

    async def _serve_list(self, request: kmock.Request) -> kmock.Payload:
        payload = cast("dict[str, Any]", await super()._serve_list(request))
        selector = request.params.get("labelSelector")
        if selector:
            payload["items"] = [
                item for item in payload["items"] if selector_matches(selector, item["metadata"].get("labels") or {})
            ]
        return payload


@dataclasses.dataclass(eq=False)
class ContainerRun:
    """One container of a pod on this node: a local process, or the emulated XCom sidecar."""

    name: str
    image: str
    mounts: dict[str, Path]  # mountPath -> the host directory behind it
    env: dict[str, str]
    proc: subprocess.Popen[bytes] | None = None
    started_at: str = dataclasses.field(default_factory=_now)
    # (epoch seconds, line) of everything it printed, for the /log endpoint.
    lines: list[tuple[float, str]] = dataclasses.field(default_factory=list)
    exit_code: int | None = None
    finished_at: str | None = None

    def finish(self, exit_code: int) -> None:
        if self.exit_code is None:
            self.finished_at = _now()
            self.exit_code = exit_code

    def map_paths(self, text: str) -> str:
        """``text`` with the container's mount paths replaced by the host directories."""
        for mount_path, host_dir in self.mounts.items():
            text = re.sub(rf"{re.escape(mount_path.rstrip('/'))}(?![\w.-])", str(host_dir), text)
        return text

    def status(self) -> dict[str, Any]:
        if self.exit_code is None:
            state: dict[str, Any] = {"running": {"startedAt": self.started_at}}
        else:
            reason = "Completed" if self.exit_code == 0 else "Error"
            state = {
                "terminated": {
                    "exitCode": self.exit_code,
                    "reason": reason,
                    "startedAt": self.started_at,
                    "finishedAt": self.finished_at,
                }
            }
        running = self.exit_code is None
        return {
            "name": self.name,
            "image": self.image,
            "imageID": "",
            "containerID": f"local://{self.proc.pid if self.proc else self.name}",
            "ready": running,
            "started": running,
            "restartCount": 0,
            "state": state,
        }


@dataclasses.dataclass(eq=False)
class PodRun:
    """A pod this kubelet admitted, with its containers and what happened to it."""

    namespace: str
    name: str
    uid: str
    labels: dict[str, str]
    workdir: Path
    grace_s: float
    containers: dict[str, ContainerRun] = dataclasses.field(default_factory=dict)
    started_at: str = dataclasses.field(default_factory=_now)
    admitted_at: float = dataclasses.field(default_factory=time.monotonic)  # when the node took it
    # (reason, message) once the node ends the pod: Evicted, Preempted, ...
    ended_by: tuple[str, str] | None = None
    deleted: bool = False
    reported: dict[str, Any] | None = None

    @property
    def pid(self) -> int | None:
        """The first real container's process id."""
        return next((c.proc.pid for c in self.containers.values() if c.proc is not None), None)

    def base(self) -> ContainerRun:
        return next(c for c in self.containers.values() if c.name != SIDECAR)

    @property
    def occupies(self) -> bool:
        """Holds one of the node's slots: admitted and neither ended, deleted nor finished."""
        return not self.deleted and self.ended_by is None and self.base().exit_code is None

    def status(self) -> dict[str, Any]:
        containers = list(self.containers.values())
        done = all(c.exit_code is not None for c in containers)
        conditions = [{"type": "PodScheduled", "status": "True"}, {"type": "Ready", "status": str(not done)}]
        status: dict[str, Any] = {
            "phase": "Running",
            "hostIP": "127.0.0.1",
            "podIP": "127.0.0.1",
            "startTime": self.started_at,
            "conditions": conditions,
            "containerStatuses": [c.status() for c in containers],
        }
        if done:
            status["phase"] = (
                "Succeeded" if self.ended_by is None and all(c.exit_code == 0 for c in containers) else "Failed"
            )
        if self.ended_by is not None:
            status["reason"], status["message"] = self.ended_by
            conditions.append({"type": "DisruptionTarget", "status": "True", "reason": _DISRUPTION[self.ended_by[0]]})
        return status


# The condition Kubernetes (1.26+) puts on a pod the cluster ends, by the pod's reason.
_DISRUPTION = {"Evicted": "TerminationByKubelet", "Preempted": "PreemptionByScheduler"}
_PREEMPT_MESSAGE = "Preempted in order to admit critical pod"


@dataclasses.dataclass(eq=False)
class Disruption:
    """Something the cluster does to the first pod whose labels include ``labels``, once.

    - ``evict``: once ``when(run)`` holds, SIGTERM, SIGKILL after the pod's grace period, then
      phase Failed with ``reason`` (Evicted or Preempted) and ``message``;
    - ``delete``: once ``when(run)`` holds, the pod is deleted through the API (a drain, an
      operator's mistake); the kubelet then stops its processes as for any deleted pod;
    - ``preempt_pending``: the pod is never started; after ``pending_s`` it is deleted through
      the API while still Pending, as the scheduler does to a pod preempted before it runs.
    """

    labels: Mapping[str, str]
    action: str
    when: Callable[[PodRun], bool] = lambda run: True
    reason: str = "Evicted"
    message: str = "The node was low on resource: memory."
    pending_s: float = 1.0
    fired_on: PodRun | None = None

    def __post_init__(self) -> None:
        if self.action not in ("evict", "delete", "preempt_pending"):
            raise ValueError(f"unknown disruption action {self.action!r}")
        if self.action == "evict" and self.reason not in _DISRUPTION:
            raise ValueError(f"evict reason must be one of {sorted(_DISRUPTION)}, got {self.reason!r}")


class Kubelet:
    """One node: runs the pods it sees through the API as local processes (see the module doc).

    :param api: a client of the API server (this node's credentials).
    :param root: where each pod gets a working directory with its volumes.
    :param image_env: the environment every container starts from (what the image sets: PATH,
        PYTHONPATH, ...); the pod's own env goes on top.
    :param entrypoints: image -> ENTRYPOINT, for containers that give args but no command; a
        container whose image is not listed here and that has no command fails to pull, as
        does one whose image is in ``unpullable``.
    :param capacity: pod slots on the node (None: no limit); see the module doc.
    :param run_processes: False: containers are not started, they run until deleted.
    :param tick_s: how often the node lists pods and reports their statuses.
    """

    def __init__(
        self,
        api: CoreV1Api,
        root: Path,
        *,
        image_env: Mapping[str, str],
        entrypoints: Mapping[str, list[str]] | None = None,
        unpullable: set[str] | frozenset[str] = frozenset(),
        capacity: int | None = None,
        run_processes: bool = True,
        tick_s: float = TICK_S,
    ) -> None:
        self.api = api
        self.root = root
        self.image_env = dict(image_env)
        self.entrypoints = dict(entrypoints or {})
        self.unpullable = frozenset(unpullable)
        self.capacity = capacity
        self.run_processes = run_processes
        self.tick_s = tick_s
        self._unschedulable: set[str] = set()  # uids reported Unschedulable
        self.runs: list[PodRun] = []
        self.disruptions: list[Disruption] = []
        self.errors: list[str] = []
        self._held: dict[str, tuple[float, Disruption]] = {}  # uid -> (since, disruption)
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="test-kubelet", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        """Stop watching, and kill whatever still runs (no grace: the test is over)."""
        self._stop.set()
        self._thread.join(timeout=10)
        for run in self.runs:
            for container in run.containers.values():
                if container.proc is not None and container.proc.poll() is None:
                    _signal_group(container.proc, signal.SIGKILL)
                    container.proc.wait(timeout=10)

    def disrupt(self, disruption: Disruption) -> Disruption:
        with self._lock:
            self.disruptions.append(disruption)
        return disruption

    def set_capacity(self, capacity: int | None) -> None:
        """Resize the node: the next tick preempts the newest pods past it, or schedules waiting ones."""
        with self._lock:
            self.capacity = capacity

    def preempt(self, count: int, *, reason: str = "Preempted") -> list[PodRun]:
        """End the ``count`` newest running pods at once (a preemption storm); capacity stays."""
        with self._lock:
            victims = [run for run in self.runs if run.occupies][-count:] if count > 0 else []
            for run in victims:
                run.ended_by = (reason, _PREEMPT_MESSAGE)
        for run in victims:
            threading.Thread(target=self._terminate, args=(run,), daemon=True).start()
        return victims

    def find(self, namespace: str, name: str) -> PodRun | None:
        """The live pod run of that name (the newest, should a name come back)."""
        with self._lock:
            return next(
                (r for r in reversed(self.runs) if (r.namespace, r.name) == (namespace, name) and not r.deleted), None
            )

    # The loop -------------------------------------------------------------------------------

    def _loop(self) -> None:
        while not self._stop.wait(self.tick_s):
            try:
                pods = json.loads(self.api.list_pod_for_all_namespaces(_preload_content=False).data)["items"]
                self._tick(pods)
            except Exception as exc:  # a test kubelet must never die silently: keep the error
                self.errors.append(f"{type(exc).__name__}: {exc}")
                if len(self.errors) > 100:
                    return

    def _tick(self, pods: list[dict[str, Any]]) -> None:
        live = {pod["metadata"]["uid"]: pod for pod in pods}
        known = {run.uid: run for run in self.runs}
        self._shrink_to_capacity()
        free = None if self.capacity is None else self.capacity - sum(run.occupies for run in self.runs)
        for uid, pod in live.items():
            run = known.get(uid)
            if run is None:
                if (pod.get("status") or {}).get("phase") != "Pending":
                    continue
                if free is not None and free <= 0:
                    self._report_unschedulable(pod)
                    continue
                self._admit(pod)
                free = None if free is None else free - 1
                continue
            if run.deleted:  # held Pending, or never started
                continue
            self._apply_disruptions(run)
            status = run.status()
            if status != run.reported:
                with contextlib.suppress(Exception):  # gone meanwhile: the next tick sees it
                    self.api.patch_namespaced_pod_status(run.name, run.namespace, {"status": status})
                    run.reported = status
        for uid, run in known.items():
            if uid not in live and not run.deleted:
                run.deleted = True  # deleted through the API: stop it as a kubelet does
                threading.Thread(target=self._terminate, args=(run,), daemon=True).start()
        for uid, (since, disruption) in list(self._held.items()):
            if uid not in live:
                del self._held[uid]
            elif time.monotonic() - since >= disruption.pending_s:
                meta = live[uid]["metadata"]
                with contextlib.suppress(Exception):
                    self.api.delete_namespaced_pod(meta["name"], meta["namespace"])

    def _shrink_to_capacity(self) -> None:
        with self._lock:
            running = [run for run in self.runs if run.occupies]
            over = 0 if self.capacity is None else len(running) - self.capacity
        if over > 0:
            self.preempt(over)

    def _report_unschedulable(self, pod: dict[str, Any]) -> None:
        meta = pod["metadata"]
        if meta["uid"] in self._unschedulable:
            return
        condition = {
            "type": "PodScheduled",
            "status": "False",
            "reason": "Unschedulable",
            "message": f"0/1 nodes are available: 1 node is full ({self.capacity} pod slots).",
            "lastTransitionTime": _now(),
        }
        with contextlib.suppress(Exception):  # gone meanwhile
            self.api.patch_namespaced_pod_status(
                meta["name"], meta["namespace"], {"status": {"phase": "Pending", "conditions": [condition]}}
            )
            self._unschedulable.add(meta["uid"])

    def _disruption_for(self, labels: Mapping[str, str], actions: tuple[str, ...]) -> Disruption | None:
        with self._lock:
            for d in self.disruptions:
                if d.fired_on is None and d.action in actions and all(labels.get(k) == v for k, v in d.labels.items()):
                    return d
        return None

    def _apply_disruptions(self, run: PodRun) -> None:
        if run.deleted or run.ended_by is not None or run.base().exit_code is not None:
            return
        disruption = self._disruption_for(run.labels, ("evict", "delete"))
        if disruption is None or not disruption.when(run):
            return
        disruption.fired_on = run
        if disruption.action == "evict":
            run.ended_by = (disruption.reason, disruption.message)
            threading.Thread(target=self._terminate, args=(run,), daemon=True).start()
        else:
            self.api.delete_namespaced_pod(run.name, run.namespace)

    # Starting and stopping pods ---------------------------------------------------------------

    def _admit(self, pod: dict[str, Any]) -> None:
        meta, spec = pod["metadata"], pod["spec"]
        labels = dict(meta.get("labels") or {})
        held = self._disruption_for(labels, ("preempt_pending",))
        if held is not None:
            held.fired_on = PodRun(meta["namespace"], meta["name"], meta["uid"], labels, self.root, 0.0)
            self._held[meta["uid"]] = (time.monotonic(), held)
            # Not started, and never will be: tell the API so (the kubelet will not see it again).
            self.runs.append(held.fired_on)
            held.fired_on.deleted = True
            return
        workdir = self.root / f"{meta['namespace']}-{meta['name']}-{meta['uid'][:8]}"
        volumes = {v["name"]: workdir / "volumes" / v["name"] for v in spec.get("volumes") or []}
        for path in [workdir, *volumes.values()]:
            path.mkdir(parents=True, exist_ok=True)
        run = PodRun(
            meta["namespace"],
            meta["name"],
            meta["uid"],
            labels,
            workdir,
            float(spec.get("terminationGracePeriodSeconds", DEFAULT_GRACE_S)),
        )
        failure = None
        for c in spec["containers"]:
            mounts = {m["mountPath"]: volumes[m["name"]] for m in c.get("volumeMounts") or []}
            container = ContainerRun(c["name"], c.get("image", ""), mounts, self._container_env(pod, c))
            run.containers[c["name"]] = container
            if c["name"] != SIDECAR and self.run_processes:
                failure = failure or self._start(container, c, workdir)
            elif c["name"] != SIDECAR and c.get("image") in self.unpullable:
                failure = failure or ("ErrImagePull", f"image {c['image']!r} cannot be pulled")
        with self._lock:
            self.runs.append(run)
        if failure is not None:
            self._report_waiting(run, failure)

    def _container_env(self, pod: dict[str, Any], container: dict[str, Any]) -> dict[str, str]:
        env = dict(self.image_env)
        namespace = pod["metadata"]["namespace"]
        for source in container.get("envFrom") or []:
            for kind, read in (("secretRef", self._secret), ("configMapRef", self._config_map)):
                if kind in source:
                    prefix = source.get("prefix", "")
                    env.update({prefix + k: v for k, v in read(namespace, source[kind]["name"]).items()})
        for var in container.get("env") or []:
            if "value" in var:
                env[var["name"]] = str(var["value"])
            elif ref := (var.get("valueFrom") or {}).get("secretKeyRef"):
                env[var["name"]] = self._secret(namespace, ref["name"])[ref["key"]]
            elif ref := (var.get("valueFrom") or {}).get("configMapKeyRef"):
                env[var["name"]] = self._config_map(namespace, ref["name"])[ref["key"]]
            elif ref := (var.get("valueFrom") or {}).get("fieldRef"):
                value: Any = pod
                for part in ref["fieldPath"].split("."):
                    value = value.get(part) if isinstance(value, dict) else None
                env[var["name"]] = "" if value is None else str(value)
        return env

    def _secret(self, namespace: str, name: str) -> dict[str, str]:
        import base64

        secret = json.loads(self.api.read_namespaced_secret(name, namespace, _preload_content=False).data)
        data = {k: base64.b64decode(v).decode() for k, v in (secret.get("data") or {}).items()}
        return {**data, **(secret.get("stringData") or {})}

    def _config_map(self, namespace: str, name: str) -> dict[str, str]:
        config_map = json.loads(self.api.read_namespaced_config_map(name, namespace, _preload_content=False).data)
        return dict(config_map.get("data") or {})

    def _start(self, container: ContainerRun, spec: dict[str, Any], workdir: Path) -> tuple[str, str] | None:
        """Start the container's process; (reason, message) if it cannot start."""
        if container.image in self.unpullable:
            return "ErrImagePull", f"image {container.image!r} cannot be pulled"
        argv = list(spec.get("command") or self.entrypoints.get(container.image, []))
        if not argv:
            return "ErrImagePull", f"image {container.image!r} is not known to the test kubelet and gives no command"
        argv = [container.map_paths(a) for a in argv + list(spec.get("args") or [])]
        executable = shutil.which(argv[0], path=container.env.get("PATH"))
        if executable is None:
            return "RunContainerError", f"executable {argv[0]!r} not found in $PATH"
        container.proc = subprocess.Popen(
            [executable, *argv[1:]],
            env={k: container.map_paths(v) for k, v in container.env.items()},
            cwd=spec.get("workingDir") or workdir,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            # Its own process group, as a container has its own PID namespace: signals reach
            # the worker and whatever it started.
            start_new_session=True,
        )
        threading.Thread(target=self._collect, args=(container,), daemon=True).start()
        return None

    def _report_waiting(self, run: PodRun, failure: tuple[str, str]) -> None:
        reason, message = failure
        statuses = [
            {
                **c.status(),
                "ready": False,
                "started": False,
                "state": {"waiting": {"reason": reason, "message": message}},
            }
            for c in run.containers.values()
        ]
        run.deleted = True  # never runs: nothing more to report
        with contextlib.suppress(Exception):
            self.api.patch_namespaced_pod_status(
                run.name, run.namespace, {"status": {"phase": "Pending", "containerStatuses": statuses}}
            )

    @staticmethod
    def _collect(container: ContainerRun) -> None:
        proc = container.proc
        assert proc is not None and proc.stdout is not None
        for raw in proc.stdout:
            container.lines.append((time.time(), raw.decode("utf-8", "replace").rstrip("\n")))
        code = proc.wait()
        proc.stdout.close()
        container.finish(code if code >= 0 else 128 - code)

    def _terminate(self, run: PodRun) -> None:
        """SIGTERM every container, SIGKILL after the pod's grace period (a kubelet's stop)."""
        procs = [c.proc for c in run.containers.values() if c.proc is not None and c.proc.poll() is None]
        for proc in procs:
            _signal_group(proc, signal.SIGTERM)
        # The emulated sidecar is a shell in a sleep loop: SIGTERM ends it at once (143), so
        # the XCom of a stopped pod is lost, as on a cluster.
        for container in run.containers.values():
            if container.proc is None:
                container.finish(128 + signal.SIGTERM)
        deadline = time.monotonic() + run.grace_s
        for proc in procs:
            try:
                proc.wait(timeout=max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                _signal_group(proc, signal.SIGKILL)
                proc.wait(timeout=10)
        # _collect records each exit once the output is drained; wait for it.
        for container in run.containers.values():
            for _ in range(100):
                if container.exit_code is not None:
                    break
                time.sleep(0.05)

    # What the API server proxies to the kubelet -----------------------------------------------

    async def serve_log(
        self, request: aiohttp.web.BaseRequest, namespace: str, name: str
    ) -> aiohttp.web.StreamResponse:
        run = self.find(namespace, name)
        query = request.query
        if run is None:
            return _status_error(404, "NotFound", f'pods "{name}" not found')
        container = run.containers.get(query.get("container", "")) or run.base()
        follow = query.get("follow") in ("true", "True")
        timestamps = query.get("timestamps") in ("true", "True")
        since = time.time() - float(query["sinceSeconds"]) if "sinceSeconds" in query else 0.0
        response = aiohttp.web.StreamResponse(headers={"Content-Type": "text/plain"})
        await response.prepare(request)
        sent = 0
        while True:
            finished = container.exit_code is not None
            lines = container.lines[sent:]
            sent += len(lines)
            for ts, line in lines:
                if ts >= since:
                    stamp = (
                        dt.datetime.fromtimestamp(ts, dt.UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ ") if timestamps else ""
                    )
                    await response.write(f"{stamp}{line}\n".encode())
            if not follow or (finished and not lines) or self._stop.is_set():
                break
            await asyncio.sleep(TICK_S)
        await response.write_eof()
        return response

    async def serve_exec(
        self, request: aiohttp.web.BaseRequest, namespace: str, name: str
    ) -> aiohttp.web.StreamResponse:
        """``kubectl exec`` over the v4 channel protocol: 0 stdin, 1 stdout, 2 stderr, 3 status."""
        ws = aiohttp.web.WebSocketResponse(protocols=("v4.channel.k8s.io",))
        await ws.prepare(request)
        run = self.find(namespace, name)
        command = request.query.getall("command", [])
        container = run.containers.get(request.query.get("container", "")) if run else None
        if container is None or container.exit_code is not None:
            await _exec_status(ws, 1, f"container not found or not running in pod {namespace}/{name}")
        elif len(command) >= 3 and command[1] == "-c":
            argv = [command[0], "-c", container.map_paths(command[2])]
            result = await asyncio.to_thread(subprocess.run, argv, env=container.env, capture_output=True, timeout=30)
            for channel, data in ((1, result.stdout), (2, result.stderr)):
                if data:
                    await ws.send_bytes(bytes([channel]) + data)
            await _exec_status(ws, result.returncode)
        elif container.proc is None and command == ["/bin/sh"]:
            # The operator's "stop the sidecar" shell: whatever it types, the sidecar's trap on
            # SIGINT makes it exit 0. Only the emulated sidecar is stopped this way.
            with contextlib.suppress(TimeoutError):
                await ws.receive(timeout=30)
            container.finish(0)
            await _exec_status(ws, 0)
        else:
            await _exec_status(ws, 126, f"the test kubelet cannot exec {command!r} into {container.name}")
        await ws.close()
        return ws


async def _exec_status(ws: aiohttp.web.WebSocketResponse, code: int, message: str = "") -> None:
    if code == 0:
        status: dict[str, Any] = {"metadata": {}, "status": "Success"}
    else:
        status = {
            "metadata": {},
            "status": "Failure",
            "message": message or f"command terminated with non-zero exit code: {code}",
            "reason": "NonZeroExitCode",
            "details": {"causes": [{"reason": "ExitCode", "message": str(code)}]},
        }
    await ws.send_bytes(b"\x03" + json.dumps(status).encode())


def _merge(target: dict[str, Any], patch: Mapping[str, Any]) -> None:
    """A JSON merge patch (RFC 7386): objects merge, anything else (lists too) replaces, null removes."""
    for key, value in patch.items():
        if value is None:
            target.pop(key, None)
        elif isinstance(value, dict) and isinstance(target.get(key), dict):
            _merge(target[key], value)
        else:
            target[key] = value


def _status_error(code: int, reason: str, message: str) -> aiohttp.web.Response:
    body = {
        "apiVersion": "v1",
        "kind": "Status",
        "status": "Failure",
        "code": code,
        "reason": reason,
        "message": message,
    }
    return aiohttp.web.json_response(body, status=code)


def _signal_group(proc: subprocess.Popen[bytes], sig: int) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, sig)


@dataclasses.dataclass(frozen=True)
class KubeCluster:
    """A running API server and node, and how a client reaches them."""

    url: str
    kubeconfig: Path
    namespace: str
    api: ApiServer
    kubelet: Kubelet
    client: CoreV1Api

    def created_pods(self) -> list[dict[str, Any]]:
        """Every pod created so far, as sent (after admission), in order; deleted ones too."""
        return list(self.api.created)

    def client_requests(self) -> collections.Counter[str]:
        """Requests served so far to clients other than the kubelet, by ``"METHOD /route"``."""
        counts: collections.Counter[str] = collections.Counter()
        for (token, route), n in list(self.api.requests.items()):
            if token != KUBELET_TOKEN:
                counts[route] += n
        return counts

    def live_pods(self) -> list[dict[str, Any]]:
        data = self.client.list_namespaced_pod(self.namespace, _preload_content=False).data
        return cast("list[dict[str, Any]]", json.loads(data)["items"])


@functools.cache
def pod_validator(version: str = "1.33") -> Callable[[dict[str, Any]], None]:
    """A strict check of a Pod against the Kubernetes ``version`` OpenAPI schema (kubernetes-validate's
    schemas), built once: ``kubernetes_validate.validate`` reloads them per call (30 ms a pod)."""
    import jsonschema
    import kubernetes_validate  # type: ignore[import-untyped]
    from kubernetes_validate.utils import schema_contents  # type: ignore[import-untyped]
    from referencing import Registry, Resource

    folder = f"kubernetes-json-schema/v{version}.0-local-strict"
    schema = schema_contents(f"{folder}/pod-v1.json", version)
    definitions = schema_contents(f"{folder}/_definitions.json", version)
    registry = Resource.from_contents(definitions) @ (Resource.from_contents(schema) @ Registry())
    validator = jsonschema.validators.Draft202012Validator(schema, registry=registry)

    def validate(pod: dict[str, Any]) -> None:
        try:
            validator.validate(pod)
        except jsonschema.ValidationError as exc:
            raise kubernetes_validate.ValidationError(exc, version=version) from exc

    return validate


def node_env() -> dict[str, str]:
    """The environment of this test node's "image": this interpreter's bin first on PATH (so
    ``antbatch`` resolves to this checkout's console script), the PYTHONPATH and thread limits
    the tests set, and nothing of the Airflow process (no AIRFLOW_*, no credentials)."""
    path = os.pathsep.join([str(Path(sys.executable).parent), "/usr/local/bin", "/usr/bin", "/bin"])
    env = {"PATH": path, "HOME": os.environ.get("HOME", "/tmp"), "LANG": "C.UTF-8"}
    for name in ("PYTHONPATH", "OMP_NUM_THREADS", "TMPDIR"):
        if name in os.environ:
            env[name] = os.environ[name]
    return env


def write_kubeconfig(path: Path, url: str, namespace: str, *, token: str = CLIENT_TOKEN) -> Path:
    """A kubeconfig for the emulator (JSON is valid YAML), as an operator's ``config_file``."""
    config = {
        "apiVersion": "v1",
        "kind": "Config",
        "clusters": [{"name": "loopback", "cluster": {"server": url}}],
        "users": [{"name": "antbatch-test", "user": {"token": token}}],
        "contexts": [
            {"name": "loopback", "context": {"cluster": "loopback", "user": "antbatch-test", "namespace": namespace}}
        ],
        "current-context": "loopback",
    }
    path.write_text(json.dumps(config))
    return path


@contextlib.contextmanager
def run_kube_cluster(
    root: Path,
    *,
    namespace: str = "antbatch",
    image_env: Mapping[str, str] | None = None,
    entrypoints: Mapping[str, list[str]] | None = None,
    unpullable: set[str] | frozenset[str] = frozenset(),
    capacity: int | None = None,
    run_processes: bool = True,
    kubelet_tick_s: float = TICK_S,
    fast_pods: bool = False,
) -> Iterator[KubeCluster]:
    """The API server on 127.0.0.1 (a random port, its own event loop thread) and one kubelet
    (see :class:`Kubelet` for the node's options); ``fast_pods`` keeps pods out of kmock's
    store, for thousands of pods (the operator's own tests use kmock's)."""
    from kubernetes import config as kube_config  # type: ignore[import-untyped]
    from kubernetes.client import CoreV1Api

    # aiohttp logs every request at INFO: hundreds of lines per pod, in every task log.
    logging.getLogger("aiohttp.access").setLevel(logging.WARNING)
    api = ApiServer(fast_pods={} if fast_pods else None)
    for resource, kind in (("pods", "Pod"), ("events", "Event"), ("secrets", "Secret"), ("configmaps", "ConfigMap")):
        api.resources[f"v1/{resource}"] = kmock.ResourceInfo(
            kind=kind, namespaced=True, verbs={"list", "get", "create"}
        )
    server = kmock.Server(api, host="127.0.0.1")
    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, name="kube-api-server", daemon=True)
    thread.start()

    async def start() -> None:
        await api.__aenter__()
        await server.__aenter__()

    async def stop() -> None:
        await server.__aexit__(None, None, None)
        await api.__aexit__(None, None, None)

    asyncio.run_coroutine_threadsafe(start(), loop).result(timeout=30)
    try:
        url = f"http://127.0.0.1:{server.port}"
        kubeconfig = write_kubeconfig(root / "kubeconfig", url, namespace)
        client = CoreV1Api(kube_config.new_client_from_config(config_file=str(kubeconfig)))
        node_config = write_kubeconfig(root / "kubeconfig-node", url, namespace, token=KUBELET_TOKEN)
        kubelet = Kubelet(
            CoreV1Api(kube_config.new_client_from_config(config_file=str(node_config))),
            root / "node",
            image_env=node_env() if image_env is None else image_env,
            entrypoints=entrypoints,
            unpullable=unpullable,
            capacity=capacity,
            run_processes=run_processes,
            tick_s=kubelet_tick_s,
        )
        api.kubelet = kubelet
        kubelet.start()
        try:
            yield KubeCluster(url, kubeconfig, namespace, api, kubelet, client)
        finally:
            kubelet.stop()
            for api_client in (client.api_client, kubelet.api.api_client):
                api_client.close()  # its thread pool; the connection pool needs its own clear()
                api_client.rest_client.pool_manager.clear()
    finally:
        asyncio.run_coroutine_threadsafe(stop(), loop).result(timeout=30)
        loop.call_soon_threadsafe(loop.stop)
        thread.join(timeout=10)
        loop.close()
