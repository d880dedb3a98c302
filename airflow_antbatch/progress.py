"""A read-only view of one job for people: the ledger's status plus what the commit records add.

``Ledger.status()`` answers from a few listings and the workers' heartbeats; the status CLI and
the UI also want the quarantined records, the throughput over time and where the output and
manifest are. Those come from the commit records (one GET per shard) and the commit markers'
modification times. Commit records are written once and never change, so :class:`JobProgress`
reads each one once and keeps it: a ``--watch`` loop or a polling page costs one listing plus
the new commits per refresh. Nothing here writes.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from typing import TYPE_CHECKING, Any

import pyarrow.parquet as pq

from airflow_antbatch.finalize import MANIFEST_NAME
from airflow_antbatch.ledger import Ledger
from airflow_antbatch.store import AtomicStore

if TYPE_CHECKING:
    from airflow_antbatch.ledger import CommitRecord, JobStatus, WorkerStatus

REASON_COLUMN = "_antbatch_reason"  # written beside each quarantined record by the worker
TIMELINE_BUCKETS = 30
_READ_THREADS = 16  # new commit records are read side by side: one GET each on an object store


def is_stale(worker: WorkerStatus, lease_ttl_s: float) -> bool:
    """A worker that says it is running but has not beaten for a lease TTL: dead, stuck or cut off.

    Its shards are taken over by others after the same TTL, so this is the moment to look at it.
    """
    return worker.state == "running" and worker.last_beat_age_s >= lease_ttl_s


@dataclasses.dataclass(frozen=True)
class QuarantineFile:
    shard_id: str
    uri: str
    rows: int


@dataclasses.dataclass(frozen=True)
class Snapshot:
    """Everything the status CLI and the UI show about a job at one moment."""

    plan_uri: str
    output_uri: str
    manifest_uri: str
    lease_ttl_s: float
    status: JobStatus
    quarantined_rows: int
    quarantine_files: tuple[QuarantineFile, ...]
    # (epoch seconds at the bucket's start, rows/s committed in the bucket), oldest first
    timeline: tuple[tuple[float, float], ...]

    def stale_workers(self) -> list[str]:
        return [w.token for w in self.status.workers if is_stale(w, self.lease_ttl_s)]

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON: the ledger's status fields at the top level, then what this view adds."""
        out = {"plan_uri": self.plan_uri, **self.status.to_dict()}
        for worker in out["workers"]:
            worker["stale"] = worker["token"] in self.stale_workers()
        out.update(
            output_uri=self.output_uri,
            manifest_uri=self.manifest_uri,
            lease_ttl_s=self.lease_ttl_s,
            quarantined_rows=self.quarantined_rows,
            quarantine_files=[dataclasses.asdict(q) for q in self.quarantine_files],
            timeline=[{"t": t, "rows_per_s": rate} for t, rate in self.timeline],
        )
        return out


class JobProgress:
    """Reads one job's ledger (never writes), remembering the immutable commit records it saw."""

    def __init__(self, plan_uri: str, storage_options: dict[str, Any] | None = None) -> None:
        self.ledger = Ledger.open(plan_uri, storage_options)
        spec = self.ledger.plan.spec
        self.output = AtomicStore(spec.output_uri, dict(spec.storage_options))
        self._commits: dict[str, CommitRecord] = {}
        self._reasons: dict[str, dict[str, int]] = {}

    @property
    def plan_uri(self) -> str:
        return self.ledger.plan_uri

    def snapshot(self, *, buckets: int = TIMELINE_BUCKETS) -> Snapshot:
        status = self.ledger.status()
        times = self._commit_times()
        self._read_new_commits(sorted(set(times) - set(self._commits)))
        records = [self._commits[s] for s in sorted(self._commits)]
        return Snapshot(
            plan_uri=self.plan_uri,
            output_uri=self.output.url,
            manifest_uri=self.output.uri(MANIFEST_NAME),
            lease_ttl_s=float(self.ledger.plan.spec.lease_ttl_s),
            status=status,
            quarantined_rows=sum(r.quarantined for r in records),
            quarantine_files=tuple(
                QuarantineFile(r.shard_id, self.output.uri(r.quarantine_file), r.quarantined)
                for r in records
                if r.quarantine_file
            ),
            timeline=throughput_timeline(
                [(times[r.shard_id], r.rows) for r in records if r.shard_id in times],
                buckets=buckets,
                until=None if status.finished else time.time(),  # a stall shows as a drop to zero
            ),
        )

    def quarantine_reasons(self, files: tuple[QuarantineFile, ...], *, limit: int = 50) -> dict[str, dict[str, int]]:
        """{shard: {reason: records}} for up to ``limit`` quarantine files, each read once."""
        for q in files[:limit]:
            if q.shard_id not in self._reasons:
                table = pq.read_table(q.uri, columns=[REASON_COLUMN], filesystem=self.output.fs)
                self._reasons[q.shard_id] = dict(Counter(table.column(REASON_COLUMN).to_pylist()))
        return {q.shard_id: self._reasons[q.shard_id] for q in files[:limit]}

    def _commit_times(self) -> dict[str, float]:
        """{shard: when its commit marker was written}, from one detailed listing."""
        store = self.ledger.store
        base = store.path("commits")
        store.fs.invalidate_cache(base)
        try:
            found = store.fs.find(base, detail=True)
        except FileNotFoundError:
            return {}
        planned = set(self.ledger.plan.shard_ids)
        out = {}
        for path, info in found.items():
            shard_id = path.rsplit("/", 1)[-1].removesuffix(".json")
            if shard_id in planned and path.endswith(".json"):
                out[shard_id] = _modified(info)
        return out

    def _read_new_commits(self, shard_ids: list[str]) -> None:
        with ThreadPoolExecutor(min(_READ_THREADS, max(1, len(shard_ids)))) as pool:
            for record in pool.map(self.ledger._read_commit, shard_ids):
                if record is not None:
                    self._commits[record.shard_id] = record


def throughput_timeline(
    commits: list[tuple[float, int]], *, buckets: int, until: float | None = None
) -> tuple[tuple[float, float], ...]:
    """Rows/s committed per time bucket, from the first commit to the last one (or to ``until``)."""
    if not commits:
        return ()
    start = min(t for t, _ in commits)
    end = max([t for t, _ in commits] + ([until] if until is not None else []))
    width = max(1.0, (end - start) / buckets)
    n = min(buckets, int((end - start) // width) + 1)
    rows = [0] * n
    for t, count in commits:
        rows[min(n - 1, int((t - start) // width))] += count
    return tuple((start + i * width, rows[i] / width) for i in range(n))


def _modified(info: dict[str, Any]) -> float:
    """A listing entry's modification time in epoch seconds (local, memory and S3 name it differently)."""
    for key in ("mtime", "LastModified", "last_modified", "created"):
        value = info.get(key)
        if isinstance(value, dt.datetime):
            return value.timestamp()
        if isinstance(value, int | float):
            return float(value)
    return time.time()
