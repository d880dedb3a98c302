"""A progress line at a steady interval, for logs people read (Airflow's task log, pod logs).

Not a terminal progress bar: one plain line every ``interval_s`` with this worker's shards and
rows, the whole job's committed shards, the worker's rows/s and the job's ETA, so that an
on-call engineer reading any worker's log sees how far the night is.
"""

from __future__ import annotations

import logging
import threading
import time
from typing import TYPE_CHECKING

from airflow_antbatch.errors import StoreError

if TYPE_CHECKING:
    from airflow_antbatch.ledger import Ledger
    from airflow_antbatch.worker.loop import WorkerSummary

log = logging.getLogger(__name__)


class ProgressLog:
    """Logs ``progress_line()`` every ``interval_s`` from a daemon thread until stopped."""

    def __init__(self, ledger: Ledger, summary: WorkerSummary, interval_s: float) -> None:
        self._ledger = ledger
        self._summary = summary
        self._interval = interval_s
        self._started = time.monotonic()
        self._job_at_start: int | None = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name=f"progress-{summary.worker_id}", daemon=True)

    def start(self, committed_at_start: int) -> None:
        self._job_at_start = committed_at_start
        self._started = time.monotonic()
        if self._interval > 0:
            self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join()

    def progress_line(self) -> str:
        """One listing of the job's commits; the rest is this worker's own counts."""
        planned = len(self._ledger.plan.shards)
        committed = len(self._ledger.committed_shards())
        elapsed = max(1e-9, time.monotonic() - self._started)
        summary = self._summary
        job_rate = (committed - (self._job_at_start or 0)) / elapsed  # shards/s, all workers
        left = planned - committed
        eta = "-" if job_rate <= 0 else f"{left / job_rate:.0f}s"
        return (
            f"{summary.worker_id}: {summary.shards_committed} shards ({summary.rows_committed} rows) committed by this "
            f"worker, {summary.rows_committed / elapsed:.1f} rows/s; job {committed}/{planned} shards committed "
            f"({100 * committed / max(1, planned):.0f}%), ETA {eta}"
        )

    def _loop(self) -> None:
        while not self._stop.wait(self._interval):
            try:
                log.info("progress: %s", self.progress_line())
            except StoreError as exc:
                log.warning("progress: could not read the ledger: %s", exc)
