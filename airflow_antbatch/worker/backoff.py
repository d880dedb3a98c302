"""Riding out a store that is unreachable for a while (a restart, a network partition).

A worker that died at the first failed request would hand its shards to a lease expiry and
its task to an Airflow retry; one that waits, retrying with capped exponential back-off,
carries on where it was once the store is back. Safety does not depend on it: a worker that
waited past its lease finds the shard taken over and does not commit.
"""

from __future__ import annotations

import logging
import time
from typing import TYPE_CHECKING, TypeVar

from airflow_antbatch.errors import StoreError

if TYPE_CHECKING:
    import threading
    from collections.abc import Callable

log = logging.getLogger(__name__)

T = TypeVar("T")
FIRST_DELAY_S = 0.5
MAX_DELAY_S = 10.0


def retry_store(call: Callable[[], T], *, what: str, patience_s: float, stop: threading.Event) -> T:
    """``call()``, retried on StoreError until ``patience_s`` has passed or ``stop`` is set."""
    started = time.monotonic()
    delay = FIRST_DELAY_S
    while True:
        try:
            return call()
        except StoreError as exc:
            waited = time.monotonic() - started
            if waited + delay > patience_s or stop.is_set():
                raise StoreError(f"{exc} (gave up after {waited:.0f}s of retries)") from exc
            log.warning("%s failed, retrying in %.1fs: %s", what, delay, exc)
            stop.wait(delay)
            delay = min(MAX_DELAY_S, delay * 2)
