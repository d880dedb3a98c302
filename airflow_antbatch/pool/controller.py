"""The reconciling core of an elastic pool: pods + ledger status in, what to create and delete out.

NOTE [pool controller]: each tick is level-triggered. The caller lists the pool's pods (one
request, by label selector) and reads ``Ledger.status(idle=True)``; ``tick`` turns them into a
``PoolSnapshot``, asks ``decide`` for the size, and answers with a ``TickPlan``: the slots to
create a pod for and the pod names to delete, one API request each, nothing else.

- A pod that failed (phase Failed: evicted, OOM-killed, an error exit) or that the cluster is
  taking back (being deleted with reason DisruptionTarget, Preempted or Evicted) is replaced in
  the same tick on the same slot: the new worker has the same worker id, ``slot-{slot}``, so it
  takes its predecessor's tries in its slot's run over at once (``Ledger.try_claim``,
  ``own_slot``) instead of waiting out a lease TTL. The tries a lost worker released on its way
  out (the status counts them pending) are its heir's until the heir's worker beats: no other
  pod is made for them, and the heir is not let go as idle while it starts.
- A Succeeded pod (its worker found the job done) is deleted and not replaced.
- Scaling down deletes pods that hold no try: pods not created yet first, then unschedulable
  and pending pods (youngest first), then idle running pods (highest slot first): those whose
  worker's idle marker is up (it found nothing to claim) or that have not beaten yet. A worker
  whose heartbeat shows no lease but whose marker is down is claiming its next shard
  (worker.loop beats after each commit): its pod stays.
- The task fails, naming the pod and its reason, when any pod cannot pull its image for
  ``IMAGE_PULL_GRACE_S`` (at once for an invalid image name), when a pod is in
  CrashLoopBackOff, or when one slot's pods fail with the same reason ``crash_loop_limit``
  times in a row without committing a shard. Capacity losses never count toward that streak.
- A job stopped by ``same_error_limit`` fails the task. A fail or done plan lists every pod
  for deletion: the caller deletes them, then fails or succeeds (done: the shards are all
  committed or failed for good; finalize says which).

The little it remembers (failure streaks per slot, pods already handled, when an image pull
first failed, whether a worker starved, pod start delays, the last decisions) is plain data:
``to_dict``/``from_dict`` carry it across a triggerer restart, and losing it only delays a
crash-loop verdict, the tail's first cut and a deadline's start delays.
"""

from __future__ import annotations

import dataclasses
import statistics
from typing import TYPE_CHECKING, Any

from airflow_antbatch.ledger import EXITED_STATES
from airflow_antbatch.pool.policy import Decision, PoolSettings, PoolSnapshot, decide

if TYPE_CHECKING:
    from collections.abc import Iterable, Sequence

    from airflow_antbatch.ledger import JobStatus, WorkerStatus

CAPACITY_REASONS = frozenset({"Evicted", "Preempted", "DisruptionTarget"})  # the cluster's doing, not the pod's
IMAGE_REASONS = frozenset({"ErrImagePull", "ImagePullBackOff", "InvalidImageName", "ErrImageNeverPull"})
IMAGE_PULL_GRACE_S = 60.0  # a registry hiccup passes within this; a wrong image does not
KEEP_DECISIONS = 10  # shown on the job page, newest last
KEEP_STARTS = 9  # pod start delays kept: the deadline sizing uses their median


@dataclasses.dataclass(frozen=True)
class PodView:
    """One pod of the pool as the Kubernetes side reads it."""

    name: str
    slot: int  # label antbatch/slot: the worker runs --slot {slot}/{max_workers} as worker id f"slot-{slot}"
    phase: str  # Pending | Running | Succeeded | Failed
    unschedulable: bool
    age_s: float  # seconds since creationTimestamp, observer's view
    reason: str | None  # Evicted, DisruptionTarget, OOMKilled, Error, ErrImagePull, CrashLoopBackOff, ...
    exit_code: int | None
    deleting: bool = False  # deletionTimestamp set: on its way out


@dataclasses.dataclass(frozen=True)
class TickPlan:
    """What one tick asks of the Kubernetes side: one API request per create and per delete."""

    create: tuple[int, ...]  # slots to create a pod for
    delete: tuple[str, ...]  # pod names to delete
    decision: Decision
    fail: str | None = None  # fail the task with this message (after deleting ``delete``)
    done: bool = False  # the job is finished: delete ``delete`` (every pod), then succeed
    snapshot: PoolSnapshot | None = None  # what the decision saw: pods running and pending, for the job page


def worker_id(slot: int) -> str:
    """The ledger worker id of a pool slot: the same for every pod the slot ever runs."""
    return f"slot-{slot}"


class PoolController:
    """Turns observations into plans (NOTE [pool controller]); one instance per pool."""

    def __init__(self, settings: PoolSettings) -> None:
        self.settings = settings
        self.decisions: list[Decision] = []
        # slot -> (failure reason, times in a row, the slot's freshest heartbeat token at the last one)
        self._streaks: dict[int, tuple[str, int, str]] = {}
        self._handled: set[str] = set()  # pods already replaced (and counted), while still listed
        self._image_pull: dict[str, float] = {}  # pod -> elapsed_s when it first failed to pull
        self._starved = False  # a worker found nothing to claim: from then on the job is at its tail
        # pod -> (elapsed_s it was created or last seen unschedulable, None once timed; its slot's token then)
        self._watch: dict[str, tuple[float | None, str]] = {}
        self._starts: list[float] = []  # seconds from a pod seen Running to its worker's first heartbeat, newest last

    def tick(self, pods: Sequence[PodView], status: JobStatus, now_s: float, elapsed_s: float) -> TickPlan:
        names = {p.name for p in pods}
        self._handled &= names
        self._image_pull = {n: t for n, t in self._image_pull.items() if n in names}
        live = [p for p in pods if not p.deleting]
        if status.stopped is not None:
            stopped = f"the job was stopped: {status.stopped}"
            return self._end(Decision(0, stopped), live, fail=stopped)
        if status.finished:
            return self._end(Decision(0, "the job is finished: every pod goes"), live, done=True)
        beats = _Beats.of(status.workers)
        lost = [p for p in pods if p.name not in self._handled and _lost(p)]
        verdict = self._image_verdict(live, elapsed_s) or self._count_failures(lost, beats)
        if verdict is not None:
            return self._end(Decision(0, verdict), live, fail=verdict)
        self._handled.update(p.name for p in lost)
        finished = [p.name for p in live if p.phase in ("Failed", "Succeeded")]
        alive = [p for p in live if p.phase in ("Pending", "Running") and not _lost(p)]
        gone = set(finished) | {p.name for p in lost}
        occupied = {p.slot for p in pods if p.name not in gone}
        replace = sorted({p.slot for p in lost} - occupied)
        orphaned = {s: len(w.leases) for s in replace if (w := beats.last.get(worker_id(s)))}
        # The slots whose next worker is coming: replacements made now, and pods whose worker has
        # not beaten yet. Each takes its slot's last worker's tries over at once.
        heirs = set(replace) | {p.slot for p in alive if beats.released(p.slot)}
        snapshot = _snapshot(alive, (replace, orphaned, heirs), status, beats, (now_s, elapsed_s))
        self._starved = self._starved or any(beats.marked(p.slot) for p in alive if p.phase == "Running")
        self._time_starts(alive, beats, elapsed_s)
        start_s = statistics.median(self._starts) if self._starts else None
        snapshot = dataclasses.replace(snapshot, starved=self._starved, start_s=start_s)
        decision = decide(snapshot, self.settings, self.decisions[-1] if self.decisions else None)
        self._remember(decision)
        create, delete = _reconcile(decision.wanted, alive, (replace, orphaned), occupied, beats, self.settings)
        return TickPlan(tuple(create), tuple(finished + delete), decision, snapshot=snapshot)

    def _end(self, decision: Decision, live: list[PodView], *, done: bool = False, fail: str | None = None) -> TickPlan:
        self._remember(decision)
        return TickPlan((), tuple(p.name for p in live), decision, fail=fail, done=done)

    def _remember(self, decision: Decision) -> None:
        self.decisions = [*self.decisions, decision][-KEEP_DECISIONS:]

    def _time_starts(self, alive: Iterable[PodView], beats: _Beats, elapsed_s: float) -> None:
        """Time each new pod from its creation, or the last tick that saw it unschedulable, to the
        first tick that saw a new worker beat on its slot (up to a tick late: it errs long): the
        start delay (image pull, model load) that the deadline sizing charges a pod it adds."""
        watch: dict[str, tuple[float | None, str]] = {}
        for p in alive:
            w = beats.live.get(worker_id(p.slot))
            token = w.token if w is not None else ""
            since, before = self._watch.get(p.name, (elapsed_s - p.age_s, token))
            if since is not None and p.unschedulable:  # waiting for capacity is not starting
                since, before = elapsed_s, token
            elif since is not None and token and token != before:
                self._starts = [*self._starts, elapsed_s - since][-KEEP_STARTS:]
                since = None  # timed
            watch[p.name] = (since, before)
        self._watch = watch

    def _image_verdict(self, live: Iterable[PodView], elapsed_s: float) -> str | None:
        """A pod that cannot pull its image fails the task: at once for an invalid name, else
        after ``IMAGE_PULL_GRACE_S``. Waiting longer only hides a typo."""
        for p in live:
            if p.reason not in IMAGE_REASONS:
                self._image_pull.pop(p.name, None)
                continue
            since = self._image_pull.setdefault(p.name, elapsed_s)
            if p.reason == "InvalidImageName" or elapsed_s - since >= IMAGE_PULL_GRACE_S:
                return f"pod {p.name} (slot {p.slot}) cannot pull its image: {p.reason} for {elapsed_s - since:.0f} s"
        return None

    def _count_failures(self, lost: Iterable[PodView], beats: _Beats) -> str | None:
        """Update each slot's streak of failures in a row; a verdict once one reaches the limit."""
        for p in lost:
            reason = _reason(p)
            if p.reason == "CrashLoopBackOff":
                return f"pod {p.name} (slot {p.slot}) is in CrashLoopBackOff (exit code {p.exit_code})"
            if p.reason in CAPACITY_REASONS:
                continue
            worker = beats.last.get(worker_id(p.slot))
            token = worker.token if worker is not None else ""
            last, times, last_token = self._streaks.get(p.slot, ("", 0, ""))
            if token != last_token and worker is not None and worker.shards_committed > 0:
                times = 0  # a new incarnation beat and committed since the last failure: progress, not a loop
            times = times + 1 if last == reason else 1
            self._streaks[p.slot] = (reason, times, token)
            if times >= self.settings.crash_loop_limit:
                return (
                    f"slot {p.slot} failed {times} times in a row with {reason} without committing a shard "
                    f"(last pod {p.name}): a crash loop"
                )
        return None

    def to_dict(self) -> dict[str, Any]:
        """Plain values for a trigger's ``serialize()``."""
        return {
            "streaks": {str(s): list(v) for s, v in sorted(self._streaks.items())},
            "handled": sorted(self._handled),
            "image_pull": dict(sorted(self._image_pull.items())),
            "starved": self._starved,
            "starts": [round(x, 1) for x in self._starts],
            "decisions": [[d.wanted, d.reason] for d in self.decisions],
        }

    @classmethod
    def from_dict(cls, settings: PoolSettings, data: dict[str, Any]) -> PoolController:
        controller = cls(settings)
        controller._streaks = {int(s): (str(r), int(n), str(t)) for s, (r, n, t) in data.get("streaks", {}).items()}
        controller._handled = set(data.get("handled", ()))
        controller._image_pull = {str(k): float(v) for k, v in data.get("image_pull", {}).items()}
        controller._starved = bool(data.get("starved", False))
        controller._starts = [float(x) for x in data.get("starts", ())]
        controller.decisions = [Decision(int(w), str(r)) for w, r in data.get("decisions", ())]
        return controller


def _lost(p: PodView) -> bool:
    """A pod whose worker is gone or going, not by its own success: it gets a replacement."""
    if p.deleting:
        return p.reason in CAPACITY_REASONS and p.phase != "Succeeded"
    return p.phase == "Failed" or p.reason == "CrashLoopBackOff"


def _reason(p: PodView) -> str:
    if p.reason:
        return p.reason
    return f"exit code {p.exit_code}" if p.exit_code is not None else "Failed"


@dataclasses.dataclass(frozen=True)
class _Beats:
    """Each worker id's freshest heartbeat, and its freshest of a process that has not exited:
    one pass over the workers per tick (a pool of 2,000 pods must not cost pods x workers).

    A pod is not named in its heartbeat, so a pod that has not beaten yet may be shown its
    slot's predecessor's: every use errs towards keeping a pod."""

    last: dict[str, WorkerStatus]
    live: dict[str, WorkerStatus]

    @classmethod
    def of(cls, workers: Iterable[WorkerStatus]) -> _Beats:
        last: dict[str, WorkerStatus] = {}
        live: dict[str, WorkerStatus] = {}
        for w in workers:
            for table, counts in ((last, True), (live, w.state not in EXITED_STATES)):
                seen = table.get(w.worker_id)
                if counts and (seen is None or w.last_beat_age_s < seen.last_beat_age_s):
                    table[w.worker_id] = w
        return cls(last, live)

    def busy(self, slot: int) -> bool:
        """Whether the slot's running worker may hold a try: it has beaten and its idle marker is
        down. A heartbeat without a lease is no proof of idleness: worker.loop beats after each
        commit, before it claims again. A pod not heard from yet holds none, and a worker whose
        marker is up found nothing to claim: a scale-down loses nothing with either."""
        w = self.live.get(worker_id(slot))
        return w is not None and not w.idle

    def idle(self, slot: int) -> bool:
        """Whether a running pod of the slot may go with nothing lost: not busy, and not an heir
        still starting that is to take its slot's released tries over."""
        return not self.busy(slot) and not self.released(slot)

    def released(self, slot: int) -> int:
        """Tries the slot's last worker released when it exited (a preempted worker does, and
        still lists them in its final heartbeat): the status counts them pending, but they are
        the slot's next worker's, which takes them over at once. None while a worker of the slot runs."""
        if worker_id(slot) in self.live:
            return 0
        w = self.last.get(worker_id(slot))
        return len(w.leases) if w is not None and w.state in EXITED_STATES else 0

    def marked(self, slot: int) -> bool:
        """Whether the slot's running worker has put its idle marker up: it found nothing to claim."""
        w = self.live.get(worker_id(slot))
        return w is not None and w.idle


def _snapshot(
    alive: list[PodView],
    succession: tuple[list[int], dict[int, int], set[int]],
    status: JobStatus,
    beats: _Beats,
    clock: tuple[float, float],
) -> PoolSnapshot:
    """The tick's counts; ``succession``: the slots of lost pods, the leases their workers held,
    and the slots whose next worker is coming (``heirs``); ``clock``: (now_s, elapsed_s).

    The tries a lost worker released (it exited) are counted as its heir's, not pending: a pod
    made for them besides the heir would find them taken. Those it did not release (it has not
    exited yet) are still leased."""
    replace, orphaned, heirs = succession
    running = [p for p in alive if p.phase == "Running"]
    stuck = [p.age_s for p in alive if p.phase == "Pending" and p.unschedulable]
    rates = [w.rows_per_s for w in status.workers if w.state == "running" and w.rows_per_s > 0]
    idle = sum(1 for p in running if beats.idle(p.slot))
    released = min(status.pending, sum(beats.released(s) for s in heirs))
    held = min(status.leased, sum(n for s, n in orphaned.items() if not beats.released(s)))
    if status.rows_planned is not None:
        remaining = max(0, status.rows_planned - status.rows_committed)
    else:  # rows unknown until planned with counts: the committed shards' mean size
        left = status.planned - status.committed - status.failed
        remaining = status.rows_committed * left // status.committed if status.committed else 0
    return PoolSnapshot(
        now_s=clock[0],
        elapsed_s=clock[1],
        pending_shards=status.pending - released,
        leased_shards=status.leased + released,
        remaining_rows=remaining,
        running=len(running),
        pending=len(alive) - len(running) + len(replace),
        unschedulable=len(stuck),
        oldest_unschedulable_s=max(stuck) if stuck else None,
        rows_per_s_per_worker=statistics.median(rates) if rates else None,
        idle_workers=idle,
        orphaned_shards=held + released,
        coming=len(replace) + sum(1 for p in alive if p.phase == "Pending" and p.slot in heirs),
    )


def _reconcile(
    wanted: int,
    alive: list[PodView],
    replacing: tuple[list[int], dict[int, int]],
    occupied: set[int],
    beats: _Beats,
    settings: PoolSettings,
) -> tuple[list[int], list[str]]:
    """Slots to create and pods to delete so that ``wanted`` pods run (NOTE [pool controller]).
    ``replacing``: the slots of lost pods, and the leases their workers held."""
    replace, orphaned = replacing
    excess = len(alive) + len(replace) - wanted
    if excess <= 0:
        taken = occupied.union(replace)
        free = [s for s in range(settings.max_workers) if s not in taken]
        return replace + free[:-excess], []
    # Replacements whose predecessor held nothing are the cheapest to drop: never created.
    spare = [s for s in reversed(replace) if not orphaned.get(s)]
    dropped = set(spare[:excess])
    excess -= len(dropped)
    waiting = sorted((p for p in alive if p.phase == "Pending"), key=lambda p: (not p.unschedulable, p.age_s))
    idle = sorted(
        (p for p in alive if p.phase == "Running" and beats.idle(p.slot)),
        key=lambda p: -p.slot,
    )
    delete = [p.name for p in (waiting + idle)[: max(0, excess)]]
    return [s for s in replace if s not in dropped], delete
