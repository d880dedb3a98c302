"""Building and running one worker process from a plan URI (what ``antbatch worker`` does)."""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any

import torch

from airflow_antbatch.ledger import Ledger, WorkerIdentity
from airflow_antbatch.worker.inference import BatchScorer
from airflow_antbatch.worker.local import available_cpus
from airflow_antbatch.worker.loop import Worker, WorkerSummary
from airflow_antbatch.worker.user_code import load_callable, load_model

if TYPE_CHECKING:
    import threading

log = logging.getLogger(__name__)


def run_worker(
    plan_uri: str,
    worker_id: str,
    *,
    storage_options: dict[str, Any] | None = None,
    stop: threading.Event | None = None,
    torch_threads: int | None = None,
) -> WorkerSummary:
    """Load the plan and the user code, then process shards until none is left.

    User code is loaded before anything is claimed, so a broken import path fails fast and
    holds no lease. ``torch_threads`` defaults to the CPUs available: several workers on one
    machine must pass their share, since OpenMP threads that spin against each other make
    inference many times slower (docs/PERF_NOTES).
    """
    ledger = Ledger.open(plan_uri, storage_options)
    spec = ledger.plan.spec
    torch.set_num_threads(torch_threads or available_cpus())
    model = load_model(spec.model, device=spec.device, storage_options=dict(spec.storage_options))
    scorer = BatchScorer(
        model,
        device=spec.device,
        preprocess=load_callable(spec.preprocess, "preprocess hook") if spec.preprocess else None,
        postprocess=load_callable(spec.postprocess, "postprocess hook") if spec.postprocess else None,
        id_column=spec.id_column,
        keep_columns=spec.keep_columns,
    )
    identity = WorkerIdentity(worker_id)
    log.info(
        "%s: starting on %s (%d shards planned, torch threads %d)",
        identity.token,
        plan_uri,
        len(ledger.plan.shards),
        torch.get_num_threads(),
    )
    summary = Worker(ledger, identity, scorer, stop=stop).run()
    log.info(
        "%s: %s; committed %d shards (%d rows), skipped %d already committed, %d failed tries, %.1f rows/s",
        identity.worker_id,
        summary.outcome,
        summary.shards_committed,
        summary.rows_committed,
        summary.shards_skipped,
        summary.shards_failed,
        summary.rows_per_s,
    )
    return summary
