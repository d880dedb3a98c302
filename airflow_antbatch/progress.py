"""A read-only view of one job for people: the ledger's status plus the quarantine and a timeline.

``Ledger.status()`` answers from the workers' heartbeats; the status CLI and the UI also want
the quarantined records, the throughput over time and where the output and manifest are. The
heartbeats carry quarantined row counts and each worker's rows committed per 10 s, and the
quarantine files are one listing of ``_quarantine/`` (their footers read once each, for at most
``limit`` files), so a refresh never reads a record per shard: at a million shards that would
be a million GETs. Nothing here writes.
"""

from __future__ import annotations

import dataclasses
import re
import time
from collections import Counter
from typing import TYPE_CHECKING, Any

import pyarrow.parquet as pq

from airflow_antbatch import layout
from airflow_antbatch.layout import MANIFEST_NAME
from airflow_antbatch.ledger import LIVE_STATES, Ledger
from airflow_antbatch.store import AtomicStore

if TYPE_CHECKING:
    from airflow_antbatch.ledger import JobStatus, WorkerStatus

REASON_COLUMN = "_antbatch_reason"  # written beside each quarantined record by the worker
TIMELINE_BUCKETS = 30
MAX_QUARANTINE_FILES = 200  # listed in a snapshot; their row counts come from their footers


def is_stale(worker: WorkerStatus, lease_ttl_s: float) -> bool:
    """A worker that says it is running (or draining) but has not beaten for a lease TTL: dead,
    stuck or cut off.

    Its shards are taken over by others after the same TTL, so this is the moment to look at it.
    """
    return worker.state in LIVE_STATES and worker.last_beat_age_s >= lease_ttl_s


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
    max_shard_attempts: int | None = None  # the plan's: a finished job's failures count their tries by it

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
        # The caller's options (an Airflow connection's credentials) go over the spec's.
        self.output = AtomicStore(spec.output_uri, {**spec.storage_options, **(storage_options or {})})
        self._quarantine_rows: dict[str, int] = {}  # file name -> rows (files never change)
        self._reasons: dict[str, dict[str, int]] = {}

    @property
    def plan_uri(self) -> str:
        return self.ledger.plan_uri

    def snapshot(self, *, buckets: int = TIMELINE_BUCKETS) -> Snapshot:
        status = self.ledger.status()
        points = [point for worker in status.workers for point in worker.timeline]
        return Snapshot(
            plan_uri=self.plan_uri,
            output_uri=self.output.url,
            manifest_uri=self.output.uri(MANIFEST_NAME),
            lease_ttl_s=float(self.ledger.plan.spec.lease_ttl_s),
            status=status,
            quarantined_rows=sum(w.rows_quarantined for w in status.workers),
            quarantine_files=self._quarantine_files(),
            timeline=throughput_timeline(
                points,
                buckets=buckets,
                until=None if status.finished else time.time(),  # a stall shows as a drop to zero
            ),
            max_shard_attempts=self.ledger.plan.spec.max_shard_attempts,
        )

    def _quarantine_files(self) -> tuple[QuarantineFile, ...]:
        """This attempt's quarantine files: one listing, and each new file's footer read once."""
        pattern = re.compile(
            re.escape(layout.attempt_output_prefix(self.ledger.plan.attempt)) + r"(?P<shard>.+)-e[0-9]+\.parquet"
        )
        files = []
        for name in self.output.list(layout.QUARANTINE_DIR)[:MAX_QUARANTINE_FILES]:
            match = pattern.fullmatch(name)
            if match is None:
                continue
            uri = self.output.uri(f"{layout.QUARANTINE_DIR}/{name}")
            if name not in self._quarantine_rows:
                with self.output.fs.open(self.output.path(f"{layout.QUARANTINE_DIR}/{name}"), "rb") as handle:
                    self._quarantine_rows[name] = pq.read_metadata(handle).num_rows
            files.append(QuarantineFile(match.group("shard"), uri, self._quarantine_rows[name]))
        return tuple(files)

    def quarantine_reasons(self, files: tuple[QuarantineFile, ...], *, limit: int = 50) -> dict[str, dict[str, int]]:
        """{shard: {reason: records}} for up to ``limit`` quarantine files, each read once."""
        for q in files[:limit]:
            if q.shard_id not in self._reasons:
                table = pq.read_table(q.uri, columns=[REASON_COLUMN], filesystem=self.output.fs)
                self._reasons[q.shard_id] = dict(Counter(table.column(REASON_COLUMN).to_pylist()))
        return {q.shard_id: self._reasons[q.shard_id] for q in files[:limit]}


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
