"""What a worker finishes between SIGTERM and its exit.

NOTE [drain]: a preempted pod gets SIGTERM and a grace period before SIGKILL (the pod's
``terminationGracePeriodSeconds``; a spot node's notice). A worker that gives back every try it
holds at once throws away the rows it has scored: a shard nine tenths done is redone from its
first row by whoever claims it next. So a worker given a drain budget (``drain_s``, what its
launcher sets from the grace period less ``DRAIN_MARGIN_S``) stops claiming at SIGTERM, keeps
the tries at the front of its pipeline that it expects to commit within the budget at its
recent pace, and gives the others back at once, unscored, so that other workers can take them
while it drains. What is kept and not committed when the budget runs out is given back then.
Where the plan does not know a shard's rows (JSON lines, CSV: it cuts them by bytes), the
worker reckons them from the shard's bytes at the rows per byte of its own commits.

While it drains its heartbeat says ``draining``: the heir of its slot (the pool's replacement
pod, same worker id) does not take those tries over at once, as it does an earlier
incarnation's, but walks on past them (``Ledger.left_to_predecessor``, asked by the claimer);
a drain that runs out releases them, and a drain cut short by SIGKILL leaves them to the lease
TTL.
"""

from __future__ import annotations

import collections
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from collections.abc import Sequence

    from airflow_antbatch.shards import Shard

# Of a pod's grace period, what is not spent scoring: the releases of what the drain could not
# finish, the final heartbeat and the exit, on a store that may be slow.
DRAIN_MARGIN_S = 15
PACE_COMMITS = 8  # the commits that make a worker's recent pace


def drain_budget(grace_period_s: float | None) -> float:
    """Seconds a worker drains in a pod with this grace period (Kubernetes' default is 30)."""
    return max(0.0, (30.0 if grace_period_s is None else grace_period_s) - DRAIN_MARGIN_S)


class RecentPace:
    """Rows per second over a worker's last few commits (pipelining included, start-up not), and
    rows per input byte: what a shard whose rows the plan does not know (JSON lines, CSV) holds."""

    def __init__(self) -> None:
        self._commits: collections.deque[tuple[float, int, int]] = collections.deque(maxlen=PACE_COMMITS)

    def committed(self, at: float, rows: int, size: int) -> None:
        """A try committed at ``at``: ``rows`` of its input (quarantined ones too), ``size`` bytes."""
        self._commits.append((at, rows, size))

    def rows_per_s(self) -> float | None:
        """None before two commits: the first one's rows took the fill as well."""
        if len(self._commits) < 2:
            return None
        span = self._commits[-1][0] - self._commits[0][0]
        rows = sum(rows for _, rows, _ in list(self._commits)[1:])
        return rows / span if span > 0 else None

    def rows_per_byte(self) -> float | None:
        """None before a commit: nothing read yet says how long this input's rows are."""
        commits = list(self._commits)
        size = sum(size for _, _, size in commits)
        return sum(rows for _, rows, _ in commits) / size if size else None


def estimated_rows(shard: Shard, rows_per_byte: float | None) -> int | None:
    """A shard's rows: planned (Parquet), else its bytes at the rows per byte this worker has
    committed (JSON lines, CSV); None before it has committed any."""
    if shard.rows is not None:
        return shard.rows
    return None if rows_per_byte is None else round(shard.size * rows_per_byte)


def slowest(*rows_per_s: float | None) -> float | None:
    """The slowest of the rates known: the recent pace, and the try in hand's own rate so far. A
    straggler (rows that cost more than most) at its recent pace would look nearly done: kept,
    it would hold the slot's heir off for the whole budget and then be given back anyway."""
    known = [rate for rate in rows_per_s if rate]
    return min(known) if known else None


def tries_to_finish(rows_left: Sequence[int | None], rows_per_s: float | None, budget_s: float) -> int:
    """How many of the tries in flight, in pipeline order, a stopped worker keeps scoring.

    The longest front that its pace commits within the budget. Without a pace yet, or where a
    try's rows are not known (``None``), the first try only: the budget bounds that gamble. None
    at all without a budget.
    """
    if budget_s <= 0 or not rows_left:
        return 0
    if rows_per_s is None:
        return 1
    kept, rows = 0, 0
    for left in rows_left:
        if left is None:
            return kept or 1
        rows += left
        if rows / rows_per_s > budget_s:
            break
        kept += 1
    return kept
