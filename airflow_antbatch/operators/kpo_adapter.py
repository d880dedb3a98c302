"""The one place that touches the cncf-kubernetes provider, its KubernetesPodOperator above all.

The pod launcher overrides and calls KubernetesPodOperator members that are not a public API:
private ones (``_set_name``, ``_get_ti_pod_labels``, ``_killed``) and internals whose shape a
provider release may change (``cleanup``'s arguments, ``patch_already_checked``,
``process_pod_deletion``, ``POD_CHECKED_KEY``, the pod manager's ``read_pod``/``delete_pod``).
:class:`PodOperatorAdapter` wraps the private ones under names of our own, and
:data:`CONTRACT` lists every such member with the parameters we call it with, so that
tests/airflow/test_kpo_adapter.py fails on a provider upgrade that breaks one, instead of a
worker pod failing at night. pyproject caps the provider below its next major release.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from airflow.providers.cncf.kubernetes.hooks.kubernetes import AsyncKubernetesHook
from airflow.providers.cncf.kubernetes.kubernetes_helper_functions import generic_api_retry
from airflow.providers.cncf.kubernetes.operators.pod import KubernetesPodOperator
from airflow.providers.cncf.kubernetes.pod_generator import make_safe_label_value
from airflow.providers.cncf.kubernetes.utils.pod_manager import PodManager, PodNotFoundException

if TYPE_CHECKING:
    from airflow_antbatch.version_compat import Context

# (owner, member) -> the parameter names (after self) our code passes, in order; None for an
# attribute or constant. Checked against the installed provider by the contract test.
CONTRACT: dict[tuple[type, str], tuple[str, ...] | None] = {
    (KubernetesPodOperator, "_set_name"): ("name",),
    (KubernetesPodOperator, "_get_ti_pod_labels"): ("context", "include_try_number"),
    (KubernetesPodOperator, "_killed"): None,  # set by on_kill; makes cleanup a no-op
    (KubernetesPodOperator, "POD_CHECKED_KEY"): None,
    (KubernetesPodOperator, "patch_already_checked"): ("pod", "reraise"),
    (KubernetesPodOperator, "process_pod_deletion"): ("pod", "reraise"),
    (KubernetesPodOperator, "cleanup"): ("pod", "remote_pod", "xcom_result", "context"),
    (KubernetesPodOperator, "trigger_reentry"): ("context", "event"),
    (KubernetesPodOperator, "get_or_create_pod"): ("pod_request_obj", "context"),
    (KubernetesPodOperator, "build_pod_request_obj"): ("context", "dry_run"),
    (KubernetesPodOperator, "convert_config_file_to_dict"): (),
    (KubernetesPodOperator, "_config_dict"): None,  # set by convert_config_file_to_dict
    (PodManager, "read_pod"): ("pod",),
    (PodManager, "delete_pod"): ("pod",),
}


class PodOperatorAdapter(KubernetesPodOperator):
    """KubernetesPodOperator with its private members behind names of our own."""

    def safe_pod_name(self, name: str) -> str | None:
        """The provider's pod-name cleanup (lower case, ``[a-z0-9-]``, validated length)."""
        result: str | None = self._set_name(name)
        return result

    def ti_pod_labels(self, context: Context, *, include_try_number: bool) -> dict[str, str]:
        """The labels the provider puts on a task instance's pods (dag, task, run, map index)."""
        labels: dict[str, str] = self._get_ti_pod_labels(context, include_try_number=include_try_number)
        return labels

    def kube_config_dict(self) -> dict[str, Any] | None:
        """``config_file`` (or ``$KUBECONFIG``) as a dict, for a trigger that may run on another machine."""
        self.convert_config_file_to_dict()  # type: ignore[no-untyped-call]
        config: dict[str, Any] | None = self._config_dict
        return config

    @property
    def killed(self) -> bool:
        """The task was killed (``on_kill`` ran): the provider's cleanup then does nothing."""
        return bool(self._killed)


__all__ = [
    "CONTRACT",
    "AsyncKubernetesHook",
    "KubernetesPodOperator",
    "PodNotFoundException",
    "PodOperatorAdapter",
    "generic_api_retry",
    "make_safe_label_value",
]
