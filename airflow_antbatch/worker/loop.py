"""The worker's main loop: claim -> read -> score -> write -> commit, until nothing is left.

A worker does not own shards: it pulls them from the ledger, so fast workers take more and
the last live worker finishes a dead worker's shards once their lease expires.
"""

from __future__ import annotations

import dataclasses
import io
import logging
import threading
import time
import zlib
from typing import TYPE_CHECKING, Any

import pyarrow as pa
import pyarrow.parquet as pq

from airflow_antbatch.errors import StoreError
from airflow_antbatch.ledger import Lease, Ledger, WorkerIdentity
from airflow_antbatch.states import ShardState
from airflow_antbatch.store import AtomicStore
from airflow_antbatch.worker.heartbeat import Heartbeat
from airflow_antbatch.worker.reader import iter_batches

if TYPE_CHECKING:
    from airflow_antbatch.shards import Shard
    from airflow_antbatch.worker.inference import BatchScorer

log = logging.getLogger(__name__)


class Preempted(Exception):
    """Raised inside shard processing when the stop event is set (SIGTERM)."""


@dataclasses.dataclass
class WorkerSummary:
    """What one worker process did; printed, and pushed to XCom by the Airflow side."""

    worker_id: str
    token: str
    outcome: str = "running"  # finished | preempted | failed
    shards_committed: int = 0
    rows_committed: int = 0
    shards_skipped: int = 0  # already committed when this worker started
    shards_failed: int = 0  # tries of this worker that failed
    shards_lost: int = 0  # processed, but another try committed first
    failed_for_good: list[str] = dataclasses.field(default_factory=list)
    seconds: float = 0.0
    rows_per_s: float = 0.0
    requests: dict[str, int] = dataclasses.field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


class Worker:
    """Processes shards of one job until every shard is committed or failed for good."""

    def __init__(
        self,
        ledger: Ledger,
        identity: WorkerIdentity,
        scorer: BatchScorer,
        *,
        stop: threading.Event | None = None,
        poll_interval_s: float | None = None,
    ) -> None:
        self.ledger = ledger
        self.plan = ledger.plan
        self.identity = identity
        self.scorer = scorer
        self.stop = stop or threading.Event()
        ttl = float(self.plan.spec.lease_ttl_s)
        self.poll_interval_s = poll_interval_s or min(5.0, max(0.1, ttl / 4))
        self.output = AtomicStore(self.plan.spec.output_uri, dict(self.plan.spec.storage_options))
        self.summary = WorkerSummary(identity.worker_id, identity.token)
        self._started = time.monotonic()
        self._current: str | None = None
        self._heartbeat = Heartbeat(ledger, identity, max(0.05, ttl / 4), self._stats)

    def _stats(self) -> dict[str, Any]:
        elapsed = max(1e-9, time.monotonic() - self._started)
        return {
            "shards_committed": self.summary.shards_committed,
            "rows_committed": self.summary.rows_committed,
            "rows_per_s": self.summary.rows_committed / elapsed,
            "current_shard": self._current,
        }

    def run(self) -> WorkerSummary:
        self._heartbeat.start()
        final = "failed"
        try:
            self._loop()
            final = "preempted" if self.stop.is_set() else "finished"
        finally:
            self.summary.outcome = final
            self.summary.seconds = time.monotonic() - self._started
            self.summary.rows_per_s = self.summary.rows_committed / max(1e-9, self.summary.seconds)
            self._heartbeat.stop(final)
            self.summary.requests = dict(self.ledger.store.counts)
        return self.summary

    def _loop(self) -> None:
        shards = {s.shard_id: s for s in self.plan.shards}
        committed = self.ledger.committed_shards()
        self.summary.shards_skipped = len(committed & shards.keys())
        if self.summary.shards_skipped:
            log.info("%s: skipping %d shards already committed", self.identity.worker_id, self.summary.shards_skipped)
        pending = self._start_order([s for s in shards if s not in committed])
        while pending and not self.stop.is_set():
            progressed = False
            for shard_id in list(pending):
                if self.stop.is_set():
                    return
                outcome = self.ledger.try_claim(shard_id, self.identity)
                if isinstance(outcome, Lease):
                    progressed = True
                    if not self._process(outcome, shards[shard_id]):
                        continue  # failed or lost: ask the ledger again on the next pass
                elif outcome is ShardState.LEASED:
                    continue
                elif outcome is ShardState.FAILED:
                    self.summary.failed_for_good.append(shard_id)
                pending.remove(shard_id)
            if pending and not progressed:
                # Everything left is leased by live workers: wait, then look for expired leases.
                self.stop.wait(self.poll_interval_s)

    def _start_order(self, shard_ids: list[str]) -> list[str]:
        """Start at a point that depends on the worker id, so workers rarely collide."""
        if not shard_ids:
            return []
        offset = zlib.crc32(self.identity.worker_id.encode()) % len(shard_ids)
        return shard_ids[offset:] + shard_ids[:offset]

    def _process(self, lease: Lease, shard: Shard) -> bool:
        """True once the shard is committed (by this try or another); False to look again."""
        self._current = shard.shard_id
        try:
            table = self._score(shard)
            return self._write_and_commit(lease, shard, table)
        except Preempted:
            self.ledger.release(lease, reason="preempted", failed=False)
            log.warning("%s: released shard %s on SIGTERM", self.identity.worker_id, shard.shard_id)
            return False
        except StoreError:
            # Not the shard's fault: give the try back uncounted, then stop this worker.
            self._release_quietly(lease, "store error")
            raise
        except Exception as exc:
            self.summary.shards_failed += 1
            log.error("%s: shard %s failed (try %d): %s", self.identity.worker_id, shard.shard_id, lease.epoch, exc)
            self.ledger.release(lease, reason="failed", failed=True, error=f"{type(exc).__name__}: {exc}")
            return False
        finally:
            self._current = None

    def _score(self, shard: Shard) -> pa.Table:
        spec = self.plan.spec
        tables = []
        for batch in iter_batches(shard, self.plan.input_format, spec.batch_size, dict(spec.storage_options)):
            if self.stop.is_set():
                raise Preempted
            tables.append(self.scorer.score(batch))
        if not tables:
            return pa.table({})
        return pa.concat_tables(tables, promote_options="default")

    def _write_and_commit(self, lease: Lease, shard: Shard, table: pa.Table) -> bool:
        buffer = io.BytesIO()
        pq.write_table(table, buffer)
        name = self.plan.output_name(shard.shard_id)
        # Durable output first, commit second: a crash in between leaves an uncommitted file
        # at a fixed name that the next try overwrites with the same rows.
        self.output.put(name, buffer.getvalue(), kind="data")
        if not self.ledger.holds(lease):
            self.summary.shards_lost += 1
            log.warning("%s: lease on %s was taken over; not committing", self.identity.worker_id, shard.shard_id)
            return False
        if not self.ledger.commit(lease, file=name, rows=table.num_rows):
            self.summary.shards_lost += 1
            log.warning("%s: shard %s was committed by another try", self.identity.worker_id, shard.shard_id)
            return True
        self.summary.shards_committed += 1
        self.summary.rows_committed += table.num_rows
        self._heartbeat.beat()
        log.info(
            "%s: committed shard %s (%d rows); this worker: %d shards, %d rows",
            self.identity.worker_id,
            shard.shard_id,
            table.num_rows,
            self.summary.shards_committed,
            self.summary.rows_committed,
        )
        return True

    def _release_quietly(self, lease: Lease, reason: str) -> None:
        try:
            self.ledger.release(lease, reason=reason, failed=False)
        except StoreError as exc:
            log.warning("could not release %s after a store error: %s", lease.shard_id, exc)
