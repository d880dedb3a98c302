"""``ShardLedgerTrigger``: waits on the ledger in the triggerer, without holding a worker slot.

It decides with the sensor's own :func:`~airflow_antbatch.sensors.ledger.judge` and logs the
sensor's :func:`~airflow_antbatch.sensors.ledger.progress_line`, so that poke and deferrable
modes cannot drift apart. The ledger is read through fsspec, which blocks: every read runs in
a thread (``asyncio.to_thread``), so one slow store never stalls the triggerer's event loop.
Reads go through the sensor's :class:`~airflow_antbatch.sensors.ledger.LedgerWatch`: store
errors are retried for ``store_patience`` seconds, and beats are timed by the triggerer's own
clock. That memory is the trigger's: a triggerer restart re-creates the trigger from its
kwargs and it starts watching afresh (a stall verdict then takes ``stall_timeout`` again).

Whatever goes wrong inside ``run()`` ends in an event, never in a dead trigger: ``error``
with the exception named in the message.
"""

from __future__ import annotations

import asyncio
import time
from typing import TYPE_CHECKING, Any

from airflow_antbatch.sensors.ledger import JobFailed, LedgerWatch, compact, progress_line
from airflow_antbatch.version_compat import BaseTrigger, TriggerEvent

if TYPE_CHECKING:
    from collections.abc import AsyncIterator

# Event statuses, the persisted contract between this trigger and the sensor's execute_complete:
# the job cannot succeed (failed), the deadline passed (timeout), the wait itself broke (error).
SUCCESS, FAILED, TIMEOUT, ERROR = "success", "failed", "timeout", "error"


class ShardLedgerTrigger(BaseTrigger):
    """Fires one event: ``success`` (with the compact status), ``failed``, ``timeout`` or ``error`` (with why).

    :param plan_uri: the job attempt's plan, as the sensor rendered it.
    :param storage_options: fsspec options of the ledger's store (no credentials: they are
        persisted in the Airflow database with the trigger).
    :param conn_id: the Airflow connection to read the ledger through (default: the one
        ``plan_uri`` names), by name only: it is looked up here, in the triggerer, on the first
        read, so that no secret is persisted with the trigger.
    :param poll_interval: seconds between two ledger reads.
    :param stall_timeout: as the sensor's: fail when work is left and no running worker's beat
        moved for this long, by this trigger's clock; None waits for the deadline instead.
    :param store_patience: as the sensor's: seconds of store errors to ride out per read.
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
        store_patience: float | None = None,
        deadline: float | None = None,
        conn_id: str | None = None,
    ) -> None:
        super().__init__()  # type: ignore[no-untyped-call]  # BaseTrigger is untyped
        self.plan_uri = plan_uri
        self.storage_options = storage_options
        self.conn_id = conn_id
        self.poll_interval = poll_interval
        self.stall_timeout = stall_timeout
        self.store_patience = store_patience
        self.deadline = deadline
        self._watch = LedgerWatch(plan_uri, storage_options, store_patience=store_patience, conn_id=conn_id)

    def serialize(self) -> tuple[str, dict[str, Any]]:
        return (
            f"{type(self).__module__}.{type(self).__qualname__}",
            {
                "plan_uri": self.plan_uri,
                "storage_options": self.storage_options,
                "poll_interval": self.poll_interval,
                "stall_timeout": self.stall_timeout,
                "store_patience": self.store_patience,
                "deadline": self.deadline,
                "conn_id": self.conn_id,
            },
        )

    async def run(self) -> AsyncIterator[TriggerEvent]:
        try:
            event = await self._wait()
        except Exception as exc:  # a dead trigger would leave the task waiting for nothing
            self.log.exception("waiting on %s failed", self.plan_uri)
            event = _event(ERROR, f"waiting on the ledger of {self.plan_uri} failed: {type(exc).__name__}: {exc}")
        yield event

    async def _wait(self) -> TriggerEvent:
        watch = self._watch
        while True:
            status = await asyncio.to_thread(watch.read)
            self.log.info("%s", progress_line(status))
            try:
                done = watch.judge(status, self.stall_timeout)
            except JobFailed as exc:
                return _event(FAILED, str(exc))
            if done:
                message = f"every shard of {self.plan_uri} is committed"
                return _event(SUCCESS, message, result=compact(status, self.plan_uri))
            if self.deadline is not None and time.time() >= self.deadline:
                message = (
                    f"timed out waiting for {self.plan_uri}: {progress_line(status)}. "
                    "Clear the worker tasks to continue (committed shards are kept)"
                )
                return _event(TIMEOUT, message)
            wait = self.poll_interval if self.deadline is None else min(self.poll_interval, self.deadline - time.time())
            await asyncio.sleep(max(0.0, wait))

    async def cleanup(self) -> None:
        """On any exit (cancelled included): a read still retrying in its thread gives up."""
        self._watch.stop.set()
        await super().cleanup()


def _event(status: str, message: str, **extra: Any) -> TriggerEvent:
    """Plain values only: the event is persisted and handed to the sensor's execute_complete."""
    return TriggerEvent({"status": status, "message": message, **extra})  # type: ignore[no-untyped-call]
