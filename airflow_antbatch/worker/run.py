"""Building and running one worker process from a plan URI (what ``antbatch worker`` does).

Only light modules are imported at the top: ``run_worker`` starts the preprocess forkserver
first, so that its torch import runs on another core while this process imports torch and
loads the model (see ``forkserver``). Scoring does not wait for it: until a preprocess process
is ready, the worker preprocesses first tries itself (``preprocess_stage``).
"""

from __future__ import annotations

import logging
import os
import time
from typing import TYPE_CHECKING, Any, cast

from airflow_antbatch.ledger import Ledger, WorkerIdentity
from airflow_antbatch.worker import forkserver
from airflow_antbatch.worker.local import available_cpus

if TYPE_CHECKING:
    import threading

    import pyarrow as pa

    from airflow_antbatch.worker.inference import OutputAssembler
    from airflow_antbatch.worker.loop import WorkerSummary
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
    preprocess_while_pool_starts: bool = True,
    drain_s: float = 0.0,
) -> WorkerSummary:
    """Load the plan and the user code, then process shards until none is left.

    User code is loaded before anything is claimed, so a broken import path fails fast and
    holds no lease; a preprocess process that cannot load it fails the worker later, and the
    worker releases what it holds. ``cpu_budget`` (default: the CPUs this process may use) is shared between
    preprocess processes and the model stages' torch threads; several workers on one machine
    must each pass their share, since OpenMP threads that spin against each other make
    inference many times slower (docs/operations.md). ``preprocess_workers`` fixes the
    preprocess pool size (0: preprocess in a thread) instead of scaling it (on a one-core
    budget the default is a thread: see :func:`pool_size`); ``torch_threads``
    fixes the model stages' intra-op threads. ``cache`` sizes the near cache that fetches a
    shard's small input files many at a time (default: 256 MiB in memory). A progress line is
    logged every ``progress_interval_s`` (0: never). ``slot`` (I, N) is the share of the plan
    this worker claims first (see NOTE [claiming] in worker/claims.py).
    ``preprocess_while_pool_starts=False`` keeps every record in the pool's processes, where one
    that crashes the hook is quarantined, at the price of waiting for their start (see
    ``preprocess_stage``). Once ``stop`` is set, the worker claims nothing more and keeps scoring
    the shards in hand that it expects to commit within ``drain_s`` seconds, giving the others
    back at once (NOTE [drain] in worker/drain.py).

    The summary's ``time_to_first_batch_s`` counts from the start of this process: for
    ``antbatch run`` with one worker, from the command's start.
    """
    ledger = Ledger.open(plan_uri, storage_options)
    spec = ledger.plan.spec
    cpu_budget = cpu_budget or available_cpus()
    preprocess_workers = pool_size(cpu_budget, preprocess_workers)
    start_preprocess_server(spec.preprocess, preprocess_workers)
    from airflow_antbatch.worker.job_code import JobCode
    from airflow_antbatch.worker.loop import Worker
    from airflow_antbatch.worker.pipeline import PipelineOptions

    code = JobCode.load(spec)
    first_batch = FirstBatchClock(code.assembler)
    code.assembler = cast("OutputAssembler", first_batch)
    options = PipelineOptions(
        cpu_budget=cpu_budget,
        preprocess_workers=preprocess_workers,
        torch_threads=torch_threads,
        preprocess_while_pool_starts=preprocess_while_pool_starts,
    )
    identity = WorkerIdentity(worker_id)
    log.info(
        "%s: starting on %s (%d shards planned, %d model stage(s), cpu budget %d); code loaded %.2fs after "
        "the process started",
        identity.token,
        plan_uri,
        len(ledger.plan.shards),
        len(code.runners),
        options.cpu_budget,
        _age(),
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
        drain_s=drain_s,
    )
    log.info("%s: pipeline ready %.2fs after the process started", identity.worker_id, _age())
    summary = worker.run()
    if first_batch.at is not None:
        summary.time_to_first_batch_s = round(first_batch.at - process_started(), 3)
    log.info(
        "%s: %s; committed %d shards (%d rows, %d quarantined), skipped %d already committed, %d failed tries, "
        "%.1f rows/s; %s",
        identity.worker_id,
        summary.outcome,
        summary.shards_committed,
        summary.rows_committed,
        summary.rows_quarantined,
        summary.shards_skipped,
        summary.shards_failed,
        summary.rows_per_s,
        first_batch_text(summary.time_to_first_batch_s),
    )
    return summary


def pool_size(cpu_budget: int, preprocess_workers: int | None) -> int | None:
    """The preprocess pool setting a worker runs with: as given, except that a budget of one core
    preprocesses in a thread (0) unless a pool size is given.

    The budget counts the model's threads too: on one core a preprocess process would only take
    turns with the model thread, after a torch import of its own. ``preprocess_workers=1`` keeps
    the process, and with it the quarantine of a record that crashes the hook.
    """
    return 0 if preprocess_workers is None and cpu_budget == 1 else preprocess_workers


def start_preprocess_server(preprocess: str | None, preprocess_workers: int | None) -> None:
    """Start the preprocess processes' forkserver now if there will be any (see ``forkserver``)."""
    if preprocess and preprocess_workers != 0:
        forkserver.start(preprocess)


class FirstBatchClock:
    """The job's output assembler, noting when it is first called: the moment the first batch
    has left the model stages, which is what a user waits for after starting a job."""

    def __init__(self, assembler: OutputAssembler) -> None:
        self._assembler = assembler
        self.at: float | None = None  # time.monotonic() of the first call

    def __getattr__(self, name: str) -> Any:
        return getattr(self._assembler, name)

    def __call__(self, output: Any, batch: pa.RecordBatch, kept: Any = None) -> pa.Table:
        if self.at is None:
            self.at = time.monotonic()
        return self._assembler(output, batch, kept)


def process_started() -> float:
    """When this process started, on the ``time.monotonic()`` clock.

    Linux says it in /proc (in clock ticks since boot); elsewhere the module's import stands in.
    """
    try:
        with open("/proc/self/stat") as handle:
            fields = handle.read().rpartition(")")[2].split()
        with open("/proc/uptime") as handle:
            uptime = float(handle.read().split()[0])
        age = uptime - int(fields[19]) / os.sysconf("SC_CLK_TCK")  # field 22 of stat: starttime
    except (OSError, ValueError, IndexError):
        return _IMPORTED
    return time.monotonic() - age


def _age() -> float:
    return time.monotonic() - process_started()


_IMPORTED = time.monotonic()


def first_batch_text(seconds: float | None) -> str:
    """The start-up cost as users read it; a worker that found everything committed scored none."""
    return "no batch to score" if seconds is None else f"first batch scored {seconds:.2f} s after the process started"
