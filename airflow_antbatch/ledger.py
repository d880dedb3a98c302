"""The shard ledger: exactly-once committed output over a plain object store.

Layout under one job attempt's root: see :mod:`airflow_antbatch.layout` and
docs/adr/0002-ledger-protocol.md. A shard's tries are numbered epochs. Whoever creates the
claim of epoch ``e`` holds try ``e``. Try ``e+1`` may be created once try ``e`` was released,
or its owner's heartbeat stopped moving for a lease TTL as measured by the observer's own clock
(no clock sync assumed). The first commit create wins; every later commit, from a zombie
included, is refused. Each try writes its own output file and the commit names the one that won,
so a late writer never changes a committed file.

Which shard a worker tries next is :mod:`airflow_antbatch.worker.claims`' business; this module
holds the records and the rules. Status comes from the heartbeats (each carries its worker's
counts) and two listings of the workers, never from a per-shard read.
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
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from typing import TYPE_CHECKING, Any

from airflow_antbatch import layout
from airflow_antbatch.errors import LedgerCorruptError, SpecError
from airflow_antbatch.shards import JobPlan
from airflow_antbatch.states import ShardState, shard_state
from airflow_antbatch.store import AtomicStore

if TYPE_CHECKING:
    from collections.abc import Callable, Hashable, Iterable

_WORKER_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,99}$")
# Heartbeat states after which the process holds nothing and will not write again.
EXITED_STATES = frozenset({"finished", "preempted", "failed"})
# A stopped worker finishing the tries it kept before its exit (NOTE [drain] in worker/drain.py).
DRAINING = "draining"
# Heartbeat states of a process that holds tries and beats: what a job's status counts as live.
LIVE_STATES = frozenset({"running", DRAINING})
_READ_THREADS = 32  # records read side by side (finalize, status): one GET each on an object store
_HEARTBEAT_FIELDS = ("token", "worker_id", "beat", "state", "time")  # what every heartbeat holds
_RECENT_FAILURES = 20  # failed tries a heartbeat carries, newest last


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

    def earlier_incarnation(self, token: str) -> bool:
        """Whether ``token`` is another process of this worker id: one this one replaced."""
        return token != self.token and token.startswith(f"{self.worker_id}--")


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
    sha256: str | None = None  # of ``file``'s bytes: the committed file never changes after this


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
    leases: tuple[str, ...] = ()
    rows_quarantined: int = 0
    # (epoch seconds at a bucket's start, rows this worker committed in it), by the worker's clock
    timeline: tuple[tuple[float, int], ...] = ()
    beat: int = 0  # grows while the process lives: observers time its changes by their own clock
    rows_lost: int = 0  # rows it scored whose shard another try committed first (backups, zombies)
    # Its idle marker is up: it found nothing to claim and holds nothing (``status(idle=True)`` only)
    idle: bool = False


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
    stopped: str | None = None  # the error that stopped the whole job (``same_error_limit``)

    @property
    def pending(self) -> int:
        return max(0, self.planned - self.committed - self.leased - self.failed)

    @property
    def finished(self) -> bool:
        """Every shard is committed or failed for good, or the job was stopped: no worker has
        anything left to do."""
        return self.stopped is not None or self.committed + self.failed == self.planned

    @property
    def succeeded(self) -> bool:
        return self.committed == self.planned

    @property
    def rows_wasted(self) -> int:
        """Rows scored by tries that lost the race to commit (speculative backups, zombies)."""
        return sum(w.rows_lost for w in self.workers)

    def to_dict(self) -> dict[str, Any]:
        out = dataclasses.asdict(self)
        out["pending"] = self.pending
        out["finished"] = self.finished
        out["succeeded"] = self.succeeded
        out["rows_wasted"] = self.rows_wasted
        out["failures"] = [{"shard": s, "error": e} for s, e in self.failures]
        return out


@dataclasses.dataclass(frozen=True)
class Sweep:
    """Every shard's final state, from listings: what decides that a job is done."""

    committed: frozenset[str]
    failures: dict[str, list[str]]  # shard -> errors of its failed tries, for shards not committed
    max_attempts: int

    @property
    def failed(self) -> frozenset[str]:
        return frozenset(
            shard
            for shard, errors in self.failures.items()
            if shard_state(
                committed=False, failures=len(errors), max_attempts=self.max_attempts, leased_by_live_owner=False
            )
            is ShardState.FAILED
        )


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


class Liveness:
    """Decides whether a worker is gone, from what this process saw of it, by its own clock.

    A worker is gone when its heartbeat says it exited, or when its mark (the beat counter, or
    the heartbeat object's version in a listing) has not moved for a whole TTL since this
    observer first saw that mark. Wall clocks of different pods are never compared.
    """

    def __init__(self, ttl_s: float, clock: Callable[[], float]) -> None:
        self._ttl = ttl_s
        self._clock = clock
        self._seen: dict[str, tuple[Hashable, float]] = {}
        self.judged_gone: set[str] = set()  # by another mark (a listing's version), same clock

    def gone(self, token: str, heartbeat: dict[str, Any] | None) -> bool:
        if token in self.judged_gone or (heartbeat is not None and heartbeat.get("state") in EXITED_STATES):
            return True
        return self.unchanged_for_ttl(token, int(heartbeat["beat"]) if heartbeat is not None else -1)

    def unchanged_for_ttl(self, token: str, mark: Hashable) -> bool:
        now = self._clock()
        seen = self._seen.get(token)
        if seen is None or seen[0] != mark:
            self._seen[token] = (mark, now)
            return False
        return now - seen[1] >= self._ttl


class Ledger:
    """Claims, leases, commits and status for one job attempt."""

    def __init__(self, store: AtomicStore, plan: JobPlan, *, clock: Callable[[], float] = time.monotonic) -> None:
        self.store = store
        self.plan = plan
        self.clock = clock
        self.ttl_s = float(plan.spec.lease_ttl_s)
        self._liveness = Liveness(self.ttl_s, clock)  # by beat counters read from heartbeats
        self._listed_liveness = Liveness(self.ttl_s, clock)  # by heartbeat versions in listings
        self._beat_cache: dict[str, tuple[float, dict[str, Any] | None]] = {}
        self._found_held = ("", 0)  # the shard and try try_claim last found held: left_to_predecessor
        self._status_beats: dict[str, tuple[str, dict[str, Any]]] = {}  # token -> (version, record)
        self._next_epoch: dict[str, int] = {}
        self._failures: dict[str, set[int]] = {}
        self._claims: dict[tuple[str, int], dict[str, Any]] = {}
        self.recent_failures: deque[tuple[str, int, str]] = deque(maxlen=_RECENT_FAILURES)
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
        plan = JobPlan.from_bytes(data, source=plan_uri)
        return cls(store, plan)

    @property
    def plan_uri(self) -> str:
        return self.store.uri(layout.PLAN_FILE)

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
                "failures": [list(f) for f in self.recent_failures],
                **stats,
            },
        )
        self.store.put(layout.heartbeat_key(identity.token), record, kind="heartbeat")

    def read_heartbeat(self, token: str) -> dict[str, Any] | None:
        """``token``'s heartbeat as it is now: one GET."""
        rel = layout.heartbeat_key(token)
        data = self.store.read(rel)
        return None if data is None else _decode("heartbeat", data, self.store.uri(rel), _HEARTBEAT_FIELDS)

    def _recent_heartbeat(self, token: str) -> dict[str, Any] | None:
        """A recent read of ``token``'s heartbeat: at most one GET per owner per TTL/4."""
        now = self.clock()
        cached = self._beat_cache.get(token)
        if cached is not None and now - cached[0] < self.ttl_s / 4:
            return cached[1]
        record = self.read_heartbeat(token)
        self._beat_cache[token] = (now, record)
        return record

    def worker_versions(self) -> dict[str, str]:
        """Every worker process that ever beat, with its heartbeat's version: one listing, no reads."""
        return {
            name.removesuffix(".json"): version
            for name, version in self.store.list_versions(layout.WORKERS_DIR).items()
            if name.endswith(".json")
        }

    def unchanged_for_ttl(self, token: str, version: str) -> bool:
        """Whether ``token``'s heartbeat has kept ``version`` for a TTL of this observer's clock;
        if so, its tries count as over for this ledger's claims too."""
        if not self._listed_liveness.unchanged_for_ttl(token, version):
            return False
        self._liveness.judged_gone.add(token)
        return True

    def split_run(self, victim_token: str, end: int, split: int, identity: WorkerIdentity) -> int | None:
        """Take ``[split, end)`` of ``victim_token``'s run: None if this call did, else the split
        point of the thief that took that run's end first (the run now ends there for everyone).

        The victim learns of it only when its own claim at the split point fails; the record is
        what keeps thieves reading the same heartbeat from splitting the same run twice.
        """
        rel = layout.steal_key(victim_token, end)
        record = _encode("steal", {"victim": victim_token, "end": end, "split": split, "thief": identity.token})
        if self.store.create(rel, record):
            return None
        data = self.store.read(rel)
        if data is None:
            raise LedgerCorruptError(f"steal record {self.store.uri(rel)} vanished: something deletes ledger files")
        return int(_decode("steal", data, self.store.uri(rel), ("split",))["split"])

    def mark_idle(self, identity: WorkerIdentity) -> None:
        """Say that this process has nothing left to claim (it still watches and beats)."""
        self.store.create(layout.idle_key(identity.token), b"")

    def clear_idle(self, identity: WorkerIdentity) -> None:
        self.store.delete(layout.idle_key(identity.token))

    def idle_tokens(self) -> set[str]:
        return set(self.store.list(layout.IDLE_DIR))

    # -- the end of the job ----------------------------------------------------------------

    def read_done(self) -> dict[str, Any] | None:
        """The record that every shard is committed or failed, once a worker has verified it."""
        data = self.store.read(layout.DONE_FILE)
        if data is None:
            return None
        return _decode("done", data, self.store.uri(layout.DONE_FILE), ("committed", "failed"))

    def sweep(self) -> Sweep:
        """Final states of all shards: a listing of commits and one of releases (never of claims).

        Costs one request per 1,000 commits plus one per release: done rarely (at a job's end,
        or when no worker is alive), never per claim.
        """
        committed = frozenset(self._listed_commits())
        failures: dict[str, list[str]] = {}
        released = [
            layout.shard_of_listed(name) for name in self.store.list(layout.RELEASES_DIR) if name.endswith(".json")
        ]
        pending = [(shard, epoch) for shard, epoch in released if shard not in committed and epoch is not None]
        for (shard, _), record in zip(pending, self._read_all(self._read_release, pending), strict=True):
            if record is not None and record.get("failed"):
                failures.setdefault(shard, []).append(str(record.get("error")))
        return Sweep(committed, failures, self.plan.spec.max_shard_attempts)

    def write_stop(self, error: str, shards: list[str]) -> bool:
        """Stop the whole job: every worker that reads this stops claiming. True if this call wrote it."""
        record = {"committed": None, "failed": shards, "errors": dict.fromkeys(shards, error), "stopped": error}
        return self.store.create(layout.DONE_FILE, _encode("done", record))

    def write_done(self, sweep: Sweep) -> bool:
        """Record that the job is over; True if this call wrote it (create-if-absent)."""
        failed = sorted(sweep.failed)
        record = {
            "committed": len(sweep.committed),
            "failed": failed,
            "errors": {s: sweep.failures[s][-1] for s in failed},
        }
        return self.store.create(layout.DONE_FILE, _encode("done", record))

    # -- claiming --------------------------------------------------------------------------

    def try_claim(
        self, shard_id: str, identity: WorkerIdentity, *, investigate: bool = True, own_slot: bool = True
    ) -> Lease | ShardState:
        """Take the shard's next free try, or say why not (committed, failed, or leased).

        Without ``investigate`` a try held by another worker is reported as leased at once,
        without reading its release or its owner's heartbeat: what a worker walking a run
        wants, since another claim there means another worker got there first. Only in its
        own slot's run (``own_slot``) does it read the claim, to take an earlier incarnation's
        tries over at once.
        """
        epoch = self._next_epoch.get(shard_id, 0)
        checked_commit = False
        if epoch > 0:  # this process had a try before: it may have been committed since
            if self._read_commit(shard_id) is not None:
                return ShardState.COMMITTED
            checked_commit = True
        while len(self._failures.get(shard_id, ())) < self.plan.spec.max_shard_attempts:
            claim = {"shard": shard_id, "epoch": epoch, "token": identity.token, "worker_id": identity.worker_id}
            if self.store.create(layout.claim_key(shard_id, epoch), _encode("claim", claim)):
                self._next_epoch[shard_id] = epoch + 1
                return Lease(shard_id, epoch, identity.token)
            if not checked_commit:
                if self._read_commit(shard_id) is not None:
                    return ShardState.COMMITTED
                checked_commit = True
            self._found_held = (shard_id, epoch)
            if not investigate and not (own_slot and self._my_earlier_incarnation(shard_id, epoch, identity)):
                return ShardState.LEASED
            if not self._try_is_over(shard_id, epoch, identity):
                self._next_epoch[shard_id] = epoch
                return ShardState.LEASED
            epoch += 1
        # A zombie's try may still have committed after the last failure: commit wins.
        return ShardState.COMMITTED if self._read_commit(shard_id) is not None else ShardState.FAILED

    def _my_earlier_incarnation(self, shard_id: str, epoch: int, identity: WorkerIdentity) -> bool:
        owner = self._read_claim(shard_id, epoch)
        return identity.earlier_incarnation(str(owner["token"]))

    def _try_is_over(self, shard_id: str, epoch: int, identity: WorkerIdentity) -> bool:
        """Whether try ``epoch`` of the shard was released or its owner is gone."""
        release = self._read_release((shard_id, epoch))
        if release is not None:
            if release.get("failed"):
                self._failures.setdefault(shard_id, set()).add(epoch)
            return True
        owner = self._read_claim(shard_id, epoch)["token"]
        if identity.earlier_incarnation(owner):
            # An earlier incarnation of this same worker slot (a retried task or pod): it is
            # dead or being replaced, so its tries are over without waiting out the TTL, unless
            # it is finishing them in its grace period (NOTE [drain] in worker/drain.py).
            return not self._draining(owner)
        return self._liveness.gone(owner, self._recent_heartbeat(owner))

    def _draining(self, token: str) -> bool:
        heartbeat = self._recent_heartbeat(token)
        if heartbeat is None or heartbeat.get("state") != DRAINING:
            return False
        return not self._liveness.gone(token, heartbeat)

    def left_to_predecessor(self, shard_id: str, identity: WorkerIdentity) -> bool:
        """Whether the try of the shard that ``try_claim`` last found held belongs to an earlier
        incarnation of this worker finishing it before its exit (NOTE [drain]): the heir walks
        on past it. No request: the claim and the heartbeat were read to find it held."""
        held, epoch = self._found_held
        claim = self._claims.get((shard_id, epoch)) if held == shard_id else None
        if claim is None or not identity.earlier_incarnation(str(claim["token"])):
            return False
        return self._draining(str(claim["token"]))

    def back_up(self, shard_id: str, epoch: int, identity: WorkerIdentity) -> Lease | None:
        """Start a speculative backup of try ``epoch``, which its owner still holds: try
        ``epoch + 1``, marked as a backup so that it does not fence the original out. Both run;
        the first commit wins. None if the shard is committed (the heartbeat that suggested the
        backup may be a few shards old) or try ``epoch + 1`` exists already (one backup per try)."""
        if self._read_commit(shard_id) is not None:
            return None
        claim = {"shard": shard_id, "epoch": epoch + 1, "token": identity.token, "worker_id": identity.worker_id}
        if not self.store.create(layout.claim_key(shard_id, epoch + 1), _encode("claim", {**claim, "backup": True})):
            return None
        self._next_epoch[shard_id] = epoch + 2
        return Lease(shard_id, epoch + 1, identity.token)

    def holds(self, lease: Lease) -> bool:
        """Fencing check before commit: no later try of the shard has been started, other than a
        backup of this one (which races it to the commit instead)."""
        rel = layout.claim_key(lease.shard_id, lease.epoch + 1)
        data = self.store.read(rel)
        return data is None or bool(_decode("claim", data, self.store.uri(rel), ("token",)).get("backup"))

    def backed_up(self, lease: Lease) -> bool:
        """Whether another worker started a backup of this try (one GET): its holder may hand
        a try it has not started to the backup, or race it with the one it is scoring."""
        return self.store.read(layout.claim_key(lease.shard_id, lease.epoch + 1)) is not None

    def committed_by_another(self, lease: Lease) -> bool:
        """Whether another try of the shard has committed (one GET): this one can stop at once."""
        record = self._read_commit(lease.shard_id)
        return record is not None and record.epoch != lease.epoch

    def commit(
        self,
        lease: Lease,
        *,
        file: str,
        rows: int,
        sha256: str | None = None,
        quarantined: int = 0,
        quarantine_file: str | None = None,
    ) -> bool:
        """Mark the shard done with this try's file; call only once it is durable. False if already committed."""
        record: dict[str, Any] = {
            "shard": lease.shard_id,
            "epoch": lease.epoch,
            "token": lease.token,
            "file": file,
            "rows": rows,
            "sha256": sha256,
        }
        if quarantined:
            record.update(quarantined=quarantined, quarantine_file=quarantine_file)
        return self.store.create(layout.commit_key(lease.shard_id), _encode("commit", record))

    def release(self, lease: Lease, *, reason: str, failed: bool, error: str | None = None) -> None:
        """Give the try back so another worker can start the next one without waiting a TTL."""
        record = {"shard": lease.shard_id, "epoch": lease.epoch, "token": lease.token, "reason": reason}
        record.update(failed=failed, error=error)
        self.store.create(layout.release_key(lease.shard_id, lease.epoch), _encode("release", record))
        if failed:
            self._failures.setdefault(lease.shard_id, set()).add(lease.epoch)
            self.recent_failures.append((lease.shard_id, lease.epoch, str(error)))

    # -- records ---------------------------------------------------------------------------

    def _read_claim(self, shard_id: str, epoch: int) -> dict[str, Any]:
        key = (shard_id, epoch)
        if key not in self._claims:
            rel = layout.claim_key(shard_id, epoch)
            data = self.store.read(rel)
            if data is None:
                raise LedgerCorruptError(f"claim {self.store.uri(rel)} vanished: something deletes ledger files")
            self._claims[key] = _decode("claim", data, self.store.uri(rel), ("token", "worker_id"))
        return self._claims[key]

    def _read_release(self, key: tuple[str, int | None]) -> dict[str, Any] | None:
        shard_id, epoch = key
        rel = layout.release_key(shard_id, epoch or 0)
        data = self.store.read(rel)
        return None if data is None else _decode("release", data, self.store.uri(rel), ("reason", "failed"))

    def _read_commit(self, shard_id: str) -> CommitRecord | None:
        rel = layout.commit_key(shard_id)
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
            doc.get("sha256"),
        )

    def committed_shards(self) -> set[str]:
        """Shards whose commit record exists: one listing of commits/ (a page per 1,000)."""
        return set(self._listed_commits())

    def _listed_commits(self) -> list[str]:
        return sorted(
            layout.shard_of_listed(name)[0] for name in self.store.list(layout.COMMITS_DIR) if name.endswith(".json")
        )

    def commit_records(self) -> list[CommitRecord]:
        """Every commit, read back in full (finalize): one listing plus one GET per shard, side by side."""
        records = self._read_all(self._read_commit, self._listed_commits())
        return [r for r in records if r is not None]

    def _read_all(self, read: Callable[[Any], Any], keys: list[Any]) -> list[Any]:
        if len(keys) <= 1:
            return [read(k) for k in keys]
        with ThreadPoolExecutor(min(_READ_THREADS, len(keys))) as pool:
            return list(pool.map(read, keys))

    # -- status ----------------------------------------------------------------------------

    def status(self, *, idle: bool = False) -> JobStatus:
        """Shards by state, rows and throughput: from the heartbeats, never a per-shard read.

        One listing of ``workers/`` plus a GET of each heartbeat that changed since this Ledger
        last looked, and one GET of ``done.json``. Only when no worker is running and no worker
        has recorded the end does it list the commits (a page per 1,000) to settle the count.
        With ``idle``, one more listing (``idle/``) sets ``WorkerStatus.idle``: a worker's marker
        goes up and down as it runs out of work and claims again, fresher than its heartbeat
        (the elastic pool lets such a worker's pod go on its next tick).
        """
        done = self.read_done()
        beats = self._heartbeats()
        marked = self.idle_tokens() if idle else set()
        workers = [_worker_status(doc, doc["token"] in marked) for doc in beats]
        live = [w for w in workers if w.state in LIVE_STATES and w.last_beat_age_s < self.ttl_s]
        failures = _failures_from(beats)
        counts = dict.fromkeys(ShardState, 0)
        stopped = None if done is None else done.get("stopped")
        if done is not None and stopped is not None:
            counts[ShardState.COMMITTED] = min(len(self.plan.shards), sum(w.shards_committed for w in workers))
            counts[ShardState.FAILED] = len(done["failed"])
            failures = [(s, str(e)) for s, e in sorted(done.get("errors", {}).items())]
        elif done is not None:
            counts[ShardState.COMMITTED] = int(done["committed"])
            counts[ShardState.FAILED] = len(done["failed"])
            failures = [(s, str(e)) for s, e in sorted(done.get("errors", {}).items())] or failures
        elif live:
            committed = min(len(self.plan.shards), sum(w.shards_committed for w in workers))
            failed = {s for s, n in _failure_counts(failures).items() if n >= self.plan.spec.max_shard_attempts}
            counts[ShardState.COMMITTED] = committed
            counts[ShardState.FAILED] = min(len(self.plan.shards) - committed, len(failed))
            counts[ShardState.LEASED] = min(
                len(self.plan.shards) - committed - counts[ShardState.FAILED], sum(len(w.leases) for w in live)
            )
        else:
            sweep = self.sweep()
            counts[ShardState.COMMITTED] = len(sweep.committed)
            counts[ShardState.FAILED] = len(sweep.failed)
            failures = [(s, e) for s in sorted(sweep.failures) for e in sweep.failures[s]]
        return self._summarise(counts, workers, failures, stopped)

    def _heartbeats(self) -> list[dict[str, Any]]:
        """Every heartbeat, re-read only where its version moved since the last status."""
        versions = self.worker_versions()
        stale = [t for t, v in versions.items() if self._status_beats.get(t, ("", {}))[0] != v]
        for token, doc in zip(stale, self._read_all(self.read_heartbeat, stale), strict=True):
            if doc is not None:
                self._status_beats[token] = (versions[token], doc)
        return [self._status_beats[t][1] for t in sorted(versions) if t in self._status_beats]

    def _summarise(
        self,
        counts: dict[ShardState, int],
        workers: list[WorkerStatus],
        failures: list[tuple[str, str]],
        stopped: str | None = None,
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
            stopped=stopped,
        )


def _worker_status(doc: dict[str, Any], idle: bool) -> WorkerStatus:
    return WorkerStatus(
        token=doc["token"],
        worker_id=doc["worker_id"],
        state=doc["state"],
        shards_committed=int(doc.get("shards_committed", 0)),
        rows_committed=int(doc.get("rows_committed", 0)),
        rows_per_s=float(doc.get("rows_per_s", 0.0)),
        last_beat_age_s=max(0.0, time.time() - float(doc["time"])),
        current_shard=doc.get("current_shard"),
        leases=tuple(doc.get("leases", ())),
        rows_quarantined=int(doc.get("rows_quarantined", 0)),
        timeline=tuple((float(t), int(n)) for t, n in doc.get("timeline", ())),
        beat=int(doc["beat"]),
        rows_lost=int(doc.get("rows_lost", 0)),
        idle=idle,
    )


def _failures_from(beats: list[dict[str, Any]]) -> list[tuple[str, str]]:
    """Failed tries the heartbeats report, each (shard, epoch) once, in shard order."""
    seen: dict[tuple[str, int], str] = {}
    for doc in beats:
        for shard, epoch, error in doc.get("failures", ()):
            seen[(str(shard), int(epoch))] = str(error)
    return [(shard, seen[(shard, epoch)]) for shard, epoch in sorted(seen)]


def _failure_counts(failures: list[tuple[str, str]]) -> dict[str, int]:
    counts: dict[str, int] = {}
    for shard, _ in failures:
        counts[shard] = counts.get(shard, 0) + 1
    return counts
