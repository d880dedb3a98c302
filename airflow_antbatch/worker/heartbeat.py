"""One heartbeat per worker process: the beat counter that keeps all of its leases alive."""

from __future__ import annotations

import logging
import threading
from typing import TYPE_CHECKING, Any

from airflow_antbatch.errors import StoreError

if TYPE_CHECKING:
    from collections.abc import Callable

    from airflow_antbatch.ledger import Ledger, WorkerIdentity

log = logging.getLogger(__name__)


class Heartbeat:
    """Writes the worker's heartbeat every ``interval_s`` from a daemon thread.

    ``beat()`` may also be called from the main thread (after each commit, so that status
    shows fresh row counts); a lock keeps the counter strictly increasing.
    """

    def __init__(
        self, ledger: Ledger, identity: WorkerIdentity, interval_s: float, stats: Callable[[], dict[str, Any]]
    ) -> None:
        self._ledger = ledger
        self._identity = identity
        self._interval = interval_s
        self._stats = stats
        self._beat = 0
        self.state = "running"  # what each beat says until the final one (or "draining")
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name=f"heartbeat-{identity.worker_id}", daemon=True)

    def start(self) -> None:
        self.beat()
        self._thread.start()

    def beat(self, state: str | None = None) -> None:
        with self._lock:
            self._beat += 1
            self._ledger.heartbeat(self._identity, self._beat, state=state or self.state, stats=self._stats())

    def stop(self, final_state: str) -> None:
        """Stop beating and write the final state, so that others need not wait out a TTL."""
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join()
        try:
            self.beat(final_state)
        except StoreError as exc:  # others then wait out the lease instead: slower, not wrong
            log.warning("could not write the final heartbeat (%s): %s", final_state, exc)

    def _loop(self) -> None:
        while not self._stop.wait(self._interval):
            try:
                self.beat()
            except StoreError as exc:
                # A store blip must not kill the worker; a long outage lets leases expire, and
                # the fencing check before commit then stops this worker from committing.
                log.warning("heartbeat failed, will retry: %s", exc)
