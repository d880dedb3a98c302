"""A progress line at a steady interval, for logs people read (Airflow's task log, pod logs).

Not a terminal progress bar: one plain line every ``interval_s`` with this worker's shards,
rows and rows/s, the shards left in its run and when it expects to be through them. It reads
nothing from the store: a thousand workers listing the ledger every 30 s would cost more than
the claims. The whole job's progress is one ``antbatch status`` (or the sensor's line, or the
UI page) away, computed from the heartbeats.
"""

from __future__ import annotations

import logging
import threading
import time
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from collections.abc import Callable

    from airflow_antbatch.worker.loop import WorkerSummary

log = logging.getLogger(__name__)


class ProgressLog:
    """Logs ``progress_line()`` every ``interval_s`` from a daemon thread until stopped."""

    def __init__(self, summary: WorkerSummary, run_left: Callable[[], int], interval_s: float) -> None:
        self._summary = summary
        self._run_left = run_left
        self._interval = interval_s
        self._started = time.monotonic()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name=f"progress-{summary.worker_id}", daemon=True)

    def start(self) -> None:
        self._started = time.monotonic()
        if self._interval > 0:
            self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join()

    def progress_line(self) -> str:
        """This worker's own counts and run: no request to the store."""
        elapsed = max(1e-9, time.monotonic() - self._started)
        summary = self._summary
        left = self._run_left()
        shard_rate = summary.shards_committed / elapsed
        eta = "-" if shard_rate <= 0 else f"{left / shard_rate:.0f}s"
        return (
            f"{summary.worker_id}: {summary.shards_committed} shards ({summary.rows_committed} rows) committed by this "
            f"worker, {summary.rows_committed / elapsed:.1f} rows/s; {left} shards left in its run, ETA {eta}"
            + (f"; {summary.rows_lost} rows lost to faster tries" if summary.rows_lost else "")
        )

    def _loop(self) -> None:
        while not self._stop.wait(self._interval):
            log.info("progress: %s", self.progress_line())
