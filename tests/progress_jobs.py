"""A job caught mid-run, for the status CLI, the UI plugin and the browser test.

The job is planned for real from Parquet input, and shards are then claimed, written and
committed through the ledger's own API, as a worker does, with a heartbeat that stays fresh:
the views read exactly what a running job leaves in the store, without waiting on torch.
"""

from __future__ import annotations

import dataclasses
import io
import pathlib
import time
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from airflow_antbatch import layout
from airflow_antbatch.ledger import Lease, Ledger, WorkerIdentity
from airflow_antbatch.planning import plan_job
from airflow_antbatch.spec import JobSpec
from airflow_antbatch.store import AtomicStore
from airflow_antbatch.worker.loop import TIMELINE_BUCKET_S
from tests.conftest import TABULAR, write_transactions

SHARDS = 8
ROWS_PER_SHARD = 50
QUARANTINE_REASON = "ValueError: amount is negative"


def write_input(root: pathlib.Path) -> None:
    """Parquet input that plans into ``SHARDS`` shards of ``ROWS_PER_SHARD`` rows."""
    write_transactions(root / "in", files=2, rows_per_file=SHARDS * ROWS_PER_SHARD // 2, row_group_size=ROWS_PER_SHARD)


@dataclasses.dataclass
class RunningJob:
    """A planned job whose shards a test commits one by one under a live worker heartbeat."""

    plan_uri: str
    ledger: Ledger
    output: AtomicStore
    identity: WorkerIdentity
    beat: int = 0
    shards_committed: int = 0
    rows_committed: int = 0
    rows_quarantined: int = 0
    held: dict[int, Lease] = dataclasses.field(default_factory=dict)
    timeline: dict[int, int] = dataclasses.field(default_factory=dict)  # bucket start (epoch s) -> rows

    @classmethod
    def plan(
        cls,
        root: pathlib.Path,
        *,
        lease_ttl_s: float = 60.0,
        output_uri: str | None = None,
        storage_options: Any = None,
    ) -> RunningJob:
        """Local input under ``root``; the output and ledger under ``root/out`` or ``output_uri``."""
        write_input(root)
        spec = JobSpec(
            input_uri=str(root / "in"),
            output_uri=output_uri or str(root / "out"),
            model=f"{TABULAR}:build_model",
            max_shard_rows=ROWS_PER_SHARD,
            lease_ttl_s=lease_ttl_s,
            storage_options=storage_options or {},
        )
        return cls.attach(plan_job(spec).plan_uri, storage_options)

    @classmethod
    def attach(cls, plan_uri: str, storage_options: dict[str, Any] | None = None) -> RunningJob:
        """Take up a job planned elsewhere (by a plan task) as its worker ``worker-0``."""
        ledger = Ledger.open(plan_uri, storage_options)
        output = AtomicStore(ledger.plan.spec.output_uri, storage_options)
        job = cls(plan_uri, ledger, output, WorkerIdentity("worker-0"))
        job.heartbeat()
        return job

    def heartbeat(self, state: str = "running") -> None:
        """Beat as the worker does, with what status reads from heartbeats (counts, leases held,
        rows committed over time); a test calls it again to keep its leases live."""
        self.beat += 1
        stats = {
            "shards_committed": self.shards_committed,
            "rows_committed": self.rows_committed,
            "rows_per_s": 125.0,
            "current_shard": min((lease.shard_id for lease in self.held.values()), default=None),
            "leases": sorted(lease.shard_id for lease in self.held.values()),
            "rows_quarantined": self.rows_quarantined,
            "timeline": sorted(self.timeline.items()),
        }
        self.ledger.heartbeat(self.identity, self.beat, state=state, stats=stats)

    def commit(self, shard_index: int, *, quarantined: int = 0) -> None:
        """Claim the shard, write its output (and quarantine file) and commit it."""
        shard = self.ledger.plan.shards[shard_index]
        lease = self.held.pop(shard_index, None) or self._claim(shard_index)
        rows = ROWS_PER_SHARD - quarantined
        name = layout.output_name(self.ledger.plan.attempt, shard.shard_id, lease.epoch)
        self.output.put(name, _parquet(pa.table({"txn_id": list(range(rows))})))
        quarantine = None
        if quarantined:
            quarantine = layout.quarantine_name(self.ledger.plan.attempt, shard.shard_id, lease.epoch)
            bad = pa.table({"txn_id": list(range(quarantined)), "_antbatch_reason": [QUARANTINE_REASON] * quarantined})
            self.output.put(quarantine, _parquet(bad))
        assert self.ledger.commit(lease, file=name, rows=rows, quarantined=quarantined, quarantine_file=quarantine)
        self.shards_committed += 1
        self.rows_committed += rows
        self.rows_quarantined += quarantined
        bucket = int(time.time()) // TIMELINE_BUCKET_S * TIMELINE_BUCKET_S
        self.timeline[bucket] = self.timeline.get(bucket, 0) + rows
        self.heartbeat()

    def hold(self, shard_index: int) -> None:
        """Claim a shard and keep it: it shows as leased while the heartbeat stays fresh."""
        self.held[shard_index] = self._claim(shard_index)
        self.heartbeat()

    def _claim(self, shard_index: int) -> Lease:
        shard_id = self.ledger.plan.shards[shard_index].shard_id
        lease = self.ledger.try_claim(shard_id, self.identity)
        assert isinstance(lease, Lease), f"{shard_id} could not be claimed: {lease}"
        return lease


def mid_run(root: pathlib.Path) -> RunningJob:
    """3 of 8 shards committed (one with 2 quarantined records), 1 leased, 4 pending."""
    return advance_to_mid_run(RunningJob.plan(root))


def advance_to_mid_run(job: RunningJob) -> RunningJob:
    job.commit(0)
    job.commit(1, quarantined=2)
    job.commit(2)
    job.hold(3)
    return job


def _parquet(table: pa.Table) -> bytes:
    buffer = io.BytesIO()
    pq.write_table(table, buffer)
    return buffer.getvalue()
