"""Claiming: runs, steals, takeovers and the sweep, on the memory store with a fake clock.

Workers are stepped cooperatively in one thread: a claimer that has to wait raises
``Blocked`` from its ``wait``, control returns to the scheduler, and the scheduler moves the
shared fake clock. So every interleaving is reproducible, and a property test drives random
schedules of claims, commits, heartbeats and deaths to show that every shard ends up committed
exactly once and that the job is declared done only then.
"""

from __future__ import annotations

import dataclasses
import pathlib
import random
import signal
import subprocess
import time
import uuid
from collections import Counter

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from airflow_antbatch import layout
from airflow_antbatch.ledger import DRAINING, Lease, Ledger, WorkerIdentity
from airflow_antbatch.planning import plan_job
from airflow_antbatch.shards import JobPlan
from airflow_antbatch.spec import JobSpec
from airflow_antbatch.store import AtomicStore
from airflow_antbatch.worker.claims import Claimer, first_run
from airflow_antbatch.worker.local import worker_command
from tests.chaos.check import check_job
from tests.chaos.harness import worker_env
from tests.conftest import TABULAR, write_transactions
from tests.test_ledger import TTL, FakeClock, make_plan

POLL = TTL / 4


class Blocked(Exception):
    """The claimer asked to wait: hand control back to the scheduler."""

    def __init__(self, seconds: float) -> None:
        super().__init__(seconds)
        self.seconds = seconds


def block(seconds: float) -> None:
    raise Blocked(seconds)


@dataclasses.dataclass
class Sim:
    """One job on a fresh memory root, with workers that share a fake clock."""

    root: str
    plan: JobPlan
    clock: FakeClock
    stores: list[AtomicStore] = dataclasses.field(default_factory=list)

    @classmethod
    def create(cls, shards: int) -> Sim:
        root = f"memory://claims-{uuid.uuid4().hex}"
        return cls(root, make_plan(root, {}, shards=shards, max_attempts=3), FakeClock())

    def without_backups(self) -> Sim:
        self.plan = dataclasses.replace(self.plan, spec=dataclasses.replace(self.plan.spec, backup_tries=False))
        return self

    def worker(self, name: str, slot: tuple[int, int] | None = None) -> SimWorker:
        store = AtomicStore(f"{self.root}/state/attempt-000")
        self.stores.append(store)
        ledger = Ledger(store, self.plan, clock=self.clock)
        identity = WorkerIdentity(name)
        claimer = Claimer(ledger, identity, slot=slot, poll_interval_s=POLL, rng=random.Random(name))
        worker = SimWorker(ledger, identity, claimer)
        worker.beat()
        return worker

    def committed(self) -> dict[str, int]:
        ledger = Ledger(AtomicStore(f"{self.root}/state/attempt-000"), self.plan, clock=self.clock)
        return {r.shard_id: r.epoch for r in ledger.commit_records()}

    def requests(self, *, heartbeats: bool = False) -> int:
        return sum(n for s in self.stores for kind, n in s.counts.items() if heartbeats or kind != "heartbeat")


@dataclasses.dataclass
class SimWorker:
    ledger: Ledger
    identity: WorkerIdentity
    claimer: Claimer
    beats: int = 0
    committed: int = 0
    lost: int = 0  # rows of its tries that another try committed first
    lease: Lease | None = None
    finished: bool = False
    wake_at: float = 0.0  # the claimer asked to wait until then

    def beat(self, state: str = "running") -> None:
        self.beats += 1
        stats = {"shards_committed": self.committed, "rows_lost": self.lost, **self.claimer.heartbeat_fields()}
        self.ledger.heartbeat(self.identity, self.beats, state=state, stats=stats)

    def step(self) -> None:
        """Claim if idle, else finish the shard in hand (fencing read, commit, beat)."""
        if self.lease is None:
            if self.ledger.clock() < self.wake_at:
                return
            try:
                self.lease = self.claimer.next_lease(block)
            except Blocked as waiting:
                self.wake_at = self.ledger.clock() + waiting.seconds
                return
            self.finished = self.lease is None
            return
        lease, self.lease = self.lease, None
        file = layout.output_name(0, lease.shard_id, lease.epoch)
        if self.ledger.holds(lease) and self.ledger.commit(lease, file=file, rows=1):
            self.committed += 1
        self.claimer.settle(lease, done=True)
        self.beat()


def run_to_end(sim: Sim, workers: list[SimWorker], *, max_rounds: int = 10_000) -> None:
    for round_ in range(max_rounds):
        live = [w for w in workers if not w.finished]
        if not live:
            return
        for worker in live:
            worker.step()
        sim.clock.advance(POLL / 8)
        if round_ % 8 == 7:  # a beat every POLL = TTL/4, as real workers beat
            for worker in live:
                worker.beat()
    raise AssertionError("workers did not finish")


@pytest.mark.parametrize("workers", [1, 3, 8])
def test_every_shard_is_committed_once_at_a_cost_that_does_not_grow_with_workers(workers: int) -> None:
    sim = Sim.create(shards=240)
    crew = [sim.worker(f"w{i}", slot=(i, workers)) for i in range(workers)]
    run_to_end(sim, crew)
    assert len(sim.committed()) == 240
    assert sum(w.committed for w in crew) == 240
    assert Ledger(crew[0].ledger.store, sim.plan).read_done() is not None
    assert sum(w.claimer.stats.backups for w in crew) == 0  # equal speeds: no backup, no request for one
    per_shard = sim.requests() / 240
    # claim + fencing read + commit, plus steals, idle polls and one sweep spread over the job
    assert per_shard <= 4.0, (per_shard, [dict(s.counts) for s in sim.stores])


def test_workers_without_slots_start_apart_and_cover_the_ring() -> None:
    assert first_run(100, "w", None)[1] - first_run(100, "w", None)[0] == 100
    assert first_run(100, "w", (2, 4)) == (50, 75)
    assert first_run(0, "w", (0, 1)) == (0, 0)
    sim = Sim.create(shards=60)
    crew = [sim.worker(f"w{i}") for i in range(4)]
    run_to_end(sim, crew)
    assert len(sim.committed()) == 60


def test_a_thief_takes_the_back_part_of_a_busy_run() -> None:
    sim = Sim.create(shards=40)
    victim = sim.worker("victim", slot=(0, 1))  # owns every shard
    victim.step()  # claims position 0
    victim.beat()  # publishes run [1, 40)
    thief = sim.worker("thief", slot=(0, 1))  # same slot: its first claim collides at once
    thief.step()
    assert thief.lease is not None
    split = sim.plan.shard_ids.index(thief.lease.shard_id)
    assert 1 + 0.35 * 39 <= split <= 1 + 0.65 * 39 + 1  # near the middle of [1, 40), at random
    assert thief.claimer.stats.steals == 1 and thief.claimer.stats.collisions == 1


def test_thieves_reading_the_same_beat_take_different_parts_through_the_steal_records() -> None:
    sim = Sim.create(shards=80)
    victim = sim.worker("victim", slot=(0, 1))
    victim.step()  # claims position 0
    victim.beat()  # publishes run [1, 80)
    first, second = sim.worker("t1", slot=(0, 1)), sim.worker("t2", slot=(0, 1))
    first.step()
    second.step()  # reads the same beat; the first thief's steal record moves the run's end
    assert first.lease is not None and second.lease is not None
    positions = sorted(sim.plan.shard_ids.index(w.lease.shard_id) for w in (first, second))
    assert positions == [21, 41]  # [1, 80) split at 41, then [1, 41) at 21
    assert first.claimer.stats.collisions == second.claimer.stats.collisions == 1  # each at position 0


def test_a_worker_stops_probing_slots_once_a_probe_finds_its_worker_started() -> None:
    """Three slots' workers have started (each claimed its first shard) but not yet beaten, so
    the idle worker's roster counts one worker of four: it probes, collides at once, and
    probes no more. Each probe that collides costs a create and a commit read; a worker
    probing every slot it draws would pay that up to MAX_SLOT_PROBES times."""
    sim = Sim.create(shards=40)
    idle = sim.worker("w0", slot=(0, 4))
    late = Ledger(AtomicStore(f"{sim.root}/state/attempt-000"), sim.plan, clock=sim.clock)
    for slot in (1, 2, 3):
        start, _ = first_run(40, "", (slot, 4))
        assert isinstance(late.try_claim(sim.plan.shard_ids[start], WorkerIdentity(f"late{slot}")), Lease)
    while idle.committed < 10:  # its own run
        idle.step()
        sim.clock.advance(POLL / 8)
    for _ in range(16):  # two poll intervals idle: well within the late workers' TTL
        idle.step()
        sim.clock.advance(POLL / 8)
    assert idle.claimer.stats.claims == 10 and idle.claimer.stats.takeovers == 0
    # One probe collided; the sweep (every worker in its roster idle) walks what is left and
    # ends at the first late claim: one more. Probing on, it collided 5 times here.
    assert (idle.claimer.stats.collisions, idle.claimer.stats.sweeps) == (2, 1)


def test_a_worker_is_alone_until_another_has_beaten_and_then_for_good() -> None:
    """``alone`` lets a lone worker hold tries to the end (NOTE [read-ahead]): a listing a poll
    interval while alone, none once another worker has been seen, and no roster read (the
    tail's steals read theirs fresh)."""
    sim = Sim.create(shards=8)
    first = sim.worker("first")
    before = sim.requests()
    assert first.claimer.alone() and first.claimer.alone()
    assert sim.requests() - before == 1  # one listing, good for a poll interval
    assert first.claimer.stats.rosters == 0 and first.claimer.stats.alone_looks == 1
    second = sim.worker("second")
    assert first.claimer.alone()  # not yet listed again
    sim.clock.advance(POLL)
    assert not first.claimer.alone() and not second.claimer.alone()
    second.beat("finished")  # an exited worker still counts: a listing does not say
    sim.clock.advance(10 * POLL)
    before = sim.requests()
    assert not first.claimer.alone()
    assert sim.requests() == before


def test_a_dead_workers_leases_and_run_are_taken_over_after_a_ttl() -> None:
    sim = Sim.create(shards=10)
    dead = sim.worker("dead", slot=(0, 2))
    dead.step()  # holds shard 0 and never commits it
    dead.beat()
    survivor = sim.worker("survivor", slot=(1, 2))
    run_to_end(sim, [survivor], max_rounds=400)
    assert len(sim.committed()) == 10
    assert survivor.claimer.stats.takeovers >= 1 or survivor.claimer.stats.steals >= 1
    epochs = sim.committed()
    assert epochs[sim.plan.shard_ids[0]] == 1  # the dead worker's try 0 was taken over as try 1


def test_a_rerun_of_a_killed_worker_ends_with_its_work_not_a_ttl_later() -> None:
    sim = Sim.create(shards=10)
    killed = sim.worker("w0", slot=(0, 1))
    for _ in range(4):  # commits a shard, then dies holding the next one, its run half done
        killed.step()
    killed.beat()
    rerun = sim.worker("w0", slot=(0, 1))  # the same worker id: a retried task, a replaced pod
    started = sim.clock()
    run_to_end(sim, [rerun], max_rounds=400)
    assert len(sim.committed()) == 10
    assert Ledger(rerun.ledger.store, sim.plan).read_done() is not None
    # 8 shards of work (4 s here) and one idle poll: the killed incarnation's heartbeat is not
    # waited out (that took 3.5 TTLs: a TTL, then the idle wait grown long)
    assert sim.clock() - started <= 8 * POLL / 4 + POLL / 4


def test_the_heir_of_a_draining_worker_walks_on_past_the_try_it_finishes() -> None:
    """NOTE [drain]: a replaced pod's worker finishes its try in its grace period while its heir
    starts on the slot's run: the heir leaves that try to it, neither fencing it out nor ending
    its run there, and the predecessor's commit stands."""
    sim = Sim.create(shards=10)
    draining = sim.worker("w0", slot=(0, 1))
    draining.step()  # holds shard 0
    draining.beat(DRAINING)
    heir = sim.worker("w0", slot=(0, 1))
    for _ in range(12):
        heir.step()
        sim.clock.advance(POLL / 8)
    first = sim.plan.shard_ids[0]
    assert first not in sim.committed() and len(sim.committed()) >= 3  # walked on past it
    draining.step()  # the drain commits it
    draining.beat("preempted")
    run_to_end(sim, [heir], max_rounds=400)
    epochs = sim.committed()
    assert len(epochs) == 10 and epochs[first] == 0  # the predecessor's try, not fenced out
    assert heir.committed == 9


def test_a_rerun_of_a_finished_job_costs_one_read() -> None:
    sim = Sim.create(shards=12)
    run_to_end(sim, [sim.worker("a", slot=(0, 1))])
    again = sim.worker("a", slot=(0, 1))
    before = dict(again.ledger.store.counts)
    again.step()
    assert again.finished and again.claimer.stats.skipped == 12
    after = dict(again.ledger.store.counts)
    assert {k: after[k] - before.get(k, 0) for k in after if after[k] != before.get(k, 0)} == {"read": 1}


def test_done_is_written_only_when_every_shard_is_settled() -> None:
    sim = Sim.create(shards=6)
    slow = sim.worker("slow", slot=(0, 2))
    fast = sim.worker("fast", slot=(1, 2))
    slow.step()  # holds a shard, keeps beating
    for _ in range(200):
        fast.step()
        slow.beat()
        sim.clock.advance(POLL / 8)
    assert not fast.finished and fast.ledger.read_done() is None
    run_to_end(sim, [slow, fast])
    assert len(sim.committed()) == 6 and fast.ledger.read_done() is not None


@settings(max_examples=40, deadline=None)
@given(
    workers=st.integers(1, 4),
    shards=st.integers(1, 25),
    schedule=st.lists(st.tuples(st.integers(0, 3), st.sampled_from(["step", "step", "step", "die", "tick"]))),
    slots=st.booleans(),
)
def test_random_schedules_commit_every_shard_exactly_once(
    workers: int, shards: int, schedule: list[tuple[int, str]], slots: bool
) -> None:
    sim = Sim.create(shards=shards)
    crew = [sim.worker(f"w{i}", slot=(i, workers) if slots else None) for i in range(workers)]
    alive = list(crew)
    for index, action in schedule:
        if not alive:
            break
        worker = alive[index % len(alive)]
        if action == "die":
            alive.remove(worker)  # stops beating and stepping, whatever it holds
        elif action == "tick":
            sim.clock.advance(TTL / 2)
        else:
            worker.step()
        for other in alive:
            other.beat()
    survivors = [w for w in alive if not w.finished] or [sim.worker("rescuer")]
    run_to_end(sim, survivors)
    assert sorted(sim.committed()) == sorted(sim.plan.shard_ids)  # each once: commits are create-if-absent
    assert survivors[0].ledger.read_done() is not None


# -- speculative backups ----------------------------------------------------------------------


def finish(worker: SimWorker, lease: Lease) -> bool:
    """What worker.loop does with a scored try: the fencing read, the commit, a beat; True if it won."""
    file = layout.output_name(0, lease.shard_id, lease.epoch)
    won = worker.ledger.holds(lease) and worker.ledger.commit(lease, file=file, rows=1)
    worker.committed += won
    worker.lost += not won
    worker.claimer.settle(lease, done=True)
    worker.beat()
    return won


def straggling(sim: Sim) -> tuple[SimWorker, list[Lease], SimWorker]:
    """A slow worker (10 s a shard) holding two tries, the second not started, and a fast one
    (1 s a shard) through its own run: the fast one's next claim finds nothing but the tail."""
    slow, fast = sim.worker("slow", slot=(0, 2)), sim.worker("fast", slot=(1, 2))
    first = slow.claimer.next_lease(block)
    assert first is not None
    sim.clock.advance(10)
    finish(slow, first)
    held = [slow.claimer.next_lease(block), slow.claimer.next_lease(block)]
    assert all(held)
    slow.beat()
    for _ in range(3):  # the fast worker's own run: positions 3, 4, 5
        lease = fast.claimer.next_lease(block)
        assert lease is not None
        sim.clock.advance(1)
        finish(fast, lease)
    return slow, [lease for lease in held if lease is not None], fast


def test_an_idle_worker_backs_up_the_try_a_slow_worker_has_not_started_and_the_first_commit_wins() -> None:
    sim = Sim.create(shards=6)
    slow, (scoring, queued), fast = straggling(sim)
    backup = fast.claimer.next_lease(block)
    assert backup == Lease(queued.shard_id, queued.epoch + 1, fast.identity.token)
    assert fast.claimer.stats.backups == 1
    assert fast.claimer.heartbeat_fields()["leases"] == []  # a backup is not a lease to take over
    assert finish(fast, backup)
    assert finish(slow, scoring)
    assert slow.ledger.holds(queued)  # a backup does not fence the original out ...
    assert not finish(slow, queued)  # ... it wins the race to the commit
    assert fast.ledger.status().rows_wasted == 1  # the loser's rows, from its heartbeat
    run_to_end(sim, [slow, fast])
    assert sim.committed() == {**dict.fromkeys(sim.plan.shard_ids, 0), queued.shard_id: 1}


def test_backups_can_be_switched_off() -> None:
    sim = Sim.create(shards=6).without_backups()
    slow, held, fast = straggling(sim)
    with pytest.raises(Blocked):
        fast.claimer.next_lease(block)
    assert fast.claimer.stats.backups == 0
    for lease in held:
        assert finish(slow, lease)
    run_to_end(sim, [slow, fast])
    assert set(sim.committed().values()) == {0}


def test_a_try_is_backed_up_once_and_a_backup_never() -> None:
    sim = Sim.create(shards=6)
    _, (_, queued), fast = straggling(sim)
    assert fast.claimer.next_lease(block) is not None
    # Its heartbeat marks the backup, so that no reader of it backs the backup up in turn ...
    assert fast.claimer.heartbeat_fields()["queue"] == [[queued.shard_id, queued.epoch + 1, True]]
    # ... and a second backup of the same try finds its claim taken.
    assert sim.worker("other").ledger.back_up(queued.shard_id, queued.epoch, fast.identity) is None


@pytest.mark.parametrize("dies", ["backer", "holder", "both"])
def test_a_worker_killed_mid_backup_leaves_every_shard_committed_once(dies: str) -> None:
    sim = Sim.create(shards=6)
    slow, (scoring, queued), fast = straggling(sim)
    backup = fast.claimer.next_lease(block)
    assert backup is not None
    survivors = []
    if dies == "holder":  # killed with both its tries in hand: the backup commits
        fast.lease = backup
        survivors.append(fast)
    if dies == "backer":  # killed with its backup in hand: the holder commits both
        assert finish(slow, scoring) and finish(slow, queued)
        survivors.append(slow)
    run_to_end(sim, survivors or [sim.worker("rescuer")])
    committed = sim.committed()
    assert sorted(committed) == sorted(sim.plan.shard_ids)
    expected = {"backer": 0, "holder": 1, "both": 2}[dies]  # the holder's try, the backup, a takeover
    assert committed[queued.shard_id] == expected


def paced(sim: Sim) -> tuple[SimWorker, Lease, SimWorker]:
    """A slow worker (10 s a shard) scoring its second try, its run [2, 10) left, and a fast one
    (1 s a shard) through its own run [10, 20): each knows its pace, and the fast one is idle."""
    slow, fast = sim.worker("slow", slot=(0, 2)), sim.worker("fast", slot=(1, 2))
    first = slow.claimer.next_lease(block)
    assert first is not None
    sim.clock.advance(10)
    finish(slow, first)
    scoring = slow.claimer.next_lease(block)
    assert scoring is not None
    slow.beat()
    for _ in range(10):
        lease = fast.claimer.next_lease(block)
        assert lease is not None
        sim.clock.advance(1)
        finish(fast, lease)
    return slow, scoring, fast


def position(sim: Sim, lease: Lease | None) -> int:
    assert lease is not None
    return sim.plan.shard_ids.index(lease.shard_id)


def test_runs_are_split_by_speed_and_a_slow_worker_does_not_read_ahead_from_a_fast_ones() -> None:
    sim = Sim.create(shards=20)
    slow, scoring, fast = paced(sim)
    # 10x faster: the fast one takes all of the slow one's 8 positions left (it would finish them
    # in 8 s; the slow one, its share by speed being under one, in 80).
    fast.lease = fast.claimer.next_lease(block)
    assert position(sim, fast.lease) == 2
    assert (fast.claimer.run_left(), fast.claimer.stats.steals) == (7, 1)
    fast.beat()
    # The slow one, scoring its try, collides at 2 and takes nothing from the fast one's run to
    # read ahead: the fast one will be free first.
    with pytest.raises(Blocked):
        slow.claimer.next_lease(block)
    assert (slow.claimer.stats.collisions, slow.claimer.stats.steals, slow.claimer.stats.backups) == (1, 0, 0)
    assert finish(slow, scoring)
    run_to_end(sim, [slow, fast])
    assert set(sim.committed().values()) == {0} and len(sim.committed()) == 20


def test_a_thief_that_loses_its_split_point_to_the_victim_takes_the_rest_of_its_part() -> None:
    sim = Sim.create(shards=20)
    slow, scoring, fast = paced(sim)
    heartbeat = fast.ledger.read_heartbeat(slow.identity.token)
    assert heartbeat is not None
    # The fast one splits the slow one's run [2, 10) at its start, the position the slow one
    # claims next (the steal's two steps, split and claim, taken apart) ...
    assert fast.claimer._split(slow.identity.token, 2, 10, heartbeat)
    # ... and the slow one, reading ahead, claims that position first.
    ahead = slow.claimer.next_lease(block)
    assert position(sim, ahead) == 2
    # The fast one skips that one position, not its whole part; the slow one, walking on, ends there.
    fast.lease = fast.claimer.next_lease(block)
    assert position(sim, fast.lease) == 3
    assert finish(slow, scoring)
    with pytest.raises(Blocked):
        slow.claimer.next_lease(block)
    assert slow.claimer.run_left() == 0
    assert ahead is not None and finish(slow, ahead)
    run_to_end(sim, [slow, fast])
    assert set(sim.committed().values()) == {0} and len(sim.committed()) == 20


@pytest.mark.parametrize("kill", ["SIGKILL the backer", "SIGTERM the holder"])
def test_real_workers_killed_mid_backup_commit_every_row_once(kill: str, tmp_path: pathlib.Path) -> None:
    """Two `antbatch worker` processes, one 10x slower per batch: once the fast one has started a
    backup of the slow one's try, one of them is killed, and the job still holds every row once.

    The fast one starts once the slow one has committed a shard: by then the slow one knows its
    pace and holds a try it has not started, which the fast one backs up once its own work is
    out (started together, the fast one may steal all but the slow one's first try, and no
    backup is needed)."""
    table = write_transactions(tmp_path / "in", files=2, rows_per_file=150, row_group_size=25)
    spec = JobSpec(
        input_uri=str(tmp_path / "in"),
        output_uri=str(tmp_path / "out"),
        model="tests.slow_model:build_slow_model",
        preprocess=f"{TABULAR}:preprocess",
        postprocess=f"{TABULAR}:postprocess",
        id_column="txn_id",
        batch_size=25,
        max_shard_rows=25,  # 12 shards of one batch: 6 in each worker's slot, longer than a start-up
        lease_ttl_s=2.0,
    )
    plan_uri = plan_job(spec).plan_uri
    claims = tmp_path / "out" / layout.STATE_DIR / "attempt-000" / layout.CLAIMS_DIR
    procs: dict[str, subprocess.Popen[bytes]] = {}

    def start(name: str, slot: str, delay: str) -> None:
        command = worker_command(plan_uri, name, slot=slot, preprocess_workers=0, torch_threads=1)
        env = {**worker_env(), "ANTBATCH_TEST_BATCH_DELAY": delay}
        procs[name] = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)

    def wait_for_commit() -> None:
        deadline = time.monotonic() + 90
        while not any(claims.parent.joinpath(layout.COMMITS_DIR).glob("*/*.json")):
            assert time.monotonic() < deadline and procs["holder"].poll() is None
            time.sleep(0.01)

    def wait_for_claim(marker: bytes) -> None:
        deadline = time.monotonic() + 90
        while not any(marker in p.read_bytes() for p in claims.glob("*/*/*.json")):
            assert time.monotonic() < deadline and all(p.poll() is None for p in procs.values()), marker
            time.sleep(0.01)

    try:
        start("holder", "0/2", "1.0")
        wait_for_commit()
        start("backer", "1/2", "0.1")
        wait_for_claim(b'"backup": true')
        victim, signum = ("backer", signal.SIGKILL) if kill.startswith("SIGKILL") else ("holder", signal.SIGTERM)
        procs[victim].send_signal(signum)
        for proc in procs.values():
            proc.wait(timeout=90)
    finally:
        for proc in procs.values():
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    assert procs["holder" if victim == "backer" else "backer"].returncode == 0
    verdict = check_job(plan_uri, {}, Counter(table.column("txn_id").to_pylist()))
    assert verdict.exactly_once and verdict.orphans == 0, verdict
