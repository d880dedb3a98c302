"""The ledger's conformance suite: one protocol, checked on memory, local files, moto and SeaweedFS.

Each simulated worker gets its own ``Ledger`` (its own caches and its own view of liveness), as
separate processes would, and all of them share one fake monotonic clock, so lease expiry is
exercised without sleeping. The property-based tests at the end drive random interleavings of
claims, heartbeats, deaths, zombie commits, releases and failures on the memory backend.
"""

from __future__ import annotations

import dataclasses
import json
import pathlib
import re
import uuid
from collections import Counter

import pyarrow.parquet as pq
import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from airflow_antbatch import layout
from airflow_antbatch.errors import LedgerCorruptError, SpecError
from airflow_antbatch.examples import tabular
from airflow_antbatch.layout import PLAN_FILE
from airflow_antbatch.ledger import DRAINING, Lease, Ledger, WorkerIdentity
from airflow_antbatch.planning import plan_job
from airflow_antbatch.shards import JobPlan, Piece, Shard
from airflow_antbatch.spec import JobSpec
from airflow_antbatch.states import ShardState
from airflow_antbatch.store import AtomicStore
from airflow_antbatch.worker.job_code import JobCode
from airflow_antbatch.worker.loop import Worker
from tests.conftest import TABULAR
from tests.s3_servers import StoreLocation

TTL = 8.0
ROWS_PER_SHARD = 10
# Ledger requests a shard may cost on the happy path, output data and heartbeats aside
# (ADR 0002 says 3: create claim, fencing read, create commit).
MAX_REQUESTS_PER_SHARD = 6


class FakeClock:
    """A monotonic clock that moves only when a test says so."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


def make_plan(root: str, storage_options: dict[str, object], *, shards: int, max_attempts: int) -> JobPlan:
    """A plan built by hand: the ledger needs shard ids and the spec's TTL, not real input."""
    spec = JobSpec(
        input_uri=f"{root}/in",
        output_uri=f"{root}/out",
        model=f"{TABULAR}:build_model",
        state_uri=f"{root}/state",
        lease_ttl_s=TTL,
        max_shard_attempts=max_attempts,
        storage_options=storage_options,
    )
    pieces = [
        Piece(f"{root}/in/part-{i}.parquet", size=100, rows=ROWS_PER_SHARD, row_groups=(0,)) for i in range(shards)
    ]
    return JobPlan(
        spec=spec,
        attempt=0,
        fingerprint="0" * 64,
        input_format="parquet",
        shards=tuple(Shard(f"{i:05d}-{uuid.uuid4().hex[:8]}", (p,)) for i, p in enumerate(pieces)),
        created_at="2026-01-01T00:00:00+00:00",
    )


@dataclasses.dataclass
class Job:
    """One job attempt's ledger root with its plan written, and the clock every observer uses."""

    root: str
    storage_options: dict[str, object]
    plan: JobPlan
    clock: FakeClock

    @classmethod
    def create(cls, location: StoreLocation, *, shards: int = 3, max_attempts: int = 3) -> Job:
        plan = make_plan(location.url, location.storage_options, shards=shards, max_attempts=max_attempts)
        root = f"{plan.spec.state_root}/attempt-000"
        assert AtomicStore(root, location.storage_options).create(PLAN_FILE, plan.to_bytes())
        return cls(root, location.storage_options, plan, FakeClock())

    @property
    def shard_ids(self) -> tuple[str, ...]:
        return self.plan.shard_ids

    def store(self) -> AtomicStore:
        return AtomicStore(self.root, self.storage_options)

    def ledger(self) -> Ledger:
        return Ledger(self.store(), self.plan, clock=self.clock)

    def worker(self, worker_id: str) -> Proc:
        return Proc(self, WorkerIdentity(worker_id))


class Proc:
    """A simulated worker process: identity, private ledger view and a growing beat counter."""

    def __init__(self, job: Job, identity: WorkerIdentity) -> None:
        self.job = job
        self.identity = identity
        self.ledger = job.ledger()
        self.beats = 0
        self.committed = 0
        self.held: set[str] = set()
        self.beat()

    def restarted(self) -> Proc:
        """The same worker slot in a fresh process (a retried task or pod): a new incarnation."""
        return Proc(self.job, WorkerIdentity(self.identity.worker_id))

    def beat(self, state: str = "running", **stats: object) -> None:
        """A heartbeat with this process's counts and leases, as the worker writes it."""
        self.beats += 1
        counts = {"shards_committed": self.committed, "rows_committed": self.committed * ROWS_PER_SHARD}
        stats = {**counts, "leases": sorted(self.held), **stats}
        self.ledger.heartbeat(self.identity, self.beats, state=state, stats=stats)

    def claim(self, shard_id: str) -> Lease | ShardState:
        return self.ledger.try_claim(shard_id, self.identity)

    def lease(self, shard_id: str) -> Lease:
        outcome = self.claim(shard_id)
        assert isinstance(outcome, Lease), f"{self.identity.worker_id} could not claim {shard_id}: {outcome}"
        self.held.add(shard_id)
        return outcome

    def finish(self, lease: Lease) -> bool:
        """Fencing read, then commit, then a beat with the new counts, as the worker loop does."""
        committed = self.ledger.holds(lease) and self.ledger.commit(
            lease, file=layout.output_name(0, lease.shard_id, lease.epoch), rows=ROWS_PER_SHARD
        )
        self.held.discard(lease.shard_id)
        self.committed += committed
        self.beat()
        return committed


@pytest.fixture
def job(store_location: StoreLocation) -> Job:
    return Job.create(store_location)


def commit_record(job: Job, shard_id: str) -> dict[str, object] | None:
    data = job.store().read(layout.commit_key(shard_id))
    return None if data is None else json.loads(data)


# -- the protocol, on every backend -------------------------------------------------------------


class TestLedgerProtocol:
    def test_claim_and_commit(self, job: Job) -> None:
        a, b = job.worker("a"), job.worker("b")
        s0 = job.shard_ids[0]
        lease = a.lease(s0)
        assert (lease.shard_id, lease.epoch, lease.token) == (s0, 0, a.identity.token)
        assert a.ledger.holds(lease)
        assert a.ledger.commit(lease, file=layout.output_name(0, s0, 0), rows=7) is True
        assert b.claim(s0) is ShardState.COMMITTED
        assert a.ledger.commit(lease, file="again", rows=7) is False
        assert a.ledger.committed_shards() == {s0}
        (record,) = b.ledger.commit_records()
        assert (record.shard_id, record.epoch, record.token, record.file, record.rows) == (
            s0,
            0,
            a.identity.token,
            layout.output_name(0, s0, 0),
            7,
        )

    def test_ledger_opens_from_the_plan_uri(self, job: Job) -> None:
        ledger = Ledger.open(job.store().uri(PLAN_FILE), job.storage_options)
        assert ledger.plan == job.plan
        assert ledger.plan_uri == job.store().uri(PLAN_FILE)

    def test_second_claimer_waits_while_the_owner_heartbeats(self, job: Job) -> None:
        a, b = job.worker("a"), job.worker("b")
        s0 = job.shard_ids[0]
        lease = a.lease(s0)
        for _ in range(12):  # three TTLs, the owner beating every TTL/4 as the real one does
            assert b.claim(s0) is ShardState.LEASED
            job.clock.advance(TTL / 4)
            a.beat()
        assert a.ledger.holds(lease) and a.finish(lease)

    def test_silent_owner_is_taken_over_after_a_ttl_and_its_commit_is_refused(self, job: Job) -> None:
        a, b = job.worker("a"), job.worker("b")
        s0 = job.shard_ids[0]
        old = a.lease(s0)
        assert b.claim(s0) is ShardState.LEASED  # b first sees a's beat now
        job.clock.advance(TTL - 0.001)
        assert b.claim(s0) is ShardState.LEASED  # not a whole TTL yet, by b's own clock
        job.clock.advance(0.001)
        new = b.lease(s0)
        assert (new.epoch, new.token) == (1, b.identity.token)
        assert not a.ledger.holds(old)  # the fencing read stops the old owner
        assert b.finish(new)
        # A zombie that skipped (or passed, then stalled after) the fencing read is still refused.
        assert a.ledger.commit(old, file="zombie", rows=1) is False
        record = commit_record(job, s0)
        assert record is not None and (record["epoch"], record["token"]) == (1, b.identity.token)

    def test_zombie_commit_first_wins_and_the_new_owner_is_refused(self, job: Job) -> None:
        a, b = job.worker("a"), job.worker("b")
        s0 = job.shard_ids[0]
        old = a.lease(s0)
        assert a.ledger.holds(old)  # a passes the fencing read, then stalls for a TTL
        b.claim(s0)
        job.clock.advance(TTL)
        new = b.lease(s0)
        assert a.ledger.commit(old, file=layout.output_name(0, s0, old.epoch), rows=ROWS_PER_SHARD) is True
        assert b.ledger.holds(new)  # no later try: b may commit, and is refused
        assert b.ledger.commit(new, file=layout.output_name(0, s0, new.epoch), rows=ROWS_PER_SHARD) is False
        assert job.worker("c").claim(s0) is ShardState.COMMITTED

    def test_a_released_try_is_taken_over_at_once(self, job: Job) -> None:
        a, b = job.worker("a"), job.worker("b")
        s0 = job.shard_ids[0]
        lease = a.lease(s0)
        assert b.claim(s0) is ShardState.LEASED
        a.ledger.release(lease, reason="preempted", failed=False)
        new = b.lease(s0)  # same clock instant: no TTL to wait out
        assert new.epoch == 1
        assert b.finish(new)
        assert b.ledger.status().failures == ()

    def test_a_backup_races_its_try_and_each_side_learns_of_the_other_in_one_read(self, job: Job) -> None:
        holder, backer = job.worker("holder"), job.worker("backer")
        s0, s1 = job.shard_ids[:2]
        try0 = holder.lease(s0)
        assert not holder.ledger.backed_up(try0)
        backup = backer.ledger.back_up(s0, try0.epoch, backer.identity)
        assert backup is not None and backup.epoch == 1
        assert holder.ledger.backed_up(try0)  # the holder may hand over a try it has not started
        assert not holder.ledger.committed_by_another(try0) and not backer.ledger.committed_by_another(backup)
        assert backer.finish(backup)
        assert holder.ledger.committed_by_another(try0)  # the holder drops its try at once
        assert not backer.ledger.committed_by_another(backup)
        assert not holder.finish(try0)  # the first commit won
        # A backup suggested by a heartbeat read before the commit starts nothing.
        try1 = holder.lease(s1)
        assert holder.finish(try1)
        assert backer.ledger.back_up(s1, try1.epoch, backer.identity) is None
        assert job.store().read(layout.claim_key(s1, try1.epoch + 1)) is None

    def test_a_shard_fails_for_good_after_max_attempts(self, store_location: StoreLocation) -> None:
        job = Job.create(store_location, max_attempts=2)
        a, b, c = job.worker("a"), job.worker("b"), job.worker("c")
        s0 = job.shard_ids[0]
        a.ledger.release(a.lease(s0), reason="failed", failed=True, error="ValueError: boom 1")
        second = b.lease(s0)
        assert second.epoch == 1
        b.ledger.release(second, reason="failed", failed=True, error="ValueError: boom 2")
        assert a.claim(s0) is ShardState.FAILED
        assert b.claim(s0) is ShardState.FAILED
        assert c.claim(s0) is ShardState.FAILED
        a.beat()  # heartbeats carry the failed tries to status
        b.beat()
        status = c.ledger.status()
        assert (status.failed, status.committed) == (1, 0)
        assert sorted(status.failures) == [(s0, "ValueError: boom 1"), (s0, "ValueError: boom 2")]

    def test_preempted_releases_do_not_count_as_failures(self, store_location: StoreLocation) -> None:
        job = Job.create(store_location, max_attempts=1)
        a = job.worker("a")
        s0 = job.shard_ids[0]
        for epoch in range(3):
            lease = a.lease(s0)
            assert lease.epoch == epoch
            a.ledger.release(lease, reason="preempted", failed=False)
        assert a.finish(a.lease(s0))

    def test_a_commit_wins_over_failures_that_came_after_it(self, store_location: StoreLocation) -> None:
        job = Job.create(store_location, max_attempts=1)
        a, b = job.worker("a"), job.worker("b")
        s0 = job.shard_ids[0]
        old = a.lease(s0)
        assert a.ledger.holds(old)  # then a stalls
        b.claim(s0)
        job.clock.advance(TTL)
        b.ledger.release(b.lease(s0), reason="failed", failed=True, error="boom")
        assert b.claim(s0) is ShardState.FAILED
        assert a.ledger.commit(
            old, file=layout.output_name(0, s0, old.epoch), rows=ROWS_PER_SHARD
        )  # the zombie's commit
        assert job.worker("c").claim(s0) is ShardState.COMMITTED
        assert job.ledger().sweep().committed == {s0}
        assert job.ledger().sweep().failed == frozenset()

    def test_a_new_incarnation_takes_over_its_own_slot_at_once(self, job: Job) -> None:
        a1 = job.worker("slot-1")
        s0 = job.shard_ids[0]
        old = a1.lease(s0)
        assert job.worker("slot-2").claim(s0) is ShardState.LEASED  # another slot must wait
        a2 = a1.restarted()
        assert a2.identity.token != a1.identity.token
        new = a2.lease(s0)  # same clock instant
        assert new.epoch == 1
        assert not a1.ledger.holds(old)
        assert a2.finish(new)

    @pytest.mark.parametrize(
        "then",
        [
            "commits",  # the drain finished it: the heir finds it committed
            "releases",  # the drain ran out: the heir takes the next try at once
            "stops beating",  # SIGKILL mid-drain: the heir waits out a TTL
        ],
    )
    def test_a_new_incarnation_leaves_a_draining_predecessors_try_to_it(self, job: Job, then: str) -> None:
        """NOTE [drain]: the heir of a slot walks on past a try its predecessor finishes in its
        grace period, instead of fencing it out and scoring it again from its first row."""
        a1 = job.worker("slot-1")
        s0 = job.shard_ids[0]
        old = a1.lease(s0)
        a1.beat(DRAINING)
        a2 = a1.restarted()
        assert a2.ledger.try_claim(s0, a2.identity, investigate=False) is ShardState.LEASED
        assert a2.ledger.left_to_predecessor(s0, a2.identity)
        assert not job.worker("slot-2").ledger.left_to_predecessor(s0, a2.identity)  # asked of its own claims only
        if then == "commits":
            assert a1.finish(old)
            assert a2.claim(s0) is ShardState.COMMITTED
            return
        if then == "releases":
            a1.ledger.release(old, reason="preempted", failed=False)
        else:
            job.clock.advance(TTL / 4)  # the heir's cached read of the heartbeat goes stale
            assert a2.claim(s0) is ShardState.LEASED
            job.clock.advance(TTL)
        new = a2.lease(s0)
        assert new.epoch == 1 and not a1.ledger.holds(old)

    @pytest.mark.parametrize("final_state", ["finished", "preempted", "failed"])
    def test_an_exited_owner_leaves_its_leases_at_once(self, job: Job, final_state: str) -> None:
        a = job.worker("a")
        s0 = job.shard_ids[0]
        a.lease(s0)
        a.beat(final_state)
        new = job.worker("b").lease(s0)  # no clock movement at all
        assert new.epoch == 1

    def test_an_observer_sees_an_exit_once_its_cached_beat_is_stale(self, job: Job) -> None:
        a, b = job.worker("a"), job.worker("b")
        s0 = job.shard_ids[0]
        a.lease(s0)
        assert b.claim(s0) is ShardState.LEASED  # b caches a's beat for TTL/4
        a.beat("finished")
        job.clock.advance(TTL / 4)  # a quarter of a TTL, not a whole one
        new = b.lease(s0)
        assert new.epoch == 1

    def test_status_counts_shards_rows_and_failures_from_the_heartbeats(self, store_location: StoreLocation) -> None:
        job = Job.create(store_location, shards=4, max_attempts=1)
        a, b = job.worker("a"), job.worker("b")
        s0, s1, s2, s3 = job.shard_ids
        assert a.finish(a.lease(s0))
        a.beat(rows_per_s=5.0, current_shard=None)
        b.lease(s1)
        b.beat(rows_per_s=0.0, current_shard=s1)
        a.ledger.release(a.lease(s3), reason="failed", failed=True, error="ValueError: boom")
        a.held.discard(s3)
        a.beat(rows_per_s=5.0, current_shard=None)

        reader = job.ledger()
        store = reader.store
        before = dict(store.counts)
        status = reader.status()
        spent = {k: store.counts[k] - before.get(k, 0) for k in store.counts}
        assert spent == {"list": 1, "read": 3}  # workers/ listed, done.json and two heartbeats read
        assert (status.planned, status.committed, status.leased, status.pending, status.failed) == (4, 1, 1, 1, 1)
        assert status.rows_committed == ROWS_PER_SHARD
        assert status.rows_planned == 4 * ROWS_PER_SHARD
        assert status.rows_per_s == 5.0
        assert status.failures == ((s3, "ValueError: boom"),)
        assert not status.finished and not status.succeeded
        assert {w.worker_id: w.current_shard for w in status.workers} == {"a": None, "b": s1}
        doc = status.to_dict()
        assert (doc["pending"], doc["finished"], doc["failures"]) == (
            1,
            False,
            [{"shard": s3, "error": "ValueError: boom"}],
        )
        before = dict(store.counts)
        reader.status()  # nothing moved: only the listing and done.json
        assert {k: store.counts[k] - before.get(k, 0) for k in store.counts if store.counts[k] != before.get(k)} == {
            "list": 1,
            "read": 1,
        }

        # One that drains still holds what it keeps (NOTE [drain]): leased, not pending.
        b.beat("draining", current_shard=s1)
        status = job.ledger().status()
        assert (status.leased, status.pending) == (1, 1)

        # An owner that says it exited holds nothing, whatever its last claim.
        b.beat("preempted")
        status = job.ledger().status()
        assert (status.leased, status.pending) == (0, 2)

        # With no worker running and no done.json, the commits are listed to settle the count.
        a.beat("finished")
        assert b.finish(b.lease(s1)) and b.finish(b.lease(s2))
        b.beat("finished")
        status = job.ledger().status()
        assert status.finished and not status.succeeded and status.eta_s == 0.0

    def test_status_of_a_finished_job(self, job: Job) -> None:
        a = job.worker("a")
        for shard_id in job.shard_ids:
            assert a.finish(a.lease(shard_id))
        status = a.ledger.status()
        assert status.succeeded and status.finished and status.committed == len(job.shard_ids)


# -- corrupt or foreign ledger files ------------------------------------------------------------

GARBAGE = {
    "not json": b"\x00\xffnot json",
    "foreign json": json.dumps({"format": "someone-else/claim", "token": "x", "worker_id": "x"}).encode(),
    "a list": b"[1, 2, 3]",
    "fields missing": None,  # the right format tag for the file, nothing else
}


def _garbage(kind: str, which: str) -> bytes:
    data = GARBAGE[which]
    return data if data is not None else json.dumps({"format": f"airflow-antbatch/{kind}"}).encode()


@pytest.mark.parametrize("which", list(GARBAGE))
class TestCorruptLedgerFiles:
    """A malformed or foreign file stops the ledger with an error that names the file."""

    def test_claim(self, job: Job, which: str) -> None:
        s0 = job.shard_ids[0]
        rel = layout.claim_key(s0, 0)
        job.store().create(rel, _garbage("claim", which))
        with pytest.raises(LedgerCorruptError, match=re.escape(job.store().uri(rel))):
            job.worker("b").claim(s0)

    def test_commit(self, job: Job, which: str) -> None:
        a = job.worker("a")
        s0 = job.shard_ids[0]
        a.lease(s0)
        rel = layout.commit_key(s0)
        job.store().create(rel, _garbage("commit", which))
        with pytest.raises(LedgerCorruptError, match=re.escape(job.store().uri(rel))):
            job.worker("b").claim(s0)
        with pytest.raises(LedgerCorruptError, match=re.escape(job.store().uri(rel))):
            a.ledger.commit_records()

    def test_release(self, job: Job, which: str) -> None:
        s0 = job.shard_ids[0]
        job.worker("a").lease(s0)
        rel = layout.release_key(s0, 0)
        job.store().create(rel, _garbage("release", which))
        with pytest.raises(LedgerCorruptError, match=re.escape(job.store().uri(rel))):
            job.worker("b").claim(s0)
        with pytest.raises(LedgerCorruptError, match=re.escape(job.store().uri(rel))):
            job.ledger().sweep()

    def test_heartbeat(self, job: Job, which: str) -> None:
        a = job.worker("a")
        s0 = job.shard_ids[0]
        a.lease(s0)
        rel = layout.heartbeat_key(a.identity.token)
        job.store().put(rel, _garbage("heartbeat", which))
        with pytest.raises(LedgerCorruptError, match=re.escape(job.store().uri(rel))):
            job.worker("b").claim(s0)
        with pytest.raises(LedgerCorruptError, match=re.escape(job.store().uri(rel))):
            job.ledger().status()

    def test_plan(self, job: Job, which: str) -> None:
        store = job.store()
        store.put(PLAN_FILE, _garbage("plan", which))
        with pytest.raises(LedgerCorruptError, match=re.escape(store.uri(PLAN_FILE))):
            Ledger.open(store.uri(PLAN_FILE), job.storage_options)


def test_a_missing_plan_is_a_clear_error(store_location: StoreLocation) -> None:
    with pytest.raises(FileNotFoundError, match="run the plan step first"):
        Ledger.open(f"{store_location.url}/state/attempt-000/{PLAN_FILE}", store_location.storage_options)


@pytest.mark.parametrize("bad", ["", "-w", "a/b", "w 1", "x" * 101])
def test_worker_ids_that_cannot_be_file_names_are_refused(bad: str) -> None:
    with pytest.raises(SpecError, match="worker id"):
        WorkerIdentity(bad)


# -- what a shard costs in requests -------------------------------------------------------------


def _run_one_worker(location: StoreLocation, tmp_path: pathlib.Path, shards: int) -> tuple[Counter[str], int]:
    """Plan ``shards`` one-row-group shards and let one real Worker process them all."""
    from airflow_antbatch.examples.tabular import generate_transactions

    rows = 4
    directory = tmp_path / f"in-{shards}"
    directory.mkdir()
    pq.write_table(generate_transactions(shards * rows), directory / "part-000.parquet", row_group_size=rows)
    spec = JobSpec(
        input_uri=str(directory),
        output_uri=f"{location.url}/out-{shards}",
        model=f"{TABULAR}:build_model",
        preprocess=f"{TABULAR}:preprocess",
        postprocess=f"{TABULAR}:postprocess",
        id_column="txn_id",
        max_shard_rows=rows,
        batch_size=rows,
        storage_options=location.storage_options,
        # The race watch's GETs at the tail (ADR 0002, Backups) are a per-job constant whose
        # count depends on timing: the difference of two runs would read them as per-shard cost.
        backup_tries=False,
    )
    result = plan_job(spec)
    assert len(result.plan.shards) == shards
    code = JobCode.in_process(
        tabular.build_model(), preprocess=tabular.preprocess, postprocess=tabular.postprocess, id_column="txn_id"
    )
    worker = Worker(Ledger.open(result.plan_uri, location.storage_options), WorkerIdentity("w0"), code)
    summary = worker.run()
    assert (summary.outcome, summary.shards_committed) == ("finished", shards)
    return Counter(summary.requests), worker.output.counts["data"]


def test_ledger_requests_per_shard_are_constant_and_few(store_location: StoreLocation, tmp_path: pathlib.Path) -> None:
    small, large = 10, 40
    counts = {}
    for n in (small, large):
        requests, data_writes = _run_one_worker(store_location, tmp_path, n)
        assert data_writes == n  # one output write per shard, into the output store
        counts[n] = requests
    kinds = (set(counts[small]) | set(counts[large])) - {"heartbeat"}
    per_shard: dict[str, float] = {}
    fixed: dict[str, float] = {}
    for kind in sorted(kinds):
        per_shard[kind] = (counts[large][kind] - counts[small][kind]) / (large - small)
        fixed[kind] = counts[small][kind] - small * per_shard[kind]
    # Per shard: the claim and the commit (creates) and the fencing read; the rest is a small,
    # timing-dependent constant (the idle marker, a few idle polls, the sweep, done.json), never
    # a listing or scan per claim.
    assert per_shard["create"] == 2, per_shard
    assert abs(per_shard["read"] - 1) <= 0.1 and per_shard.get("list", 0) <= 0.1, per_shard
    assert all(0 <= v <= 8 for v in fixed.values()), (fixed, counts)
    assert sum(per_shard.values()) <= MAX_REQUESTS_PER_SHARD, per_shard
    # Heartbeats: one after each commit plus start and stop, never more than one per shard plus a few.
    assert counts[large]["heartbeat"] <= large + 5


# -- random interleavings (memory backend) -----------------------------------------------------

SIM_SHARDS = 2
SIM_SLOTS = ("w0", "w1", "w2")
SIM_MAX_ATTEMPTS = 2
# A live owner beats at least this often; the protocol tolerates gaps under 3/4 of a TTL
# (observers cache a heartbeat for TTL/4), so an owner this regular must never be taken over.
LIVE_GAP = TTL / 2

# Repeats weight the draw: the steps that move work forward come up more often.
ACTIONS: tuple[str, ...] = (*("work",) * 6, *("beat", "tick") * 3, *("zombie", "fail", "die", "restart") * 2)
ACTIONS += ("zombie_release", "release", "exit")
TICKS = (TTL / 8, TTL / 4, TTL / 2, TTL)  # indexed by a step's number, as shards are (modulo)


@dataclasses.dataclass
class SimProc:
    proc: Proc
    alive: bool = True
    lease: Lease | None = None
    fenced: bool = False  # passed the fencing read for ``lease``; a commit may follow any time later
    done: set[str] = dataclasses.field(default_factory=set)


class Simulation:
    """Workers doing random things to one ledger, and a model of what must hold throughout."""

    def __init__(self, location: StoreLocation) -> None:
        self.job = Job.create(location, shards=SIM_SHARDS, max_attempts=SIM_MAX_ATTEMPTS)
        self.procs: dict[str, SimProc] = {}
        self.zombies: list[SimProc] = []  # replaced processes: they may still wake up and act
        self.claims: dict[tuple[str, int], str] = {}  # (shard, epoch) -> token
        self.released: dict[tuple[str, int], bool] = {}  # (shard, epoch) -> failed
        self.commits: dict[str, tuple[int, str]] = {}
        self.beat_times: dict[str, list[float]] = {}
        self.exited: set[str] = set()
        self.slot_of: dict[str, str] = {}
        self.phase = "random steps"
        for slot in SIM_SLOTS:
            self._spawn(slot)

    # -- bookkeeping ---------------------------------------------------------------------------

    def _spawn(self, slot: str) -> None:
        proc = Proc(self.job, WorkerIdentity(slot))
        token = proc.identity.token
        self.slot_of[token] = slot
        self.beat_times[token] = [self.job.clock.now]
        self.procs[slot] = SimProc(proc)

    def _event(self, what: str) -> None:
        """Tally what the examples exercised (shown by --hypothesis-show-statistics)."""
        event(f"{self.phase}: {what}")

    def _continuously_live(self, token: str) -> bool:
        """Never silent for longer than LIVE_GAP, up to now, and never said it exited."""
        if token in self.exited:
            return False
        times = [*self.beat_times[token], self.job.clock.now]
        return all(b - a <= LIVE_GAP for a, b in zip(times, times[1:], strict=False))

    # -- actions ---------------------------------------------------------------------------------

    def step(self, action: str, slot: str, number: int) -> None:
        """One thing happens; ``number`` picks the shard, the tick or the zombie it is about."""
        if action == "tick":
            self.job.clock.advance(TICKS[number % len(TICKS)])
        elif action.startswith("zombie"):
            zombies = [z for z in [*self.zombies, *self.procs.values()] if not z.alive and z.lease is not None]
            if zombies:
                getattr(self, f"_{action}")(zombies[number % len(zombies)], number)
        else:
            getattr(self, f"_{action}")(self.procs[slot], number)
        self.check_invariants()

    def _work(self, sim: SimProc, number: int) -> None:
        """The worker loop's next step: claim a shard, or the fencing read, or the commit."""
        if not sim.alive:
            return
        if sim.lease is None:
            todo = [s for s in self.job.shard_ids if s not in sim.done]
            if todo:
                self._claim(sim, todo[number % len(todo)])
        elif not sim.fenced:
            self._fence(sim)
        else:
            self._commit(sim)

    def _zombie(self, sim: SimProc, _number: int) -> None:
        """A stalled or dead process wakes up and carries on with the try it had."""
        if not sim.fenced:
            self._fence(sim)
        else:
            self._commit(sim)

    def _zombie_release(self, sim: SimProc, number: int) -> None:
        self._give_back(sim, failed=number % 2 == 1)

    def _claim(self, sim: SimProc, shard_id: str) -> None:
        outcome = sim.proc.claim(shard_id)
        if isinstance(outcome, Lease):
            self._check_takeover(sim, outcome)
            self.claims[(shard_id, outcome.epoch)] = outcome.token
            sim.lease, sim.fenced = outcome, False
        elif outcome is ShardState.COMMITTED:
            assert shard_id in self.commits, f"{shard_id} reported committed without a commit"
            sim.done.add(shard_id)
        elif outcome is ShardState.FAILED:
            assert self._failures(shard_id) >= SIM_MAX_ATTEMPTS and shard_id not in self.commits
            self._event("shard failed for good")
            sim.done.add(shard_id)
        else:
            self._event("claim found the shard leased")

    def _check_takeover(self, sim: SimProc, lease: Lease) -> None:
        """Every earlier try was released, or its owner exited, was replaced or went silent."""
        for epoch in range(lease.epoch):
            assert (lease.shard_id, epoch) in self.claims, f"try {lease.epoch} granted before try {epoch} existed"
            owner = self.claims[(lease.shard_id, epoch)]
            if (lease.shard_id, epoch) in self.released:
                continue
            if self.slot_of[owner] == sim.proc.identity.worker_id:
                self._event("took over from an earlier incarnation")
                continue
            self._event("took over from an exited owner" if owner in self.exited else "took over from a silent owner")
            assert not self._continuously_live(owner), (
                f"{lease.token} took try {lease.epoch} of {lease.shard_id} from live owner {owner} (try {epoch})"
            )

    def _fence(self, sim: SimProc) -> None:
        assert sim.lease is not None
        lease = sim.lease
        holds = sim.proc.ledger.holds(lease)
        assert holds == ((lease.shard_id, lease.epoch + 1) not in self.claims)
        if holds:
            sim.fenced = True
        else:
            self._event("fencing read refused a lost try")
            sim.lease = None  # lost to a later try: the loop looks at the shard again

    def _commit(self, sim: SimProc) -> None:
        assert sim.lease is not None
        lease = sim.lease
        won = sim.proc.ledger.commit(lease, file=layout.output_name(0, lease.shard_id, lease.epoch), rows=1)
        self._event(f"commit {'won' if won else 'refused'}{'' if sim.alive else ' (zombie)'}")
        if won:
            assert lease.shard_id not in self.commits, f"second commit of {lease.shard_id}"
            self.commits[lease.shard_id] = (lease.epoch, lease.token)
        else:
            assert lease.shard_id in self.commits
        sim.lease = None
        sim.done.add(lease.shard_id)

    def _give_back(self, sim: SimProc, *, failed: bool) -> None:
        if sim.lease is None:
            return
        lease = sim.lease
        sim.proc.ledger.release(lease, reason="failed" if failed else "preempted", failed=failed, error="boom")
        self._event(f"{'failed' if failed else 'released'}{'' if sim.alive else ' (zombie)'}")
        self.released[(lease.shard_id, lease.epoch)] = failed
        sim.lease = None

    def _release(self, sim: SimProc, _number: int) -> None:
        if sim.alive:
            self._give_back(sim, failed=False)

    def _fail(self, sim: SimProc, _number: int) -> None:
        if sim.alive:
            self._give_back(sim, failed=True)

    def _beat(self, sim: SimProc, _number: int = 0) -> None:
        if sim.alive:
            sim.proc.beat()
            self.beat_times[sim.proc.identity.token].append(self.job.clock.now)

    def _die(self, sim: SimProc, _number: int) -> None:
        sim.alive = False  # no more beats; a lease in hand may still be used (a zombie)

    def _restart(self, sim: SimProc, _number: int) -> None:
        if not sim.alive:
            self.zombies.append(sim)
            self._spawn(sim.proc.identity.worker_id)

    def _exit(self, sim: SimProc, _number: int) -> None:
        if sim.alive and sim.lease is None:
            sim.proc.beat("finished")
            self.exited.add(sim.proc.identity.token)
            sim.alive = False

    def _failures(self, shard_id: str) -> int:
        return sum(1 for (s, _), failed in self.released.items() if s == shard_id and failed)

    # -- what must hold --------------------------------------------------------------------------

    def check_invariants(self) -> None:
        store = self.job.store()
        for shard_id in self.job.shard_ids:
            data = store.read(layout.commit_key(shard_id))
            if data is None:
                assert shard_id not in self.commits
                continue
            record = json.loads(data)
            # At most one commit per shard, and it is the one the model saw succeed...
            assert (record["epoch"], record["token"]) == self.commits[shard_id]
            # ... for a try that was claimed, by that very process.
            claim = json.loads(store.read(layout.claim_key(shard_id, record["epoch"])) or b"{}")
            assert claim.get("token") == record["token"]
        # No two live owners hold the same shard: among running processes that beat regularly,
        # at most one holds an open try of each shard.
        for shard_id in self.job.shard_ids:
            holders = [
                s
                for s in self.procs.values()
                if s.alive
                and s.lease is not None
                and s.lease.shard_id == shard_id
                and (shard_id, s.lease.epoch) not in self.released
                and self._continuously_live(s.lease.token)
            ]
            assert len(holders) <= 1, [h.lease for h in holders]

    def drain(self) -> None:
        """Let the live workers finish: every shard must end committed or failed for good."""
        self.phase = "drain"
        live = [s for s in self.procs.values() if s.alive]
        if not live:
            self._restart(self.procs[SIM_SLOTS[0]], 0)
            live = [self.procs[SIM_SLOTS[0]]]
        for _ in range(200):
            for sim in live:
                for _ in range(3 * SIM_SHARDS + 2):
                    self._work(sim, 0)
            self.check_invariants()
            if all(len(s.done) == SIM_SHARDS for s in live):
                break
            self.job.clock.advance(TTL / 4)
            for sim in live:
                self._beat(sim)
        else:
            pytest.fail(f"live workers never finished: {[sorted(s.done) for s in live]}")
        # Last, every zombie wakes up and finishes its try: nothing it does may change the outcome.
        for sim in [*self.zombies, *self.procs.values()]:
            while not sim.alive and sim.lease is not None:
                self._zombie(sim, 0)
        self.check_invariants()
        sweep = self.job.ledger().sweep()  # what a worker verifies before it writes done.json
        assert sweep.committed | sweep.failed == set(self.job.shard_ids), sweep
        for shard_id in self.job.shard_ids:
            assert shard_id in self.commits or self._failures(shard_id) >= SIM_MAX_ATTEMPTS


STEPS = st.lists(
    st.tuples(st.sampled_from(ACTIONS), st.sampled_from(SIM_SLOTS), st.integers(0, 3)),
    min_size=20,
    max_size=80,
)


@settings(
    max_examples=200,
    deadline=None,
    derandomize=True,
    database=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(steps=STEPS)
def test_random_interleavings_keep_exactly_once(steps: list[tuple[str, str, int]]) -> None:
    location = StoreLocation("memory", f"memory://antbatch-test/prop-{uuid.uuid4().hex}", {})
    sim = Simulation(location)
    try:
        for step in steps:
            sim.step(*step)
        sim.drain()
    finally:
        import fsspec

        fsspec.filesystem("memory").rm(location.url, recursive=True)
