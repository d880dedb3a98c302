"""airflow-antbatch: elastic, fault-tolerant batch inference with PyTorch, for Apache Airflow.

Importing the package is cheap (no torch, no Airflow): DAG files import it at parse time.
"""

from __future__ import annotations

from airflow_antbatch.errors import (
    AntBatchError,
    InputError,
    InputNotFoundError,
    JobIncompleteError,
    LedgerCorruptError,
    MergeError,
    PlanConflictError,
    ShardError,
    SpecError,
    StoreError,
    UnsupportedStoreError,
    UserCodeError,
    WorkerError,
)
from airflow_antbatch.spec import JobSpec, ModelStage

__version__ = "0.1.0"

__all__ = [
    "AntBatchError",
    "InputError",
    "InputNotFoundError",
    "JobIncompleteError",
    "JobSpec",
    "LedgerCorruptError",
    "MergeError",
    "ModelStage",
    "PlanConflictError",
    "ShardError",
    "SpecError",
    "StoreError",
    "UnsupportedStoreError",
    "UserCodeError",
    "WorkerError",
    "__version__",
]
