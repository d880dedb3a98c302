"""The KubernetesPodOperator members the pod launcher relies on exist, with the parameters it
passes, on the installed cncf-kubernetes provider: a provider upgrade that renames or reshapes
one fails here, not in a worker pod at night."""

from __future__ import annotations

import inspect
from importlib.metadata import version
from types import SimpleNamespace
from typing import TYPE_CHECKING, cast

import pytest

from airflow_antbatch.operators.kpo_adapter import CONTRACT, KubernetesPodOperator, PodOperatorAdapter
from airflow_antbatch.operators.kubernetes_worker import KubernetesBatchWorkerOperator

if TYPE_CHECKING:
    from airflow_antbatch.version_compat import Context


def _parameters(member: object) -> list[inspect.Parameter]:
    params = list(inspect.signature(member).parameters.values())  # type: ignore[arg-type]
    return params[1:] if params and params[0].name == "self" else params


@pytest.mark.parametrize(("owner", "name"), sorted(CONTRACT, key=lambda k: (k[0].__name__, k[1])))
def test_each_member_exists_with_the_parameters_we_pass(owner: type, name: str) -> None:
    expected = CONTRACT[(owner, name)]
    if expected is None:  # an attribute: a class constant, or set by __init__
        holder = owner if hasattr(owner, name) else KubernetesPodOperator(task_id="t", image="i", namespace="n")
        assert hasattr(holder, name), f"{owner.__name__}.{name} is gone"
        return
    member = inspect.getattr_static(owner, name, None)
    assert member is not None, f"{owner.__name__}.{name} is gone"
    params = _parameters(getattr(owner, name))
    names = [p.name for p in params]
    assert names[: len(expected)] == list(expected), f"{owner.__name__}.{name}{inspect.signature(member)}"  # type: ignore[arg-type]
    extra = params[len(expected) :]
    assert all(p.default is not inspect.Parameter.empty or p.kind is p.VAR_KEYWORD for p in extra), names


def test_the_installed_provider_is_within_the_tested_major() -> None:
    assert version("apache-airflow-providers-cncf-kubernetes").split(".")[0] == "10"


def test_the_adapter_wraps_the_private_members() -> None:
    op = KubernetesBatchWorkerOperator(
        task_id="work", image="img", namespace="ns", plan_uri="s3://b/plan.arrow", worker_id="worker-0"
    )
    assert isinstance(op, PodOperatorAdapter)
    assert op.safe_pod_name("Work_Worker.0") == "work-worker-0"
    assert op.killed is False
    op.on_kill()  # no pod yet: only marks the operator killed
    assert op.killed is True
    ti = SimpleNamespace(dag_id="nightly", task_id="work", map_index=2, try_number=3)
    context = cast("Context", {"ti": ti, "run_id": "manual__1", "dag": SimpleNamespace()})
    assert op.ti_pod_labels(context, include_try_number=False) == {
        "dag_id": "nightly",
        "task_id": "work",
        "run_id": "manual__1",
        "kubernetes_pod_operator": "True",
        "map_index": "2",
    }
