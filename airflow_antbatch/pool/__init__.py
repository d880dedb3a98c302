"""The elastic pool's pure parts: the scaling policy and the reconciling controller core.

No Airflow and no Kubernetes client here: the operator and its trigger feed these pods and the
ledger's status, and carry out the plans they return.
"""

from airflow_antbatch.pool.controller import PodView, PoolController, TickPlan, worker_id
from airflow_antbatch.pool.policy import Decision, PoolSettings, PoolSnapshot, decide

__all__ = ["Decision", "PodView", "PoolController", "PoolSettings", "PoolSnapshot", "TickPlan", "decide", "worker_id"]
