"""The shard ledger: exactly-once committed output over a plain object store.

Layout under one job attempt's root (see docs/adr/0002-ledger-protocol.md)::

    plan.json                          the JobPlan, written once by the planner
    workers/<token>.json               one heartbeat per worker process, overwritten
    claims/<shard>/<epoch>.json        lease of one try at a shard (create-if-absent)
    releases/<shard>/<epoch>.json      that try gave the shard back: preempted or failed
    commits/<shard>.json               the shard's output is durable (create-if-absent)

A shard's tries are numbered epochs. Whoever creates ``claims/<shard>/<e>`` holds try ``e``.
Try ``e+1`` may be created once try ``e`` was released, or its owner's heartbeat stopped
moving for a lease TTL as measured by the observer's own clock (no clock sync assumed). The
first ``commits/<shard>`` create wins; every later commit, from a zombie included, is refused.
Output names are fixed per shard, so a late writer rewrites identical rows in the same place.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import socket
import threading
import time
import uuid
from typing import TYPE_CHECKING, Any

from airflow_antbatch.errors import LedgerCorruptError, SpecError
from airflow_antbatch.shards import JobPlan
from airflow_antbatch.states import ShardState, shard_state
from airflow_antbatch.store import AtomicStore

if TYPE_CHECKING:
    from collections.abc import Callable, Iterable

PLAN_FILE = "plan.json"
_WORKER_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,99}$")
# Heartbeat states after which the process holds nothing and will not write again.
_EXITED_STATES = frozenset({"finished", "preempted", "failed"})


@dataclasses.dataclass(frozen=True)
class WorkerIdentity:
    """One worker process: a stable id (the mapped task / pod slot) plus a fresh incarnation."""

    worker_id: str
    incarnation: str = dataclasses.field(default_factory=lambda: uuid.uuid4().hex[:12])

    def __post_init__(self) -> None:
        if not _WORKER_ID.match(self.worker_id):
            raise SpecError(
                f"worker id {self.worker_id!r} must be 1-100 letters, digits, '_', '.' or '-', "
                "starting with a letter or digit"
            )

    @property
    def token(self) -> str:
        return f"{self.worker_id}--{self.incarnation}"


@dataclasses.dataclass(frozen=True)
class Lease:
    """The right to process one try (epoch) of one shard."""

    shard_id: str
    epoch: int
    token: str


@dataclasses.dataclass(frozen=True)
class CommitRecord:
    shard_id: str
    epoch: int
    token: str
    file: str
    rows: int
    quarantined: int = 0  # bad records moved to ``quarantine_file`` instead of the output
    quarantine_file: str | None = None


@dataclasses.dataclass(frozen=True)
class WorkerStatus:
    token: str
    worker_id: str
    state: str
    shards_committed: int
    rows_committed: int
    rows_per_s: float
    last_beat_age_s: float
    current_shard: str | None


@dataclasses.dataclass(frozen=True)
class JobStatus:
    """What the sensor, the CLI and the UI show; computed by ``Ledger.status``."""

    planned: int
    committed: int
    leased: int
    failed: int
    rows_committed: int
    rows_planned: int | None
    rows_per_s: float
    eta_s: float | None
    workers: tuple[WorkerStatus, ...]
    failures: tuple[tuple[str, str], ...]

    @property
    def pending(self) -> int:
        return self.planned - self.committed - self.leased - self.failed

    @property
    def finished(self) -> bool:
        """Every shard is committed or failed for good: no worker has anything left to do."""
        return self.committed + self.failed == self.planned

    @property
    def succeeded(self) -> bool:
        return self.committed == self.planned

    def to_dict(self) -> dict[str, Any]:
        out = dataclasses.asdict(self)
        out["pending"] = self.pending
        out["finished"] = self.finished
        out["succeeded"] = self.succeeded
        out["failures"] = [{"shard": s, "error": e} for s, e in self.failures]
        return out


def _encode(kind: str, fields: dict[str, Any]) -> bytes:
    return json.dumps({"format": f"airflow-antbatch/{kind}", **fields}, sort_keys=True).encode()


def _decode(kind: str, data: bytes, source: str, required: Iterable[str]) -> dict[str, Any]:
    try:
        doc = json.loads(data)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise LedgerCorruptError(f"ledger file {source} is not JSON: {exc}") from exc
    if not isinstance(doc, dict) or doc.get("format") != f"airflow-antbatch/{kind}":
        raise LedgerCorruptError(f"ledger file {source} is not an airflow-antbatch {kind} record")
    missing = [k for k in required if k not in doc]
    if missing:
        raise LedgerCorruptError(f"ledger file {source} lacks {missing}")
    return doc


class _Liveness:
    """Decides whether a lease owner is gone, from heartbeats seen by this process's clock.

    An owner is gone when its heartbeat says it exited, or when its beat counter has not moved
    for a whole TTL since this observer first saw that value. Wall clocks of different pods
    are never compared.
    """

    def __init__(self, ttl_s: float, clock: Callable[[], float]) -> None:
        self._ttl = ttl_s
        self._clock = clock
        self._seen: dict[str, tuple[int, float]] = {}

    def gone(self, token: str, heartbeat: dict[str, Any] | None) -> bool:
        if heartbeat is not None and heartbeat.get("state") in _EXITED_STATES:
            return True
        beat = int(heartbeat["beat"]) if heartbeat is not None else -1
        now = self._clock()
        seen = self._seen.get(token)
        if seen is None or seen[0] != beat:
            self._seen[token] = (beat, now)
            return False
        return now - seen[1] >= self._ttl


class Ledger:
    """Claims, leases, commits and status for one job attempt."""

    def __init__(self, store: AtomicStore, plan: JobPlan, *, clock: Callable[[], float] = time.monotonic) -> None:
        self.store = store
        self.plan = plan
        self._clock = clock
        self._ttl = float(plan.spec.lease_ttl_s)
        self._liveness = _Liveness(self._ttl, clock)
        self._beat_cache: dict[str, tuple[float, dict[str, Any] | None]] = {}
        self._next_epoch: dict[str, int] = {}
        self._failures: dict[str, set[int]] = {}
        self._claims: dict[tuple[str, int], dict[str, Any]] = {}
        self._lock = threading.Lock()

    # -- opening ---------------------------------------------------------------------------

    @classmethod
    def open(cls, plan_uri: str, storage_options: dict[str, Any] | None = None) -> Ledger:
        """Open the ledger whose plan is at ``plan_uri`` (what ``--spec`` points workers to)."""
        root, name = plan_uri.rstrip("/").rsplit("/", 1)
        store = AtomicStore(root, storage_options)
        data = store.read(name)
        if data is None:
            raise FileNotFoundError(f"no job plan at {plan_uri}: run the plan step first")
        plan = JobPlan.from_json(data, source=plan_uri)
        return cls(store, plan)

    @property
    def plan_uri(self) -> str:
        return self.store.uri(PLAN_FILE)

    # -- heartbeats ------------------------------------------------------------------------

    def heartbeat(self, identity: WorkerIdentity, beat: int, *, state: str, stats: dict[str, Any]) -> None:
        """Overwrite this process's heartbeat; ``beat`` must grow while the process lives."""
        record = _encode(
            "heartbeat",
            {
                "worker_id": identity.worker_id,
                "token": identity.token,
                "beat": beat,
                "state": state,
                "time": time.time(),
                "host": socket.gethostname(),
                "pid": os.getpid(),
                **stats,
            },
        )
        self.store.put(f"workers/{identity.token}.json", record, kind="heartbeat")

    def _read_heartbeat(self, token: str) -> dict[str, Any] | None:
        """A recent read of ``token``'s heartbeat: at most one GET per owner per TTL/4."""
        now = self._clock()
        cached = self._beat_cache.get(token)
        if cached is not None and now - cached[0] < self._ttl / 4:
            return cached[1]
        rel = f"workers/{token}.json"
        data = self.store.read(rel)
        record = None if data is None else _decode("heartbeat", data, self.store.uri(rel), ("beat", "state"))
        self._beat_cache[token] = (now, record)
        return record

    # -- claiming --------------------------------------------------------------------------

    def committed_shards(self) -> set[str]:
        """Shards whose commit marker exists: one listing, done once at worker start."""
        return {name.removesuffix(".json") for name in self.store.list("commits") if name.endswith(".json")}

    def try_claim(self, shard_id: str, identity: WorkerIdentity) -> Lease | ShardState:
        """Take the shard's next free try, or say why not (committed, failed, or leased)."""
        epoch = self._next_epoch.get(shard_id, 0)
        checked_commit = False
        while len(self._failures.get(shard_id, ())) < self.plan.spec.max_shard_attempts:
            claim = {"shard": shard_id, "epoch": epoch, "token": identity.token, "worker_id": identity.worker_id}
            if self.store.create(self._claim_rel(shard_id, epoch), _encode("claim", claim)):
                self._next_epoch[shard_id] = epoch + 1
                return Lease(shard_id, epoch, identity.token)
            if not checked_commit:
                if self._read_commit(shard_id) is not None:
                    return ShardState.COMMITTED
                checked_commit = True
            if not self._try_is_over(shard_id, epoch, identity):
                self._next_epoch[shard_id] = epoch
                return ShardState.LEASED
            epoch += 1
        # A zombie's try may still have committed after the last failure: commit wins.
        return ShardState.COMMITTED if self._read_commit(shard_id) is not None else ShardState.FAILED

    def _try_is_over(self, shard_id: str, epoch: int, identity: WorkerIdentity) -> bool:
        """Whether try ``epoch`` of the shard was released or its owner is gone."""
        release = self._read_release(shard_id, epoch)
        if release is not None:
            if release.get("failed"):
                self._failures.setdefault(shard_id, set()).add(epoch)
            return True
        owner = self._read_claim(shard_id, epoch)
        if owner["worker_id"] == identity.worker_id and owner["token"] != identity.token:
            # An earlier incarnation of this same worker slot (a retried task or pod): it is
            # dead or being replaced, so its tries are over without waiting out the TTL.
            return True
        return self._liveness.gone(owner["token"], self._read_heartbeat(owner["token"]))

    def holds(self, lease: Lease) -> bool:
        """Fencing check before commit: no later try of the shard has been started."""
        return self.store.read(self._claim_rel(lease.shard_id, lease.epoch + 1)) is None

    def commit(
        self, lease: Lease, *, file: str, rows: int, quarantined: int = 0, quarantine_file: str | None = None
    ) -> bool:
        """Mark the shard done; call only once its output is durable. False if already committed."""
        record = {"shard": lease.shard_id, "epoch": lease.epoch, "token": lease.token, "file": file, "rows": rows}
        if quarantined:
            record.update(quarantined=quarantined, quarantine_file=quarantine_file)
        return self.store.create(f"commits/{lease.shard_id}.json", _encode("commit", record))

    def release(self, lease: Lease, *, reason: str, failed: bool, error: str | None = None) -> None:
        """Give the try back so another worker can start the next one without waiting a TTL."""
        record = {"shard": lease.shard_id, "epoch": lease.epoch, "token": lease.token, "reason": reason}
        record.update(failed=failed, error=error)
        self.store.create(self._release_rel(lease.shard_id, lease.epoch), _encode("release", record))
        if failed:
            self._failures.setdefault(lease.shard_id, set()).add(lease.epoch)

    # -- records ---------------------------------------------------------------------------

    @staticmethod
    def _claim_rel(shard_id: str, epoch: int) -> str:
        return f"claims/{shard_id}/{epoch:04d}.json"

    @staticmethod
    def _release_rel(shard_id: str, epoch: int) -> str:
        return f"releases/{shard_id}/{epoch:04d}.json"

    def _read_claim(self, shard_id: str, epoch: int) -> dict[str, Any]:
        key = (shard_id, epoch)
        if key not in self._claims:
            rel = self._claim_rel(shard_id, epoch)
            data = self.store.read(rel)
            if data is None:
                raise LedgerCorruptError(f"claim {self.store.uri(rel)} vanished: something deletes ledger files")
            self._claims[key] = _decode("claim", data, self.store.uri(rel), ("token", "worker_id"))
        return self._claims[key]

    def _read_release(self, shard_id: str, epoch: int) -> dict[str, Any] | None:
        rel = self._release_rel(shard_id, epoch)
        data = self.store.read(rel)
        return None if data is None else _decode("release", data, self.store.uri(rel), ("reason", "failed"))

    def _read_commit(self, shard_id: str) -> CommitRecord | None:
        rel = f"commits/{shard_id}.json"
        data = self.store.read(rel)
        if data is None:
            return None
        doc = _decode("commit", data, self.store.uri(rel), ("shard", "epoch", "token", "file", "rows"))
        return CommitRecord(
            doc["shard"],
            int(doc["epoch"]),
            doc["token"],
            doc["file"],
            int(doc["rows"]),
            int(doc.get("quarantined", 0)),
            doc.get("quarantine_file"),
        )

    def commit_records(self) -> list[CommitRecord]:
        """Every commit, read back in full (finalize): one listing plus one GET per shard."""
        records = [self._read_commit(shard_id) for shard_id in sorted(self.committed_shards())]
        return [r for r in records if r is not None]

    # -- status ----------------------------------------------------------------------------

    def status(self) -> JobStatus:
        """Shards by state, rows and throughput, from a handful of listings."""
        committed = self.committed_shards()
        latest_claim = {shard: max(epochs) for shard, epochs in self._epochs_listed("claims").items()}
        released = {s: e for s, e in self._epochs_listed("releases").items() if s not in committed}
        workers = self._worker_statuses()
        fresh = {w.token for w in workers if w.state == "running" and w.last_beat_age_s < self._ttl}
        failures: list[tuple[str, str]] = []
        counts = dict.fromkeys(ShardState, 0)
        for shard_id in self.plan.shard_ids:
            n_failed = 0
            for epoch in released.get(shard_id, []):
                release = self._read_release(shard_id, epoch)
                if release is not None and release.get("failed"):
                    n_failed += 1
                    failures.append((shard_id, str(release.get("error"))))
            latest = latest_claim.get(shard_id)
            live = (
                latest is not None
                and shard_id not in committed
                and latest not in released.get(shard_id, [])
                and self._read_claim(shard_id, latest)["token"] in fresh
            )
            state = shard_state(
                committed=shard_id in committed,
                failures=n_failed,
                max_attempts=self.plan.spec.max_shard_attempts,
                leased_by_live_owner=live,
            )
            counts[state] += 1
        return self._summarise(counts, workers, failures)

    def _epochs_listed(self, directory: str) -> dict[str, list[int]]:
        """``claims/`` or ``releases/`` as {shard: [epochs]}, for planned shards only."""
        planned = set(self.plan.shard_ids)
        out: dict[str, list[int]] = {}
        for name in self.store.list(directory):
            shard_id, _, epoch = name.removesuffix(".json").partition("/")
            if shard_id in planned and epoch.isdigit():
                out.setdefault(shard_id, []).append(int(epoch))
        return out

    def _summarise(
        self, counts: dict[ShardState, int], workers: list[WorkerStatus], failures: list[tuple[str, str]]
    ) -> JobStatus:
        rows = sum(w.rows_committed for w in workers)
        rate = sum(w.rows_per_s for w in workers if w.state == "running")
        planned = len(self.plan.shards)
        done = counts[ShardState.COMMITTED]
        remaining = planned - done - counts[ShardState.FAILED]
        eta: float | None = None
        if remaining == 0:
            eta = 0.0
        elif done and rate > 0:
            eta = remaining * (rows / done) / rate
        return JobStatus(
            planned=planned,
            committed=done,
            leased=counts[ShardState.LEASED],
            failed=counts[ShardState.FAILED],
            rows_committed=rows,
            rows_planned=self.plan.planned_rows,
            rows_per_s=rate,
            eta_s=eta,
            workers=tuple(workers),
            failures=tuple(failures),
        )

    def _worker_statuses(self) -> list[WorkerStatus]:
        now = time.time()
        out = []
        for name in self.store.list("workers"):
            rel = f"workers/{name}"
            data = self.store.read(rel)
            if data is None:
                continue
            doc = _decode("heartbeat", data, self.store.uri(rel), ("token", "worker_id", "beat", "state", "time"))
            out.append(
                WorkerStatus(
                    token=doc["token"],
                    worker_id=doc["worker_id"],
                    state=doc["state"],
                    shards_committed=int(doc.get("shards_committed", 0)),
                    rows_committed=int(doc.get("rows_committed", 0)),
                    rows_per_s=float(doc.get("rows_per_s", 0.0)),
                    last_beat_age_s=max(0.0, now - float(doc["time"])),
                    current_shard=doc.get("current_shard"),
                )
            )
        return out
