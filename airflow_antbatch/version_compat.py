"""Every Airflow import the provider's Airflow side needs, in one place (Airflow 3 only).

When a name moves between Airflow releases, this is the one file to change; the role modules
(operators, sensors, triggers, plugins, task group) import from here, never from ``airflow``
directly (tests/test_layering.py checks it). The one exception is the cncf-kubernetes
provider, whose KubernetesPodOperator and the private members we rely on are fenced in
:mod:`airflow_antbatch.operators.kpo_adapter`.

The API server's names (the UI plugin's FastAPI dependencies, the XCom model, AirflowPlugin)
are imported lazily, on first use, so that importing an operator in a DAG file or a task does
not load the API server's modules.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from airflow.sdk import (
    Asset,
    BaseHook,
    BaseOperator,
    BaseOperatorLink,
    BaseSensorOperator,
    Context,
    Param,
    PokeReturnValue,
    TaskGroup,
    TriggerRule,
)
from airflow.sdk.exceptions import AirflowException, AirflowFailException, AirflowSkipException
from airflow.sdk.io import get_fs, has_fs
from airflow.triggers.base import BaseTrigger, TriggerEvent

try:
    from airflow.sdk.configuration import conf
except ImportError:  # pragma: no cover - Airflow < 3.1 kept it in airflow.configuration
    from airflow.configuration import conf

if TYPE_CHECKING:
    from airflow.api_fastapi.auth.managers.models.resource_details import DagAccessEntity
    from airflow.api_fastapi.common.db.common import SessionDep
    from airflow.api_fastapi.core_api.security import requires_access_dag, requires_authenticated
    from airflow.models.xcom import XComModel
    from airflow.plugins_manager import AirflowPlugin
    from airflow.providers.openlineage.extractors import OperatorLineage
    from airflow.sdk.types import TaskInstanceKey

# name -> module, imported by ``__getattr__`` when a role module first asks for the name.
_LAZY = {
    "AirflowPlugin": "airflow.plugins_manager",
    "DagAccessEntity": "airflow.api_fastapi.auth.managers.models.resource_details",
    "OperatorLineage": "airflow.providers.openlineage.extractors",  # the openlineage extra
    "SessionDep": "airflow.api_fastapi.common.db.common",
    "TaskInstanceKey": "airflow.sdk.types",
    "XComModel": "airflow.models.xcom",
    "requires_access_dag": "airflow.api_fastapi.core_api.security",
    "requires_authenticated": "airflow.api_fastapi.core_api.security",
}


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def default_deferrable() -> bool:
    """The deployment's ``[operators] default_deferrable``, as the providers' own operators read it."""
    return bool(conf.getboolean("operators", "default_deferrable", fallback=False))


__all__ = [
    "AirflowException",
    "AirflowFailException",
    "AirflowPlugin",
    "AirflowSkipException",
    "Asset",
    "BaseHook",
    "BaseOperator",
    "BaseOperatorLink",
    "BaseSensorOperator",
    "BaseTrigger",
    "Context",
    "DagAccessEntity",
    "OperatorLineage",
    "Param",
    "PokeReturnValue",
    "SessionDep",
    "TaskGroup",
    "TaskInstanceKey",
    "TriggerEvent",
    "TriggerRule",
    "XComModel",
    "conf",
    "default_deferrable",
    "get_fs",
    "has_fs",
    "requires_access_dag",
    "requires_authenticated",
]
