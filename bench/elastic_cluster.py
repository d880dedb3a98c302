"""A simulated shared cluster for the elastic benchmark: GPU slots over time, pods that wait for
one, preemptions, and worker processes that run the product's claiming code in each pod.

Everything runs on ``bench.simclock.SimClock``. The clock wants every thread spawned before it
runs, so each pool slot gets one host thread that runs the slot's pods one after another (a
pod starts ``pod_start_s`` after it is scheduled, for the image and the model), plus one
heartbeat thread. A pod's worker is ``bench.scale._Worker`` (the real ``Claimer`` and
``Ledger`` over ``bench.simstore.SimStore``) with the slot's worker id ``slot-{slot}``, so a
replacement takes its predecessor's tries over as a real one does. A pod's clock counts from
its own start (as the worker's rows/s does) and its sleeps stop at a kill: what SIGTERM does
to a real worker then follows (the lease in hand released as preempted, a final heartbeat).

A preempted pod is taken back gracefully (NOTE [drain] in worker/drain.py): it gets SIGTERM and
runs (billed, outside the capacity: its node is going) while its worker drains, up to a budget:
``drain_s`` for a shrink (priority preemption honours the pod's grace period), ``reclaim_drain_s``
for a spot reclaim (the node's notice). The worker finishes the try in hand where its pace says
the rest fits (``tries_to_finish``), else gives it back at once, and exits with the preempted
state; the pod then fails with reason DisruptionTarget. A budget of 0 kills the pod at once.
"""

from __future__ import annotations

import dataclasses
import hashlib
import random
import threading
import zlib
from collections import deque
from typing import TYPE_CHECKING, Any

from airflow_antbatch.ledger import DRAINING, WorkerIdentity
from airflow_antbatch.pool import PodView, worker_id
from airflow_antbatch.worker.claims import Claimer
from airflow_antbatch.worker.drain import slowest, tries_to_finish
from bench.scale import ROWS_PER_SHARD, _Tally, _Worker

if TYPE_CHECKING:
    from collections.abc import Callable

    from airflow_antbatch.ledger import Lease
    from airflow_antbatch.shards import JobPlan
    from bench.scale import Config
    from bench.simclock import SimClock
    from bench.simstore import SimStore

KILL_CHECK_S = 1.0  # a pod's sleeps wake this often to see whether it was killed
HOST_POLL_S = 1.0  # a slot's host looks for a newly scheduled pod this often
HOST_LANES = 2  # pods of one slot that run at once: one being taken back (draining) and its heir


class Killed(Exception):
    """The pod this worker runs in was preempted or deleted (SIGTERM)."""


@dataclasses.dataclass(frozen=True)
class Try:
    """One shard try in a pod, on the cluster's clock, and how it ended."""

    shard_id: str
    start_s: float
    end_s: float
    outcome: str  # "committed" | "wasted" (fenced or refused at commit: another try won) | "killed"


@dataclasses.dataclass(eq=False)
class Pod:
    name: str
    slot: int
    created_s: float
    scheduled_s: float | None = None  # bound to a node: from here it holds a slot
    started_s: float | None = None  # the worker process began
    ended_s: float | None = None
    phase: str = "Pending"
    reason: str | None = None
    killed: bool = False
    tries: list[Try] = dataclasses.field(default_factory=list)  # its shard tries (bench.elastic_usage)
    sigterm: threading.Event = dataclasses.field(default_factory=threading.Event)  # being taken back
    taken_s: float | None = None  # when the cluster took it back (SIGTERM, or a kill without a drain)
    drain_until: float | None = None  # the cluster's time its worker's drain budget runs out
    hosted: bool = False  # a host thread has taken it up

    def view(self, now: float) -> PodView:
        return PodView(
            name=self.name,
            slot=self.slot,
            phase=self.phase,
            unschedulable=self.phase == "Pending",  # the queue only holds pods that found no free slot
            age_s=now - self.created_s,
            reason=self.reason,
            exit_code=None if self.reason is None else 143,
            deleting=self.sigterm.is_set() and self.ended_s is None,
        )


class Cluster:
    """Slots over time and a FIFO queue of pods waiting for one; every change is logged."""

    def __init__(self, sim: SimClock, pod_start_s: float, seed: int, drains: tuple[float, float] = (0.0, 0.0)) -> None:
        self.sim = sim
        self.pod_start_s = pod_start_s
        self.drain_s, self.reclaim_drain_s = drains
        self.capacity = 0
        self.pods: dict[str, Pod] = {}  # what a listing shows: deleted pods vanish
        self.every: list[Pod] = []
        self._queue: deque[Pod] = deque()
        self._rng = random.Random(seed)
        self.timeline: list[tuple[float, int, int, int]] = []  # (t, capacity, pods holding a slot, pending)
        self.events: list[tuple[float, str, int]] = []  # (t, "freed" | "shrunk" | "preempt", slots)

    def running(self) -> list[Pod]:
        return [p for p in self.pods.values() if p.scheduled_s is not None and p.ended_s is None]

    def create(self, slot: int) -> Pod:
        pod = Pod(f"pool-{slot}-{len(self.every)}", slot, self.sim.now())
        self.pods[pod.name] = pod
        self.every.append(pod)
        self._queue.append(pod)
        self._schedule()
        return pod

    def delete(self, name: str) -> None:
        pod = self.pods.pop(name, None)
        if pod is not None and pod.ended_s is None:
            self._end(pod, pod.phase if pod.phase == "Succeeded" else "Failed", pod.reason)
            self._schedule()

    def exited(self, pod: Pod) -> None:
        """The worker exited 0: the pod Succeeded and frees its slot."""
        if pod.ended_s is None:
            self._end(pod, "Succeeded", None)
            self._schedule()

    def set_capacity(self, slots: int) -> None:
        self.events.append((self.sim.now(), "freed" if slots > self.capacity else "shrunk", slots))
        self.capacity = slots
        self._preempt(len(self._holding()) - slots, self.drain_s)
        self._schedule()

    def preempt(self, count: int) -> None:
        """Spot nodes reclaimed and replaced at once: ``count`` pods lose their node, not the slots."""
        self.events.append((self.sim.now(), "preempt", count))
        self._preempt(count, self.reclaim_drain_s)
        self._schedule()

    def drained(self, pod: Pod) -> None:
        """The worker of a pod being taken back exited: its slot is free."""
        if pod.ended_s is None:
            self._end(pod, "Failed", "DisruptionTarget")
            self._schedule()

    def _holding(self) -> list[Pod]:
        """Pods holding a slot of the capacity: not those being taken back, whose nodes go (the
        preemptor's, or a reclaimed spot node's) while they drain."""
        return [p for p in self.running() if not p.sigterm.is_set()]

    def _preempt(self, count: int, drain_s: float) -> None:
        running = self._holding()
        for pod in self._rng.sample(running, max(0, min(count, len(running)))):
            pod.taken_s = self.sim.now()
            if drain_s > 0 and pod.started_s is not None and pod.started_s >= 0:
                pod.reason, pod.drain_until = "DisruptionTarget", self.sim.now() + drain_s
                pod.sigterm.set()  # billed until its worker exits
            else:
                self._end(pod, "Failed", "DisruptionTarget")

    def _end(self, pod: Pod, phase: str, reason: str | None) -> None:
        if pod in self._queue:
            self._queue.remove(pod)
        pod.phase, pod.reason, pod.killed, pod.ended_s = phase, reason, True, self.sim.now()
        self._log()

    def _schedule(self) -> None:
        while self._queue and len(self._holding()) < self.capacity:
            pod = self._queue.popleft()
            pod.scheduled_s, pod.phase = self.sim.now(), "Running"
        self._log()

    def _log(self) -> None:
        pending = sum(1 for p in self.pods.values() if p.scheduled_s is None and p.ended_s is None)
        self.timeline.append((self.sim.now(), self.capacity, len(self.running()), pending))


class PodClock:
    """One pod's view of time: counted from its own start, and sleeps that end at a kill."""

    def __init__(self, sim: SimClock, pod: Pod) -> None:
        self._sim = sim
        self._pod = pod
        self._start = sim.now()
        self.keep: Callable[[float], bool] | None = None  # while scoring: whether to drain the try (seconds left)

    def now(self) -> float:
        return self._sim.now() - self._start

    def sleep(self, seconds: float) -> None:
        """Sleeps end at a kill; after SIGTERM, only a try its worker keeps goes on, to the drain's end."""
        end = self._sim.now() + seconds
        kept = False
        while True:
            pod, left = self._pod, end - self._sim.now()
            if pod.killed:
                raise Killed(pod.name)
            if pod.sigterm.is_set():
                kept = kept or (self.keep is not None and self.keep(left))
                if not kept or (pod.drain_until is not None and self._sim.now() >= pod.drain_until):
                    raise Killed(pod.name)
            if left <= 0:
                return
            self._sim.sleep(min(KILL_CHECK_S, left))


class PodRun:
    """What ``bench.scale._Worker`` reads from its run, for one pod: its clock, the shared stores."""

    def __init__(self, fleet: Fleet, pod: Pod) -> None:
        self.sim = PodClock(fleet.sim, pod)
        self.cluster_sim = fleet.sim
        self.cfg, self.plan, self.work, self.tally = fleet.cfg, fleet.plan, fleet.work, fleet.tally
        self.state, self.output = fleet.state, fleet.output
        self.workers = fleet.slots
        self.commit_extra = fleet.commit_extra


class PodClaimer(Claimer):
    """The real ``Claimer``, whose heartbeat fields also name the shard in hand, as
    ``worker.loop``'s heartbeat does (``current_shard``): a backup is not among the leases, and
    without it the pool would see a worker scoring one as idle."""

    current: str | None = None

    def heartbeat_fields(self) -> dict[str, Any]:
        return {**super().heartbeat_fields(), "current_shard": self.current}


class PodWorker(_Worker):
    """``bench.scale._Worker`` as one pod of a slot: worker id ``slot-{slot}``, a fresh incarnation."""

    def __init__(self, run: PodRun, slot: int, incarnation: str, pod: Pod) -> None:
        super().__init__(run, slot)  # type: ignore[arg-type]  # PodRun has what _Worker reads of a run
        # The slot's worker id, not bench.scale's "worker-{index}": rebuilt with the same settings.
        self.identity = WorkerIdentity(worker_id(slot), incarnation=incarnation)
        self.claimer: PodClaimer = PodClaimer(
            self.ledger,
            self.identity,
            slot=(slot, run.workers),
            poll_interval_s=run.cfg.poll_interval_s,
            rng=random.Random(zlib.crc32(f"{run.cfg.seed}/{incarnation}".encode())),
            stop=pod.sigterm,
        )
        self.lease: Lease | None = None
        self.state = "running"  # what its beats say until the final one
        self.pod = pod
        self.cluster = run.cluster_sim  # the cluster's clock, for the pod's try records
        self.pod_clock = run.sim

    def final_state(self) -> str:
        return "preempted" if self.pod.sigterm.is_set() else "finished"

    def process(self, lease: Lease) -> None:
        self.lease, self.claimer.current = lease, lease.shard_id
        if self.claimer.at_tail():  # as worker.loop does: idle workers and the pool read a fresh heartbeat
            self.beat()
        at, won, outcome = self.cluster.now(), self.shards_committed, "killed"
        seconds = self.run.work[lease.shard_id]
        self.pod_clock.keep = lambda left: self._drains(left, seconds)
        try:
            super().process(lease)
            outcome = "committed" if self.shards_committed > won else "wasted"
        finally:
            self.pod_clock.keep = None
            self.pod.tries.append(Try(lease.shard_id, at, self.cluster.now(), outcome))
        self.lease = self.claimer.current = None
        if outcome == "committed":  # worker.loop's beat after a commit comes once the try is settled
            self.beat()

    def _drains(self, left_s: float, seconds: float) -> bool:
        """``worker.loop``'s choice at SIGTERM, for its one try: its rows left at its recent pace."""
        pace = self.claimer.pace()
        rows_left = round(ROWS_PER_SHARD * max(0.0, left_s) / seconds) if seconds > 0 else 0
        so_far = ROWS_PER_SHARD / seconds if seconds > left_s > 0 else None  # its rows at an even rate
        rows_per_s = slowest(ROWS_PER_SHARD / pace if pace else None, so_far)
        budget = (self.pod.drain_until or 0.0) - self.cluster.now()
        if tries_to_finish([rows_left], rows_per_s, budget) < 1:
            return False
        self.state = DRAINING  # the heir of its slot leaves the try to it
        self.beat()
        return True

    def beat(self, state: str | None = None) -> None:
        super().beat(state or self.state)

    def terminate(self) -> None:
        """SIGTERM, as ``worker.loop`` handles it: release the try in hand, a final heartbeat."""
        if self.lease is not None:
            self.ledger.release(self.lease, reason="preempted", failed=False)
        self.stopped = True
        self.beat("preempted")


class Fleet:
    """The cluster's pods and the worker processes in them, one host and one heartbeat thread per slot."""

    def __init__(
        self, sim: SimClock, cfg: Config, plan: JobPlan, work: dict[str, float], stores: tuple[SimStore, SimStore]
    ) -> None:
        self.sim, self.cfg, self.plan, self.work = sim, cfg, plan, work
        self.state, self.output = stores
        self.tally = _Tally()
        self.slots = 0
        self.over = False  # set by the launcher once its job is done: the hosts stop
        self.cluster: Cluster
        self.current: dict[tuple[int, int], PodWorker] = {}  # (slot, lane) -> the worker it runs

    def commit_extra(self, name: str) -> dict[str, Any]:
        return {"sha256": hashlib.sha256(name.encode()).hexdigest()}

    def spawn(self, cluster: Cluster, slots: int) -> None:
        self.cluster, self.slots = cluster, slots
        for slot in range(slots):
            for lane in range(HOST_LANES):
                self.sim.spawn(self._host, slot, lane, name=f"host-{slot}-{lane}")
                self.sim.spawn(self._beats, slot, lane, name=f"beats-{slot}-{lane}")

    def _host(self, slot: int, lane: int) -> None:
        while not self.over:
            pod = next((p for p in self.cluster.every if p.slot == slot and _ready(p)), None)
            if pod is None:
                self.sim.sleep(HOST_POLL_S)
                continue
            pod.hosted = True
            assert pod.scheduled_s is not None
            self.sim.sleep(max(0.0, pod.scheduled_s + self.cluster.pod_start_s - self.sim.now()))
            if pod.killed:
                pod.started_s = -1.0  # never ran
                continue
            pod.started_s = self.sim.now()
            worker = PodWorker(PodRun(self, pod), slot, pod.name.replace("pool-", "i"), pod)
            self.current[slot, lane] = worker
            try:
                worker.main()
            except Killed:
                worker.terminate()
            else:
                if not pod.sigterm.is_set():
                    self.cluster.exited(pod)
            if pod.sigterm.is_set():
                self.cluster.drained(pod)
            del self.current[slot, lane]

    def _beats(self, slot: int, lane: int) -> None:
        interval = self.cfg.lease_ttl_s / 4
        while not self.over:
            self.sim.sleep(interval)
            worker = self.current.get((slot, lane))
            if worker is not None and not worker.stopped:
                worker.beat()


def _ready(pod: Pod) -> bool:
    return pod.scheduled_s is not None and not pod.hosted
