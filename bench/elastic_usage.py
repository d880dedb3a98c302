"""Where an elastic benchmark run's pod-seconds went: what a cluster bills, split by use.

A pod holds a node's slot from the moment it is bound (scheduled) until it is gone: a pending,
unschedulable pod holds nothing and is not billed (``pending_unbilled`` is shown apart, outside
``pod_seconds``). From binding on, every second is one of:

- ``starting``: bound, the image and the model loading (``pod_start_s``, plus the host's look);
- ``committed``: on a try whose output was committed: the job's own work, once per shard;
- ``wasted``: on a try that lost its commit (fenced, or refused because another try won);
- ``preempted``: on a try cut short by a kill (capacity drop, spot reclaim, scale-down);
- ``idle_with_work``: running, no try in hand, while some shard was there to claim (claim
  latency, the idle poll's back-off, a lease not yet released);
- ``idle_no_work``: running, no try in hand, and nothing left to claim: every uncommitted shard
  was in some other pod's hands (the tail, and a pool's extras between ticks);
- ``terminating``: from deletion to the slot being free. The simulated kubelet frees the slot at
  deletion; a preempted worker's drain (NOTE [drain]) is on its try, committed or cut short,
  and it exits as soon as that try ends, so this is 0 here; on a real cluster it is the time a
  worker takes to exit (about a second), per deleted pod.

"Something to claim" is judged from the tries themselves: a shard is claimable from time 0 until
its commit, except while some try of it is in flight. A lease that dies without a release (a
killed worker waited out for a TTL) would count as in flight; in this simulation every kill
releases its lease, so the two agree.
"""

from __future__ import annotations

from collections import defaultdict
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from collections.abc import Iterable

    from bench.elastic_cluster import Pod

Span = tuple[float, float]
USES = ("starting", "committed", "wasted", "preempted", "idle_with_work", "idle_no_work", "terminating")


def breakdown(pods: Iterable[Pod], end_s: float) -> dict[str, float]:
    """Pod-seconds by use over every pod of a run (the keys of ``USES`` plus ``pending_unbilled``);
    the uses sum to the run's ``pod_seconds``."""
    pods = list(pods)
    claimable = _claimable(pods)
    out = dict.fromkeys((*USES, "pending_unbilled"), 0.0)
    for pod in pods:
        end = pod.ended_s if pod.ended_s is not None else end_s
        bound = pod.scheduled_s
        out["pending_unbilled"] += (bound if bound is not None else end) - pod.created_s
        if bound is None:
            continue
        started = pod.started_s if pod.started_s is not None and pod.started_s >= 0 else end
        started = min(max(started, bound), end)
        out["starting"] += started - bound
        busy: list[Span] = []
        for t in pod.tries:
            span = (max(t.start_s, started), min(t.end_s, end))
            if span[1] > span[0]:
                out[{"committed": "committed", "wasted": "wasted", "killed": "preempted"}[t.outcome]] += (
                    span[1] - span[0]
                )
                busy.append(span)
        for gap in _minus([(started, end)], busy):
            with_work = _overlap(gap, claimable)
            out["idle_with_work"] += with_work
            out["idle_no_work"] += gap[1] - gap[0] - with_work
    return {k: round(v, 1) for k, v in out.items()}


def _claimable(pods: list[Pod]) -> list[Span]:
    """When at least one shard was uncommitted with no try in flight: merged, sorted spans."""
    tries: dict[str, list[Span]] = defaultdict(list)
    committed: dict[str, float] = {}
    for pod in pods:
        for t in pod.tries:
            tries[t.shard_id].append((t.start_s, t.end_s))
            if t.outcome == "committed":
                committed[t.shard_id] = min(committed.get(t.shard_id, t.end_s), t.end_s)
    spans: list[Span] = []
    for shard, runs in tries.items():
        spans += _minus([(0.0, committed.get(shard, float("inf")))], runs)
    return _merge(spans)


def _merge(spans: list[Span]) -> list[Span]:
    out: list[Span] = []
    for a, b in sorted(s for s in spans if s[1] > s[0]):
        if out and a <= out[-1][1]:
            out[-1] = (out[-1][0], max(out[-1][1], b))
        else:
            out.append((a, b))
    return out


def _minus(spans: list[Span], cut: list[Span]) -> list[Span]:
    """``spans`` less the union of ``cut``."""
    out: list[Span] = []
    holes = _merge(cut)
    for a, b in spans:
        at = a
        for c, d in holes:
            if d <= at or c >= b:
                continue
            if c > at:
                out.append((at, c))
            at = max(at, d)
        if at < b:
            out.append((at, b))
    return out


def _overlap(span: Span, merged: list[Span]) -> float:
    a, b = span
    return sum(max(0.0, min(b, d) - max(a, c)) for c, d in merged if d > a and c < b)
