"""``ShardLedgerTrigger``: waits on the ledger in the triggerer, without holding a worker slot.

It decides with the sensor's own :func:`~airflow_antbatch.sensors.ledger.judge` and logs the
sensor's :func:`~airflow_antbatch.sensors.ledger.progress_line`, so that poke and deferrable
modes cannot drift apart. The ledger is read through fsspec, which blocks: every read runs in
a thread (``asyncio.to_thread``), so one slow store never stalls the triggerer's event loop.
"""

from __future__ import annotations

import asyncio
import time
from typing import TYPE_CHECKING, Any

from airflow_antbatch.sensors.ledger import JobFailed, compact, judge, progress_line
from airflow_antbatch.version_compat import BaseTrigger, TriggerEvent

if TYPE_CHECKING:
    from collections.abc import AsyncIterator

    from airflow_antbatch.ledger import JobStatus, Ledger

# Event statuses, the persisted contract between this trigger and the sensor's execute_complete.
SUCCESS, FAILED, TIMEOUT = "success", "failed", "timeout"


class ShardLedgerTrigger(BaseTrigger):
    """Fires one event: ``success`` (with the compact status), ``failed`` or ``timeout`` (with why).

    :param plan_uri: the job attempt's plan, as the sensor rendered it.
    :param storage_options: fsspec options of the ledger's store (no credentials: they are
        persisted in the Airflow database with the trigger).
    :param poll_interval: seconds between two ledger reads.
    :param stall_timeout: as the sensor's: fail when work is left and no worker heartbeat is
        younger than this; None waits for the deadline instead.
    :param deadline: Unix time after which the trigger gives up (absolute, so that a trigger
        resumed by another triggerer keeps the sensor's timeout); None waits without limit.
    """

    def __init__(
        self,
        *,
        plan_uri: str,
        storage_options: dict[str, Any] | None = None,
        poll_interval: float = 10.0,
        stall_timeout: float | None = None,
        deadline: float | None = None,
    ) -> None:
        super().__init__()  # type: ignore[no-untyped-call]  # BaseTrigger is untyped
        self.plan_uri = plan_uri
        self.storage_options = storage_options
        self.poll_interval = poll_interval
        self.stall_timeout = stall_timeout
        self.deadline = deadline
        self._ledger: Ledger | None = None

    def serialize(self) -> tuple[str, dict[str, Any]]:
        return (
            f"{type(self).__module__}.{type(self).__qualname__}",
            {
                "plan_uri": self.plan_uri,
                "storage_options": self.storage_options,
                "poll_interval": self.poll_interval,
                "stall_timeout": self.stall_timeout,
                "deadline": self.deadline,
            },
        )

    async def run(self) -> AsyncIterator[TriggerEvent]:
        while True:
            status = await asyncio.to_thread(self._read_status)
            self.log.info("%s", progress_line(status))
            max_attempts = None if self._ledger is None else self._ledger.plan.spec.max_shard_attempts
            try:
                done = judge(status, self.plan_uri, stall_timeout=self.stall_timeout, max_attempts=max_attempts)
            except JobFailed as exc:
                yield _event(FAILED, str(exc))
                return
            if done:
                message = f"every shard of {self.plan_uri} is committed"
                yield _event(SUCCESS, message, result=compact(status, self.plan_uri))
                return
            if self.deadline is not None and time.time() >= self.deadline:
                message = (
                    f"timed out waiting for {self.plan_uri}: {progress_line(status)}. "
                    "Clear the worker tasks to continue (committed shards are kept)"
                )
                yield _event(TIMEOUT, message)
                return
            wait = self.poll_interval if self.deadline is None else min(self.poll_interval, self.deadline - time.time())
            await asyncio.sleep(max(0.0, wait))

    def _read_status(self) -> JobStatus:
        """One status read (blocking I/O, run in a thread); the plan is read once per trigger run."""
        from airflow_antbatch.ledger import Ledger

        if self._ledger is None:
            self._ledger = Ledger.open(self.plan_uri, self.storage_options)
        return self._ledger.status()


def _event(status: str, message: str, **extra: Any) -> TriggerEvent:
    """Plain values only: the event is persisted and handed to the sensor's execute_complete."""
    return TriggerEvent({"status": status, "message": message, **extra})  # type: ignore[no-untyped-call]
