"""Every Airflow import the provider's Airflow side needs, in one place (Airflow 3 only).

When a name moves between Airflow releases, this is the one file to change; the role modules
(operators, sensors, task group) import from here, never from ``airflow`` directly.
"""

from __future__ import annotations

from airflow.sdk import BaseOperator, BaseSensorOperator, Context, Param, PokeReturnValue, TaskGroup, TriggerRule
from airflow.sdk.exceptions import AirflowException, AirflowFailException, AirflowSkipException

__all__ = [
    "AirflowException",
    "AirflowFailException",
    "AirflowSkipException",
    "BaseOperator",
    "BaseSensorOperator",
    "Context",
    "Param",
    "PokeReturnValue",
    "TaskGroup",
    "TriggerRule",
]
