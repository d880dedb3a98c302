"""Building and running one worker process from a plan URI (what ``antbatch worker`` does)."""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any

from airflow_antbatch.ledger import Ledger, WorkerIdentity
from airflow_antbatch.worker.job_code import JobCode
from airflow_antbatch.worker.local import available_cpus
from airflow_antbatch.worker.loop import Worker, WorkerSummary
from airflow_antbatch.worker.pipeline import PipelineOptions

if TYPE_CHECKING:
    import threading

    from airflow_antbatch.worker.near_cache import CacheOptions

log = logging.getLogger(__name__)


def run_worker(
    plan_uri: str,
    worker_id: str,
    *,
    storage_options: dict[str, Any] | None = None,
    stop: threading.Event | None = None,
    cpu_budget: int | None = None,
    preprocess_workers: int | None = None,
    torch_threads: int | None = None,
    cache: CacheOptions | None = None,
    progress_interval_s: float = 30.0,
    slot: tuple[int, int] | None = None,
) -> WorkerSummary:
    """Load the plan and the user code, then process shards until none is left.

    User code is loaded before anything is claimed, so a broken import path fails fast and
    holds no lease. ``cpu_budget`` (default: the CPUs this process may use) is shared between
    preprocess processes and the model stages' torch threads; several workers on one machine
    must each pass their share, since OpenMP threads that spin against each other make
    inference many times slower (docs/operations.md). ``preprocess_workers`` fixes the
    preprocess pool size (0: preprocess in a thread) instead of scaling it; ``torch_threads``
    fixes the model stages' intra-op threads. ``cache`` sizes the near cache that fetches a
    shard's small input files many at a time (default: 256 MiB in memory). A progress line is
    logged every ``progress_interval_s`` (0: never). ``slot`` (I, N) is the share of the plan
    this worker claims first (see NOTE [claiming] in worker/claims.py).
    """
    ledger = Ledger.open(plan_uri, storage_options)
    spec = ledger.plan.spec
    code = JobCode.load(spec)
    options = PipelineOptions(
        cpu_budget=cpu_budget or available_cpus(),
        preprocess_workers=preprocess_workers,
        torch_threads=torch_threads,
    )
    identity = WorkerIdentity(worker_id)
    log.info(
        "%s: starting on %s (%d shards planned, %d model stage(s), cpu budget %d)",
        identity.token,
        plan_uri,
        len(ledger.plan.shards),
        len(code.runners),
        options.cpu_budget,
    )
    worker = Worker(
        ledger,
        identity,
        code,
        options=options,
        stop=stop,
        cache=cache,
        progress_interval_s=progress_interval_s,
        slot=slot,
    )
    summary = worker.run()
    log.info(
        "%s: %s; committed %d shards (%d rows, %d quarantined), skipped %d already committed, %d failed tries, "
        "%.1f rows/s",
        identity.worker_id,
        summary.outcome,
        summary.shards_committed,
        summary.rows_committed,
        summary.rows_quarantined,
        summary.shards_skipped,
        summary.shards_failed,
        summary.rows_per_s,
    )
    return summary
