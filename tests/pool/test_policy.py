"""The scaling policy as a pure function: scenarios by hand, then invariants over any snapshot."""

from __future__ import annotations

import dataclasses
import math

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from airflow_antbatch.errors import SpecError
from airflow_antbatch.pool.policy import (
    DEADLINE_HEADROOM,
    Decision,
    PoolSettings,
    PoolSnapshot,
    decide,
)

POOL = PoolSettings(min_workers=2, max_workers=16)


def snap(**overrides: object) -> PoolSnapshot:
    """A mid-job snapshot: backlog, every running worker busy, nothing unschedulable."""
    base: dict[str, object] = {
        "now_s": 1000.0,
        "elapsed_s": 600.0,
        "pending_shards": 100,
        "leased_shards": 4,
        "remaining_rows": 104_000,
        "running": 4,
        "pending": 0,
        "unschedulable": 0,
        "oldest_unschedulable_s": None,
        "rows_per_s_per_worker": None,
        "idle_workers": 0,
    }
    return PoolSnapshot(**{**base, **overrides})  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("overrides", "pool", "wanted", "says"),
    [
        ({"pending_shards": 0, "leased_shards": 0, "running": 5}, POOL, 0, "every shard is committed"),
        ({"running": 0, "leased_shards": 0}, POOL, 2, "ramp 0 -> 2"),
        ({}, POOL, 8, "ramp 4 -> 8"),
        ({"running": 6, "pending": 3, "leased_shards": 6}, POOL, 16, "clamped to max_workers=16"),
        ({"pending_shards": 2}, POOL, 6, "capped at 6"),
        # the tail: 8 running, 3 of them idle, nothing pending: the 5 holding leases stay
        ({"pending_shards": 0, "leased_shards": 5, "running": 8, "idle_workers": 3}, POOL, 5, "capped at 5"),
        # 3 pending, 5 busy, 3 idle: the pending shards count while no worker has starved ...
        ({"pending_shards": 3, "leased_shards": 5, "running": 8, "idle_workers": 3}, POOL, 8, "capped at 8"),
        # ... and once one found nothing to claim, they wait at the end of the busy workers' runs
        (
            {"pending_shards": 3, "leased_shards": 5, "running": 8, "idle_workers": 3, "starved": True},
            POOL,
            5,
            "wait at the end of busy workers' runs",
        ),
        # more pending than busy workers: some run has two positions left, a steal can reach them
        (
            {"pending_shards": 6, "leased_shards": 5, "running": 8, "idle_workers": 3, "starved": True},
            POOL,
            11,
            "capped at 11",
        ),
        # min_workers never keeps a pod that would find nothing to claim
        ({"pending_shards": 0, "leased_shards": 1, "running": 1}, PoolSettings(4, 16), 1, "capped at 1"),
        ({"pending_shards": 0, "leased_shards": 1, "running": 1}, PoolSettings(1, 16), 1, "no backlog: holding 1"),
        # the cluster is full: hold while young, keep one probe once old
        ({"pending": 3, "unschedulable": 3, "oldest_unschedulable_s": 30.0}, POOL, 7, "adding none"),
        ({"pending": 3, "unschedulable": 3, "oldest_unschedulable_s": 130.0}, POOL, 5, "keep one pending probe"),
        ({"running": 0, "pending": 4, "unschedulable": 4, "oldest_unschedulable_s": 500.0}, POOL, 2, "min_workers"),
    ],
)
def test_decisions_by_hand(overrides: dict[str, object], pool: PoolSettings, wanted: int, says: str) -> None:
    decision = decide(snap(**overrides), pool, None)
    assert decision.wanted == wanted
    assert says in decision.reason


def test_a_deadline_sizes_the_pool_by_the_observed_rate() -> None:
    pool = dataclasses.replace(POOL, deadline_s=4600.0)
    # 104,000 rows over 104 shards at 10 rows/s per worker: a shard takes 100 s, and the last
    # 20 shards' time is the tail's reserve, so the work must be done in 4,000 - 2,000 = 2,000 s:
    # 104,000 x 1.25 / 10 = 13,000 pod-seconds. The 4 running pods do 8,000 of them; each pod
    # added does 2,000 less its start: 3 more at once, 4 more when a start takes 500 s.
    decision = decide(snap(rows_per_s_per_worker=10.0), pool, None)
    assert decision.wanted == 4 + math.ceil((104_000 * DEADLINE_HEADROOM / 10.0 - 4 * 2000) / 2000)
    assert "deadline in 4000 s" in decision.reason
    slow = decide(snap(rows_per_s_per_worker=10.0, start_s=500.0), pool, None)
    assert (slow.wanted, "new pods start in 500 s" in slow.reason) == (8, True)
    # before any rate is known it ramps; a pool already within x1.25 of the need keeps its size
    assert "ramp" in decide(snap(), pool, None).reason
    assert decide(snap(rows_per_s_per_worker=10.0, running=8, leased_shards=8), pool, None).wanted == 8
    # ahead of time: down to min_workers; behind (the last 20 shards' time, or past it): every pod
    assert decide(snap(rows_per_s_per_worker=1000.0), pool, None).wanted == 2
    late = decide(snap(rows_per_s_per_worker=10.0, elapsed_s=3000.0), pool, None)
    assert (late.wanted, "every remaining shard in flight" in late.reason) == (16, True)
    assert decide(snap(rows_per_s_per_worker=10.0, elapsed_s=4000.0), pool, None).wanted == 16
    # a start longer than the time left before the reserve: every pod, the running ones working on
    assert decide(snap(rows_per_s_per_worker=10.0, start_s=2500.0), pool, None).wanted == 16


@pytest.mark.parametrize(
    ("kwargs", "names"),
    [
        ({"min_workers": -1, "max_workers": 4}, "min_workers"),
        ({"min_workers": 5, "max_workers": 4}, "max_workers"),
        ({"min_workers": 0, "max_workers": 0}, "max_workers"),
        ({"min_workers": 1, "max_workers": 4, "ramp_factor": 1.0}, "ramp_factor"),
        ({"min_workers": 1, "max_workers": 4, "unschedulable_timeout_s": 0}, "unschedulable_timeout_s"),
        ({"min_workers": 1, "max_workers": 4, "crash_loop_limit": 0}, "crash_loop_limit"),
        ({"min_workers": 1, "max_workers": 4, "deadline_s": -5.0}, "deadline_s"),
    ],
)
def test_bad_settings_name_the_parameter(kwargs: dict[str, object], names: str) -> None:
    with pytest.raises(SpecError, match=names):
        PoolSettings(**kwargs)  # type: ignore[arg-type]


@st.composite
def pools(draw: st.DrawFn) -> PoolSettings:
    low = draw(st.integers(0, 8))
    return PoolSettings(
        min_workers=low,
        max_workers=draw(st.integers(max(1, low), 64)),
        ramp_factor=draw(st.sampled_from([1.5, 2.0, 4.0])),
        deadline_s=draw(st.none() | st.floats(60.0, 20_000.0)),
    )


@st.composite
def snapshots(draw: st.DrawFn) -> PoolSnapshot:
    running = draw(st.integers(0, 80))
    pending = draw(st.integers(0, 20))
    unschedulable = draw(st.integers(0, pending))
    leased = draw(st.integers(0, 200))
    shards = draw(st.integers(0, 500)) + leased
    return PoolSnapshot(
        now_s=0.0,
        elapsed_s=draw(st.floats(0.0, 30_000.0)),
        pending_shards=shards - leased,
        leased_shards=leased,
        remaining_rows=shards * draw(st.integers(1, 10_000)),
        running=running,
        pending=pending,
        unschedulable=unschedulable,
        oldest_unschedulable_s=draw(st.floats(0.0, 1000.0)) if unschedulable else None,
        rows_per_s_per_worker=draw(st.none() | st.floats(0.1, 1e5)),
        idle_workers=draw(st.integers(0, running)),
        orphaned_shards=draw(st.integers(0, leased)),
        starved=draw(st.booleans()),
        start_s=draw(st.none() | st.floats(0.0, 5000.0)),
        coming=draw(st.integers(0, pending)),
    )


@settings(max_examples=300, deadline=None)
@given(snapshots(), pools())
def test_within_bounds_never_past_the_work_and_always_explained(s: PoolSnapshot, pool: PoolSettings) -> None:
    d = decide(s, pool, Decision(3, "before"))
    assert d.reason
    if s.pending_shards == 0 and s.leased_shards == 0:
        assert d.wanted == 0
        return
    assert 0 <= d.wanted <= pool.max_workers
    assert d.wanted <= s.work_cap  # never a pod that would find nothing to claim
    assert d.wanted >= min(pool.min_workers, s.work_cap)
    if s.pending_shards == 0 and s.orphaned_shards == 0:
        assert d.wanted <= s.pods  # nothing to claim: never grows
    if s.unschedulable:
        assert d.wanted <= max(s.pods, pool.min_workers)  # the cluster is full: adds nothing


@settings(max_examples=300, deadline=None)
@given(snapshots(), pools(), st.integers(1, 1000))
def test_more_backlog_never_wants_fewer_pods(s: PoolSnapshot, pool: PoolSettings, more: int) -> None:
    """Without a deadline, in pending shards; with one, in the rows left (more, smaller shards may
    rightly leave a deadline's endgame)."""
    pool = dataclasses.replace(pool, deadline_s=None)
    bigger = dataclasses.replace(s, pending_shards=s.pending_shards + more, remaining_rows=s.remaining_rows + more)
    assert decide(bigger, pool, None).wanted >= decide(s, pool, None).wanted


@settings(max_examples=300, deadline=None)
@given(snapshots(), pools(), st.integers(1, 10**6))
def test_more_rows_before_a_deadline_never_want_fewer_pods(s: PoolSnapshot, pool: PoolSettings, more: int) -> None:
    pool = dataclasses.replace(pool, deadline_s=pool.deadline_s or 3600.0)
    bigger = dataclasses.replace(s, remaining_rows=s.remaining_rows + more)
    assert decide(bigger, pool, None).wanted >= decide(s, pool, None).wanted
