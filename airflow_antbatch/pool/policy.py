"""How many worker pods an elastic pool wants: one pure function of what a tick observed.

NOTE [pool policy]: ``decide`` sizes the pool in this order, and each step's reason is the
decision's reason (docs/kubernetes.md, "Scaling policy"):

1. Every shard is committed or failed for good: 0 pods.
2. The work available caps the pool: the pods whose workers hold leases, plus one pod per shard
   nobody holds (pending shards, and the leases of pods that just failed, which their
   replacements take over at once). A pod past that cap would find nothing to claim, so the
   pool shrinks as the work drains and no pod idles at the tail. Pending shards count only
   while some pod can reach them: once a worker has put its idle marker up, having found
   nothing to claim (``starved``), and no more shards are pending than there are owners (workers
   holding tries or claiming, and replacements coming for lost ones), the pending
   ones are the unclaimed ends of busy workers' runs (a run of one position is not split, NOTE
   [claiming]); their owners take them next, and another pod would only wait. (Shards that come
   back from a lost pod are its replacement's, counted apart; from one that fails, its own
   worker's to retry.)
3. The target: with a deadline and a known rate per worker, remaining rows / (rate x time
   left), with ``DEADLINE_HEADROOM``, where the time left stops ``ENDGAME_SHARDS`` mean shards
   before the deadline: the tail's reserve, for a straggler of ten times the mean started last
   and preempted just before it ends, then run again from the start. Pods added now work only after the
   measured start delay (``start_s``), so the running ones count for the whole time left and
   each new one for less; a pool that the running pods suffice for is sized down. A pool
   already within ``DEADLINE_SLACK`` above that keeps its size (the rate estimate wobbles by a
   pod or two from tick to tick; chasing it would churn pods). Within ``ENDGAME_SHARDS`` mean shards of the
   deadline, or past it, every remaining shard is wanted in flight. Without a deadline, or
   before any rate is known, an exponential ramp, (running + pending) x ``ramp_factor``, while
   there is backlog.
4. The shared cluster is full (pods pending with reason Unschedulable): add nothing; once the
   oldest has waited ``unschedulable_timeout_s``, keep a single pending pod as a probe (it
   schedules the moment capacity frees, and the ramp resumes) and let the other pending extras go.
5. Clamp to [min_workers, max_workers]: the cap of step 2 wins over min_workers, since a pod
   with nothing to claim only burns its node.
"""

from __future__ import annotations

import dataclasses
import math

from airflow_antbatch.errors import SpecError

DEADLINE_HEADROOM = 1.25  # a deadline pool is sized for rows / (rate x time left) x this
DEADLINE_SLACK = 1.25  # ... and keeps up to this much more than that rather than shrink
# The tail's reserve, in mean shards before the deadline: the bulk is sized to end before it, and
# within it every remaining shard goes in flight. A straggler can take 10, and twice that when a
# preemption near its end makes it start over: with 10, bench.elastic missed the deadline on 2 of
# 24 seeds (a long try lost to the trace's last spot reclaim, 2,700 s of 3,000), with 20 on none.
ENDGAME_SHARDS = 20.0


@dataclasses.dataclass(frozen=True)
class PoolSettings:
    """The pool's bounds and how it reacts: what a DAG author sets on the operator."""

    min_workers: int  # >= 0
    max_workers: int  # >= max(1, min_workers); also the plan's slot count (worker --slot I/N)
    ramp_factor: float = 2.0  # while there is backlog: next = max(1, running + pending) x this
    unschedulable_timeout_s: float = 120.0  # pending extras older than this go, and no more are added
    crash_loop_limit: int = 3  # the same failure reason this many times in a row on one slot fails the task
    deadline_s: float | None = None  # seconds from the run's start (the operator converts a timedelta or time of day)

    def __post_init__(self) -> None:
        if self.min_workers < 0:
            raise SpecError(f"min_workers must be >= 0, got {self.min_workers}")
        if self.max_workers < max(1, self.min_workers):
            raise SpecError(f"max_workers must be >= max(1, min_workers={self.min_workers}), got {self.max_workers}")
        if not self.ramp_factor > 1.0:
            raise SpecError(f"ramp_factor must be > 1, got {self.ramp_factor}")
        if not self.unschedulable_timeout_s > 0:
            raise SpecError(f"unschedulable_timeout_s must be > 0, got {self.unschedulable_timeout_s}")
        if self.crash_loop_limit < 1:
            raise SpecError(f"crash_loop_limit must be >= 1, got {self.crash_loop_limit}")
        if self.deadline_s is not None and not self.deadline_s > 0:
            raise SpecError(f"deadline_s must be > 0 seconds from the run's start, got {self.deadline_s}")


@dataclasses.dataclass(frozen=True)
class PoolSnapshot:
    """What one tick observed: the pool's pods and the ledger's status, as counts."""

    now_s: float  # the observer's monotonic clock
    elapsed_s: float  # since the run's start
    pending_shards: int  # not committed, not failed for good, not leased by a live worker
    leased_shards: int
    remaining_rows: int  # rows of shards not yet committed
    running: int  # pods in phase Running
    pending: int  # pods in phase Pending (unschedulable ones and replacements being made included)
    unschedulable: int  # pods Pending with PodScheduled=False, reason Unschedulable
    oldest_unschedulable_s: float | None  # age of the oldest unschedulable pod, observer clock
    rows_per_s_per_worker: float | None  # median of the live workers' heartbeat rates
    idle_workers: int  # running pods whose worker's idle marker is up, or that have not beaten yet
    orphaned_shards: int = 0  # leases of pods that just failed: their replacements take them over
    # A worker's idle marker went up: it found nothing to claim. The controller remembers it for
    # the rest of the job: the starved pod goes, the evidence stays.
    starved: bool = False
    start_s: float | None = None  # measured: from a pod running to its worker's first heartbeat (median)
    # Pods not running yet that take a lost worker's slot over (replacements made this tick, and
    # pending ones whose slot's worker released tries): each owns its slot's run.
    coming: int = 0

    @property
    def pods(self) -> int:
        return self.running + self.pending

    @property
    def work_cap(self) -> int:
        """The most pods that all find something to claim (NOTE [pool policy], step 2)."""
        return self.holders + self.orphaned_shards + (0 if self.unreachable else self.pending_shards)

    @property
    def holders(self) -> int:
        """Running pods whose workers hold leases (those of pods that just failed aside)."""
        held = max(0, self.leased_shards - self.orphaned_shards)
        return min(max(0, self.running - self.idle_workers), held)

    @property
    def unreachable(self) -> bool:
        """Whether the pending shards are out of reach of any pod but their runs' owners: a worker
        starved while no more were pending than there are owners, the running workers that are
        not idle (holding tries or claiming) and the replacements coming (NOTE [pool policy], step 2)."""
        owners = max(0, self.running - self.idle_workers) + self.coming
        return self.starved and 0 < self.pending_shards <= owners


@dataclasses.dataclass(frozen=True)
class Decision:
    """Pods wanted and why: logged every tick and shown on the job page."""

    wanted: int  # within [min_workers, max_workers], or 0 once the job is finished
    reason: str  # one line


def decide(snapshot: PoolSnapshot, settings: PoolSettings, previous: Decision | None) -> Decision:
    """The pool's size for this tick (NOTE [pool policy]). ``previous`` is the last decision,
    kept so that a policy may smooth; this one is level-triggered and does not need it."""
    del previous
    s = snapshot
    if s.pending_shards == 0 and s.leased_shards == 0:
        return Decision(0, "every shard is committed or failed: no pod wanted")
    cap = s.work_cap
    target, why = _target(s, settings)
    if s.unschedulable > 0:
        waited = s.oldest_unschedulable_s or 0.0
        if waited >= settings.unschedulable_timeout_s and target > s.running + 1:
            target = s.running + 1
            why = (
                f"{s.unschedulable} pod(s) unschedulable for {waited:.0f} s (>= "
                f"{settings.unschedulable_timeout_s:.0f} s): keep one pending probe, let the other extras go ({why})"
            )
        elif target > s.pods:
            target = s.pods
            why = f"{s.unschedulable} pod(s) unschedulable: the cluster is full, adding none ({why})"
    wanted = min(max(target, settings.min_workers), settings.max_workers)
    if wanted > cap:
        if s.unreachable:
            return Decision(
                cap,
                f"{why}; capped at {cap}: workers holding leases (an idle one found nothing to claim: "
                f"the {s.pending_shards} pending shard(s) wait at the end of busy workers' runs)",
            )
        return Decision(cap, f"{why}; capped at {cap}: {s.pending_shards} pending shard(s) + workers holding leases")
    if wanted != target:
        bound = "min_workers" if target < wanted else "max_workers"
        return Decision(wanted, f"{why}; clamped to {bound}={wanted}")
    return Decision(wanted, why)


def _target(s: PoolSnapshot, settings: PoolSettings) -> tuple[int, str]:
    """Pods wanted before the cluster's capacity and the bounds: the deadline's or the ramp's."""
    rate = s.rows_per_s_per_worker
    if settings.deadline_s is not None and rate is not None and rate > 0:
        left = settings.deadline_s - s.elapsed_s
        shards = s.pending_shards + s.leased_shards
        shard_s = s.remaining_rows / shards / rate if shards else 0.0
        if left <= ENDGAME_SHARDS * shard_s:
            return settings.max_workers, (
                f"deadline in {left:.0f} s, within {ENDGAME_SHARDS:.0f} shards of {shard_s:.0f} s: "
                "every remaining shard in flight"
            )
        need, why = _deadline_need(s, rate, left - ENDGAME_SHARDS * shard_s, settings.max_workers)
        why = f"deadline in {left:.0f} s: {why}"
        if need < s.pods <= need * DEADLINE_SLACK:
            return s.pods, f"{why}; keeping {s.pods}, within x{DEADLINE_SLACK}"
        return need, why
    if s.pending_shards == 0:
        return s.pods, f"no backlog: holding {s.pods} pod(s) while {s.leased_shards} shard(s) run"
    ramp = math.ceil(max(1, s.pods) * settings.ramp_factor)
    return ramp, f"backlog of {s.pending_shards} shard(s): ramp {s.pods} -> {ramp} pod(s)"


def _deadline_need(s: PoolSnapshot, rate: float, work_in: float, most: int) -> tuple[int, str]:
    """Pods that finish ``s.remaining_rows`` (x ``DEADLINE_HEADROOM``) within ``work_in`` seconds
    at ``rate`` rows/s each, where a pod added now works only after the measured start delay."""
    demand = s.remaining_rows * DEADLINE_HEADROOM / rate  # pod-seconds of work
    why = f"{s.remaining_rows} rows at {rate:.1f} rows/s per worker"
    if demand <= s.running * work_in:  # the running pods suffice: size down to what is needed
        need = math.ceil(demand / work_in)
        return need, f"{why} need {need} pod(s) (x{DEADLINE_HEADROOM} headroom)"
    start = s.start_s or 0.0
    if work_in <= start:
        return most, f"{why}: a pod added now would start too late to help, every pod wanted"
    need = s.running + math.ceil((demand - s.running * work_in) / (work_in - start))
    return need, f"{why} need {need} pod(s) (x{DEADLINE_HEADROOM} headroom, new pods start in {start:.0f} s)"
