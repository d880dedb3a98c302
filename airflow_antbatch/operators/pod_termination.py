"""Why a worker pod stopped, read off its status, in one line and as a dict for the summary.

Kubernetes spreads the answer over several fields: the pod's ``status.reason`` (Evicted,
DeadlineExceeded, Terminated on a node shutdown), its ``DisruptionTarget`` condition (set
when the scheduler preempts it, the kubelet or the eviction API evicts it, or a taint deletes
it; Kubernetes 1.26+), and the worker container's terminated state (OOMKilled, exit code). A
pod that is gone altogether (404) was deleted or preempted. :func:`pod_termination` folds
them into one ``cause`` that the task log, the worker summary and the retry decision share.
"""

from __future__ import annotations

import dataclasses
import signal
from typing import TYPE_CHECKING, Any

from airflow_antbatch import exit_codes

if TYPE_CHECKING:
    from kubernetes.client import V1ContainerStatus, V1Pod  # type: ignore[import-untyped]

# Pod status reasons and DisruptionTarget reasons -> cause.
_POD_REASONS = {
    "Evicted": "evicted",  # node pressure (kubelet) or the eviction API
    "DeadlineExceeded": "deadline_exceeded",  # active_deadline_seconds ran out
    "Preempting": "preempted",  # the kubelet made room for a critical pod
    "Terminated": "preempted",  # graceful node shutdown (spot / preemptible VM reclaimed)
    "NodeShutdown": "preempted",
    "Shutdown": "preempted",
}
_DISRUPTIONS = {
    "PreemptionByScheduler": "preempted",
    "DeletionByTaintManager": "preempted",
    "TerminationByKubelet": "preempted",
    "EvictionByEvictionAPI": "evicted",
}
_ACTIVE_PHASES = frozenset({"Pending", "Running"})


@dataclasses.dataclass(frozen=True)
class PodTermination:
    """How a worker pod ended (or that it has not); ``cause`` is the one word to act on.

    ``cause`` is one of ``completed``, ``preempted``, ``evicted``, ``oom_killed``,
    ``deadline_exceeded``, ``deleted``, ``failed``, or ``pending`` / ``running`` while it lives.
    """

    pod: str
    cause: str
    phase: str | None = None
    reason: str | None = None
    message: str | None = None
    disruption: str | None = None
    container_reason: str | None = None
    exit_code: int | None = None

    @property
    def worker_code(self) -> int | None:
        """The worker's exit code as a subprocess reports it: minus the signal when killed (128 + n)."""
        code = self.exit_code
        if code is not None and 128 < code < 128 + signal.NSIG:
            return -(code - 128)
        return code

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def describe(self) -> str:
        """One line for the task log and the error message."""
        parts = [f"pod {self.pod} {self.cause.replace('_', ' ')}"]
        if self.phase:
            parts.append(f"phase {self.phase}")
        if self.reason:
            parts.append(f"reason {self.reason}" + (f" ({self.message})" if self.message else ""))
        if self.disruption:
            parts.append(f"disruption {self.disruption}")
        if self.exit_code is not None:
            parts.append(f"worker exit code {self.exit_code}" + _meaning(self.exit_code))
        if self.container_reason and self.container_reason not in ("Error", "Completed"):
            parts.append(f"container {self.container_reason}")
        return ", ".join(parts)


def pod_termination(pod: V1Pod | None, name: str, container: str) -> PodTermination:
    """Read a pod (None: it is gone) and its worker ``container`` into a :class:`PodTermination`."""
    if pod is None:
        return PodTermination(pod=name, cause="deleted")
    status = pod.status
    terminated = _terminated(_container_status(pod, container))
    seen = PodTermination(
        pod=name,
        cause="",
        phase=getattr(status, "phase", None),
        reason=getattr(status, "reason", None),
        message=getattr(status, "message", None),
        disruption=_disruption(pod),
        container_reason=getattr(terminated, "reason", None),
        exit_code=getattr(terminated, "exit_code", None),
    )
    return dataclasses.replace(seen, cause=_cause(seen, deleting=pod.metadata.deletion_timestamp is not None))


def is_reusable(pod: V1Pod, container: str) -> bool:
    """Whether a retry may reattach to this pod: live, not being deleted, not disrupted, worker not done."""
    status = pod.status
    return (
        getattr(status, "phase", None) in _ACTIVE_PHASES
        and pod.metadata.deletion_timestamp is None
        and not getattr(status, "reason", None)
        and _disruption(pod) is None
        and _terminated(_container_status(pod, container)) is None
    )


def is_active(pod: V1Pod) -> bool:
    """Whether the pod may still be running a worker (pending or running, not being deleted)."""
    return getattr(pod.status, "phase", None) in _ACTIVE_PHASES and pod.metadata.deletion_timestamp is None


def _cause(seen: PodTermination, *, deleting: bool) -> str:
    # What the cluster did first; the exit code says how the worker took it.
    if seen.container_reason == "OOMKilled":
        return "oom_killed"
    if seen.reason in _POD_REASONS:
        return _POD_REASONS[seen.reason]
    if seen.disruption in _DISRUPTIONS:
        return _DISRUPTIONS[seen.disruption]
    if seen.exit_code == exit_codes.PREEMPTED:
        return "preempted"  # SIGTERM from somewhere (a drain, a delete): shards released
    if seen.exit_code == exit_codes.OK:
        return "completed"
    if seen.exit_code is None and seen.phase in _ACTIVE_PHASES:
        return "deleted" if deleting else str(seen.phase).lower()
    return "failed"


def _container_status(pod: V1Pod, container: str) -> V1ContainerStatus | None:
    statuses = getattr(pod.status, "container_statuses", None) or []
    return next((s for s in statuses if s.name == container), None)


def _terminated(status: V1ContainerStatus | None) -> Any:
    """The container's terminated state, or the last one when the kubelet restarted it."""
    if status is None:
        return None
    for state in (status.state, status.last_state):
        if state is not None and state.terminated is not None:
            return state.terminated
    return None


def _disruption(pod: V1Pod) -> str | None:
    for condition in getattr(pod.status, "conditions", None) or []:
        if condition.type == "DisruptionTarget" and condition.status == "True":
            return str(condition.reason)
    return None


def _meaning(code: int) -> str:
    if code == exit_codes.PREEMPTED:
        return " (SIGTERM: shards released)"
    if code == exit_codes.SHARDS_FAILED:
        return " (shards failed for good)"
    if 128 < code < 128 + signal.NSIG:
        try:
            return f" ({signal.Signals(code - 128).name})"
        except ValueError:
            return ""
    return ""
