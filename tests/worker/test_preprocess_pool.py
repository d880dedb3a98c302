"""The preprocess pool on its own: two tasks in each child's pipe, deaths blamed on the right task."""

from __future__ import annotations

import gc
import itertools
import os
import signal
import subprocess
import sys
import time
from typing import TYPE_CHECKING

import pyarrow as pa
import pytest
import torch

from airflow_antbatch.examples import tabular
from airflow_antbatch.worker import forkserver
from airflow_antbatch.worker.codec import SHARED_MIN_BYTES, shares_memory
from airflow_antbatch.worker.preprocess_pool import TASKS_PER_CHILD, Outcome, PreprocessPool
from tests.conftest import REPO_ROOT

if TYPE_CHECKING:
    from collections.abc import Iterator

HOOK = "tests.fault_hooks:preprocess"  # every pool in this process forks from one server: one hook


def _batch(merchants: list[str], first_id: int = 0) -> pa.RecordBatch:
    n = len(merchants)
    return pa.RecordBatch.from_pydict(
        {
            "txn_id": list(range(first_id, first_id + n)),
            "amount": [10.0 + i for i in range(n)],
            "customer_age": [30] * n,
            "hour": [i % 24 for i in range(n)],
            "merchant": merchants,
        }
    )


@pytest.fixture(params=[HOOK])
def pool(request: pytest.FixtureRequest) -> Iterator[PreprocessPool]:
    forkserver.start(HOOK)  # what a worker does first; the pool then forks from the same server
    pool = PreprocessPool(request.param, 1)
    pool.wait_ready()
    yield pool
    pool.close()


def _drain(pool: PreprocessPool, expected: int, timeout_s: float = 60.0) -> list[Outcome]:
    outcomes: list[Outcome] = []
    deadline = time.monotonic() + timeout_s
    while len(outcomes) < expected:
        assert time.monotonic() < deadline, f"only {len(outcomes)} of {expected} outcomes"
        outcomes.extend(pool.poll(0.5))
    return outcomes


@pytest.mark.parametrize("pool", ["tests.fault_hooks:slow_preprocess"], indirect=True)  # 60 ms a batch
def test_a_child_holds_the_next_task_while_it_works(pool: PreprocessPool) -> None:
    for key in range(TASKS_PER_CHILD):
        assert pool.wants_more()
        pool.submit(key, _batch(["shop"] * 10, key * 10))
    assert pool.poll(0) == []  # dispatch: both tasks go to the one child, which is still on the first
    assert pool.in_flight == TASKS_PER_CHILD
    assert pool.wants_more()  # one more may wait in the parent's queue
    pool.submit(TASKS_PER_CHILD, _batch(["shop"] * 10))
    assert not pool.wants_more()
    outcomes = _drain(pool, TASKS_PER_CHILD + 1)
    assert sorted(o.key for o in outcomes) == [0, 1, 2]
    batch = _batch(["shop"] * 10)
    assert torch.equal(next(o for o in outcomes if o.key == 2).output, tabular.preprocess(batch))


def test_big_tasks_both_ways_do_not_block_the_pipes(pool: PreprocessPool) -> None:
    """Batches and results far over a pipe's buffer, two in flight: the child takes tasks off
    its pipe while it works, so neither side waits on the other for ever."""
    rows = 20_000  # about 1 MB in, 3 MB out

    def hung(_signum: int, _frame: object) -> None:
        raise AssertionError("the pool hung: both pipes full")

    previous = signal.signal(signal.SIGALRM, hung)
    signal.alarm(120)  # a send blocked for good never returns to _drain's own deadline
    try:
        for key in range(4):
            pool.submit(key, _batch([f"m{i % 97}" for i in range(rows)], key * rows))
        outcomes = _drain(pool, 4)
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)
    assert sorted(o.key for o in outcomes) == [0, 1, 2, 3]
    assert all(o.output.shape[0] == rows for o in outcomes)


def test_a_death_is_blamed_on_the_running_task_not_the_waiting_one(pool: PreprocessPool) -> None:
    """A lone record that kills the child every time is quarantined; the one-row task that waited
    behind it in the same child is retried unblamed, and scored."""
    pool.submit(0, _batch(["POISON-exit"]))
    pool.submit(1, _batch(["shop"], 1))
    outcomes = {o.key: o for o in _drain(pool, 2)}
    assert outcomes[0].quarantine_reason is not None
    assert "exited with code 3" in outcomes[0].quarantine_reason
    assert outcomes[1].quarantine_reason is None
    assert outcomes[1].output.shape[0] == 1
    assert pool.restarts == 2  # the poisoned record got its two tries


@pytest.mark.parametrize("pool", ["tests.fault_hooks:lazy_preprocess"], indirect=True)
def test_busy_seconds_count_a_running_batch_as_it_runs(pool: PreprocessPool) -> None:
    """The scaler reads busy time by windows: a batch still in the hook counts up to now, and
    once it is back it counts as long as the child measured (400 ms set-up and 60 ms), so a
    batch begun before a window is not charged to it whole."""
    pool.submit(0, _batch(["shop"] * 10))
    pool.poll(0)  # sent
    time.sleep(0.2)
    assert 0.15 < pool.busy_seconds() < 0.4  # no result yet: about the 0.2 s it has run
    (outcome,) = _drain(pool, 1)
    assert outcome.quarantine_reason is None
    assert 0.45 < pool.busy_seconds() < 0.6  # the child's own measure: set-up and batch
    time.sleep(0.1)
    assert pool.busy_seconds() < 0.6  # idle: nothing more


@pytest.mark.parametrize("pool", ["tests.fault_hooks:lazy_preprocess"], indirect=True)
def test_a_child_added_later_warms_up_on_a_copy_before_it_takes_real_batches(pool: PreprocessPool) -> None:
    """A hook that sets up lazily (400 ms on its first call in a process): a child added to a
    running pool pays that on a copy of the last batch, whose output is dropped, so no real
    batch waits for it (results leave the stage in input order: one slow batch would hold up
    every batch behind it). Then both children take batches."""
    pool.submit(0, _batch(["shop"] * 10))
    assert len(_drain(pool, 1)) == 1  # the first child sets up on its first batch: nothing to wait behind
    pool.resize(2)
    sent: dict[int, float] = {}
    outcomes: list[tuple[Outcome, float]] = []
    key = 1
    stop = time.monotonic() + 1.5
    while time.monotonic() < stop or len(outcomes) < len(sent):
        while time.monotonic() < stop and pool.wants_more():
            pool.submit(key, _batch(["shop"] * 10, key * 10))
            sent[key], key = time.monotonic(), key + 1
        outcomes.extend((o, time.monotonic()) for o in pool.poll(0.01))
    assert sorted(o.key for o, _ in outcomes) == sorted(sent)  # the copy's outcome is not among them
    waits = {o.key: round(at - sent[o.key], 3) for o, at in outcomes}
    assert max(waits.values()) < 0.35, waits  # three 60 ms batches at most ahead of any; set-up is 400 ms
    assert len({o.output["pid"] for o, _ in outcomes}) == 2  # the new child took real batches once warm


def test_a_child_that_dies_warming_up_is_replaced_and_nothing_is_retried_for_it(pool: PreprocessPool) -> None:
    """The copy a new child warms up on is the last batch submitted: here a record that kills
    every process. The new child dies on the copy and is replaced, cold, with nothing charged:
    the record itself is quarantined after its own two tries, as without the new child."""
    pool.submit(0, _batch(["shop"], 0))
    assert len(_drain(pool, 1)) == 1
    pool.submit(1, _batch(["POISON-exit"], 1))
    pool.resize(2)
    pool.submit(2, _batch(["shop"], 2))
    outcomes = {o.key: o for o in _drain(pool, 2)}
    assert "exited with code 3" in (outcomes[1].quarantine_reason or "")
    assert outcomes[2].quarantine_reason is None and outcomes[2].output.shape[0] == 1
    assert pool.restarts == 3  # the record's two tries, and the new child's copy of it
    assert pool.size == 2


def _shared_memory_open() -> int:
    """memfds this process holds open: the pool's buffers for batches, and mappings of results."""
    links = []
    for fd in os.listdir("/proc/self/fd"):
        try:
            links.append(os.readlink(f"/proc/self/fd/{fd}"))
        except OSError:  # the listing's own descriptor, closed by now
            continue
    return sum(link.startswith("/memfd:antbatch") for link in links)


@pytest.mark.skipif(not shares_memory(), reason="memfd is Linux's")
def test_large_batches_cross_in_shared_memory_and_a_death_loses_none_of_them(pool: PreprocessPool) -> None:
    """Batches of 1.5 MB go to the child in shared memory and their features come back in it. A
    record that kills the child is found by splitting its batch, the halves sent again from
    buffers of their own; every other row comes back once, and closing the pool leaves no
    shared memory open."""
    gc.collect()
    open_before = _shared_memory_open()  # another test's results, if something still holds them
    rows = 30_000
    merchants = [f"merchant-{i % 997:05d}" for i in range(rows)]
    merchants[rows // 3] = "POISON-exit"
    batches = [_batch(merchants), _batch([f"m{i % 97}" for i in range(rows)], rows)]
    assert all(b.nbytes > SHARED_MIN_BYTES for b in batches)
    for key, batch in enumerate(batches):
        pool.submit(key, batch)
    outcomes: list[Outcome] = []
    deadline = time.monotonic() + 120
    while sum(len(o.batch) for o in outcomes) < 2 * rows:
        assert time.monotonic() < deadline, f"{sum(len(o.batch) for o in outcomes)} of {2 * rows} rows back"
        outcomes.extend(pool.poll(0.5))
    quarantined = [o for o in outcomes if o.quarantine_reason is not None]
    assert [(o.key, o.offset) for o in quarantined] == [(0, rows // 3)]
    for key in (0, 1):
        parts = sorted((o.offset, len(o.batch)) for o in outcomes if o.key == key)
        assert [offset for offset, _ in parts] == list(itertools.accumulate([0] + [n for _, n in parts[:-1]]))
        expected = tabular.preprocess(batches[key])
        for part in outcomes:
            if part.key == key and part.quarantine_reason is None:
                assert torch.equal(part.output, expected[part.offset : part.offset + len(part.batch)])
    del part, quarantined
    outcomes.clear()  # the features' mappings go with them
    pool.close()
    assert _shared_memory_open() <= open_before


_CLOSED_WHILE_WORKING = """
import multiprocessing, sys, pyarrow as pa
from airflow_antbatch.worker.codec import SharedBuffers, recv_tree, send_batch
from airflow_antbatch.worker.preprocess_pool import _child_main
context = multiprocessing.get_context("spawn")  # the child holds its own end only, as the pool's do
parent, child_end = context.Pipe()
child = context.Process(target=_child_main, args=(child_end, sys.argv[1]))
child.start()
child_end.close()
assert recv_tree(parent)[0] == "ready"
row = {"txn_id": [1], "amount": [1.0], "customer_age": [30], "hour": [1], "merchant": ["a"]}
send_batch(parent, pa.RecordBatch.from_pydict(row), SharedBuffers())
parent.close()  # the pool closes while the child is in the hook (60 ms)
child.join(60)
sys.exit(child.exitcode)
"""


def test_a_child_whose_pool_closed_while_it_worked_exits_quietly() -> None:
    """At a job's end, a child still busy (a warm-up copy) finds the parent's end closed when
    it sends its result: it exits without the traceback that would tell users something broke."""
    done = subprocess.run(
        [sys.executable, "-c", _CLOSED_WHILE_WORKING, "tests.fault_hooks:slow_preprocess"],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert "Traceback" not in done.stderr, done.stderr[-3000:]
