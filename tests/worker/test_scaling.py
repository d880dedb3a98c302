"""The intra-node scaler's policy (pure: windows fed by hand) and what it measures (real processes)."""

from __future__ import annotations

import dataclasses
import json
import os
import pathlib
import signal
import subprocess
import sys
import time

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from airflow_antbatch.worker import scaling
from airflow_antbatch.worker.scaling import CpuMeter, CpuSample, ElasticScaler, StageClock

T0 = 100.0  # when the first batch has been scored and the first window opens


@pytest.fixture(autouse=True)
def _spinning_threads(monkeypatch: pytest.MonkeyPatch) -> None:
    """The policy for OpenMP threads that spin (the default) unless a test says otherwise."""
    monkeypatch.delenv("OMP_WAIT_POLICY", raising=False)


def opened(budget: int, model_stages: int = 1, processes: int = 1, **kwargs: float | int | None) -> ElasticScaler:
    """A scaler whose first window opened at T0 with every counter at zero."""
    scaler = ElasticScaler(cpu_budget=budget, cpu_model_stages=model_stages, **kwargs)  # type: ignore[arg-type]
    if scaler.elastic:
        scaler.processes = processes
    scaler.preprocess_cores = scaler.processes
    first = [StageClock(rows=1)] + [StageClock() for _ in range(model_stages - 1)]
    assert scaler.observe(0.0, first, now=T0, cpu=CpuSample(0.0, 0.0)) is None
    return scaler


def window_end(scaler: ElasticScaler) -> float:
    return T0 + scaler._window_s


@pytest.mark.parametrize(
    ("starved", "busy", "processes", "expected", "threads"),
    [
        (0.5, 0.95, 1, 2, 2),  # the model waits on a saturated pool: grow; the new process gets a core
        (0.5, 0.95, 4, None, 1),  # ... but not past the budget
        (0.0, 0.95, 1, None, 3),  # the model never waits: preprocess keeps up on its one core
        (0.5, 0.50, 1, None, 4),  # the pool idles too (the reader is the bottleneck): its core is offered
        (0.0, 0.30, 3, 2, 3),  # 0.9 cores of demand: two processes would do; the model gets 3 threads
        (0.0, 0.02, 1, None, 4),  # a light hook leaves the model every core
    ],
)
def test_the_scaler_grows_on_a_preprocess_bottleneck_only(
    starved: float, busy: float, processes: int, expected: int | None, threads: int
) -> None:
    """Without the kernel's CPU figures, busy time stands in for the cores used."""
    scaler = opened(4, processes=processes)
    w = scaler._window_s
    model = StageClock(wait_in_s=starved * w, rows=1)
    assert scaler.observe(pool_busy_s=busy * processes * w, models=[model], now=T0 + w) == expected
    assert scaler.torch_threads() == threads


@pytest.mark.parametrize("policy", ["PASSIVE", "passive"])
def test_threads_that_wait_passively_keep_every_core_beside_busy_processes(
    policy: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A saturated pool grows, and the model keeps its four threads: sleeping threads share cores
    with the processes gracefully, where spinning ones would be left one core."""
    monkeypatch.setenv("OMP_WAIT_POLICY", policy)
    scaler = opened(4)
    assert scaler.passive_wait
    w = scaler._window_s
    model = StageClock(wait_in_s=0.5 * w, rows=1)
    assert scaler.observe(pool_busy_s=0.95 * w, models=[model], now=T0 + w) == 2
    assert scaler.torch_threads() == 4
    spinning = opened(4, passive_wait=False)
    assert spinning.observe(pool_busy_s=0.95 * w, models=[model], now=T0 + w) == 2
    assert spinning.torch_threads() == 2


@pytest.mark.parametrize(
    ("worker_cores", "children_cores", "grows"),
    [
        (0.1, 0.9, True),  # one process on its core, the other core idle: grow
        (1.0, 0.95, True),  # the starved model's threads hold the other core: theirs to give up
        (0.1, 0.4, True),  # the process gets under half a core (another job's load): still a free core of ours
        (0.95, 0.6, False),  # busy by the clock, but on 0.6 cores: it waits for one, and none is free
    ],
)
def test_a_process_grows_only_into_a_core_left_free_or_held_by_the_starved_model(
    worker_cores: float, children_cores: float, grows: bool
) -> None:
    scaler = opened(2)
    w = scaler._window_s
    model = StageClock(busy_s=0.5 * w, wait_in_s=0.5 * w, rows=100, cpu_s=0.5 * w)
    cpu = CpuSample(worker_cores * w, children_cores * w)
    decided = scaler.observe(pool_busy_s=0.95 * w, models=[model], now=T0 + w, cpu=cpu)
    assert decided == (2 if grows else None)
    assert any(d.reason.startswith("preprocess is the bottleneck") for d in scaler.decisions) is grows


@pytest.mark.parametrize(
    ("processes", "starved", "worker_cores", "children_cores", "expected"),
    [
        (1, 0.9, 0.5, 1.0, 4),  # the model waits 90%: ten would feed it; four times the pool at most
        (4, 0.75, 0.5, 4.0, 14),  # sixteen would feed it; fed, the worker's threads would use two cores
        (4, 0.2, 0.5, 4.0, 5),  # the model waits 20%: one more feeds it
        (8, 0.5, 2.0, 8.0, 12),  # sixteen would feed it, but the worker's threads would then use four cores
        (8, 0.5, 6.0, 8.0, 9),  # ... or twelve: one more, into the cores the model's threads give up
        (15, 0.9, 0.2, 14.5, 16),  # never past the budget
    ],
)
def test_a_saturated_pool_grows_to_feed_the_model_within_the_cores_left(
    processes: int, starved: float, worker_cores: float, children_cores: float, expected: int
) -> None:
    """A 16-core GPU machine whose model waits on the CUDA device: the worker's own threads (the
    model's launch and wait, the reader, the writer) do more as the model is fed."""
    scaler = opened(16, processes=processes)
    w = scaler._window_s
    model = StageClock(busy_s=(1 - starved) * w, wait_in_s=starved * w, rows=100, cpu_s=0.01 * w)
    cpu = CpuSample(worker_cores * w, children_cores * w)
    assert scaler.observe(pool_busy_s=0.95 * processes * w, models=[model], now=T0 + w, cpu=cpu) == expected
    assert scaler.decisions[-1].reason.startswith("preprocess is the bottleneck")


def test_windows_before_the_processes_start_never_shrink_the_pool_and_their_start_opens_a_short_window() -> None:
    """Until the first processes are ready the worker preprocesses in its own thread: 4 processes
    counted, one thread's work measured. The pool stays at 4, and once it has started its first
    window opens then, FIRST_WINDOW_S long, and grows it from what the processes did."""
    scaler = opened(16, processes=4)
    model = StageClock(wait_in_s=0.0, rows=100, busy_s=0.0, cpu_s=0.0)
    now, busy = T0, 0.0
    for _ in range(3):  # the thread alone, busy all the time: 25% of the 4 processes
        now, busy = now + scaler._window_s, busy + scaler._window_s
        model = dataclasses.replace(model, wait_in_s=model.wait_in_s + 0.9 * scaler._window_s)
        decided = scaler.observe(busy, [model], now=now, cpu=CpuSample(0.0, 0.0), pool_started=False)
        assert decided is None and scaler.processes == 4
    started = now + 0.3
    assert scaler.observe(busy, [model], now=started, cpu=CpuSample(0.0, 0.0)) is None  # opens the window
    assert scaler._window_s == scaling.FIRST_WINDOW_S
    end = started + scaling.FIRST_WINDOW_S
    fed = dataclasses.replace(model, wait_in_s=model.wait_in_s + 0.9 * scaling.FIRST_WINDOW_S)
    cpu = CpuSample(0.2 * scaling.FIRST_WINDOW_S, 4 * scaling.FIRST_WINDOW_S)
    # Sixteen would feed the model; its threads, fed four times faster, would use a core of them.
    assert scaler.observe(busy + 4 * scaling.FIRST_WINDOW_S, [fed], now=end, cpu=cpu) == 15


def test_a_process_just_added_is_not_taken_back_in_its_first_window() -> None:
    """It may still be starting (forked, importing): the pool shrinks only after a whole window at its new size."""
    scaler = opened(2)
    starving = StageClock(wait_in_s=0.5 * scaler._window_s, rows=100)
    now = T0 + scaler._window_s
    cpu = CpuSample(0.0, 0.9 * scaler._window_s)  # one process on its core, the other core idle
    assert scaler.observe(0.95 * scaler._window_s, [starving], now=now, cpu=cpu) == 2
    idle = [dataclasses.replace(starving, rows=200)]
    pool = 0.95 * (now - T0)
    now += scaler._window_s
    assert scaler.observe(pool + 0.1, idle, now=now, cpu=cpu) is None  # starting: kept
    now += scaler._window_s
    assert scaler.observe(pool + 0.2, idle, now=now, cpu=cpu) == 1  # idle for a whole window: shrunk
    assert scaler.decisions[-1].reason.startswith("preprocess has spare capacity")


def test_model_stages_that_wait_on_a_device_leave_their_cores_to_preprocessing() -> None:
    """Three model stages declared on the CPU, each busy half the window but on the CPU for 2% of
    it (a simulated device): they hold no core, so the starved chain gets a second process, and
    their threads are not decided at all."""
    scaler = opened(2, model_stages=3)
    assert scaler.torch_threads(0) == 1  # until measured: 2 cores // 3 stages, at least 1
    w = scaler._window_s
    stages = [StageClock(busy_s=0.5 * w, wait_in_s=0.45 * w, rows=500, cpu_s=0.01 * w) for _ in range(3)]
    decided = scaler.observe(pool_busy_s=0.9 * w, models=stages, now=T0 + w, cpu=CpuSample(0.1 * w, 0.9 * w))
    assert decided == 2
    assert [scaler.on_cpu(i) for i in range(3)] == [False, False, False]
    assert "3 model stage(s) waiting on a device" in scaler.decisions[-1].reason


def test_a_cpu_stage_beside_device_stages_gets_the_cores_left() -> None:
    scaler = opened(4, model_stages=2)
    w = scaler._window_s
    stages = [
        StageClock(busy_s=0.9 * w, rows=500, cpu_s=0.9 * w),  # computes
        StageClock(busy_s=0.9 * w, rows=500, cpu_s=0.02 * w),  # waits on a device
    ]
    scaler.observe(pool_busy_s=1.0 * w, models=stages, now=T0 + w, cpu=CpuSample(1.0 * w, 1.0 * w))
    assert (scaler.on_cpu(0), scaler.on_cpu(1)) == (True, False)
    assert scaler.torch_threads(0) == 3  # every core preprocessing leaves, none kept for the device stage


def test_the_first_window_opens_at_the_first_scored_batch_and_windows_double_to_the_interval() -> None:
    scaler = ElasticScaler(cpu_budget=2, cpu_model_stages=1, interval_s=2.0)
    starving = StageClock(wait_in_s=50.0)  # the pipeline filling: no batch scored yet
    assert scaler.observe(50.0, [starving], now=T0) is None
    assert scaler.observe(100.0, [starving], now=T0 + 10) is None and not scaler.decisions
    at, busy, wait, rows = T0 + 10, 100.0, 50.0, 1
    scaler.observe(busy, [StageClock(wait_in_s=wait, rows=rows)], now=at)  # opens the window
    lengths = []
    for _ in range(5):
        length = scaler._window_s
        lengths.append(length)
        assert scaler.observe(busy, [StageClock(wait_in_s=wait, rows=rows)], now=at + length * 0.9) is None
        at, busy = at + length, busy + 0.1 * length
        scaler.observe(busy, [StageClock(wait_in_s=wait, rows=rows)], now=at)
    assert lengths == [scaling.FIRST_WINDOW_S, 1.0, 2.0, 2.0, 2.0]


def test_the_kernel_is_read_only_when_a_window_opens_or_closes(monkeypatch: pytest.MonkeyPatch) -> None:
    """observe runs on every turn of the preprocess stage's loop; a read of /proc costs its CPU."""
    reads: list[float] = []
    real = CpuMeter.sample
    monkeypatch.setattr(CpuMeter, "sample", lambda meter: reads.append(time.monotonic()) or real(meter))
    scaler = ElasticScaler(cpu_budget=2, cpu_model_stages=1, interval_s=60.0)
    for _ in range(200):
        scaler.observe(0.0, [StageClock()])  # nothing scored yet: no window
    assert reads == []
    for _ in range(200):
        scaler.observe(0.0, [StageClock(rows=1)])  # the first opens the window, the rest are inside it
    assert len(reads) == 1


def test_fixed_settings_are_never_scaled() -> None:
    scaler = opened(8, model_stages=2, fixed_processes=3, fixed_threads=5)
    assert scaler.processes == 3
    models = [StageClock(wait_in_s=100.0, rows=5), StageClock()]
    assert scaler.observe(100.0, models, now=T0 + 60, cpu=CpuSample(0.0, 1.0)) is None
    assert (scaler.processes, scaler.torch_threads(), scaler.torch_threads(stage_threads=1)) == (3, 5, 1)
    assert ElasticScaler(cpu_budget=8, cpu_model_stages=2).torch_threads() == 4  # until measured: 8 cores // 2


def test_a_fixed_pool_still_hands_idle_cores_to_the_model() -> None:
    scaler = opened(4, processes=2, fixed_processes=2)
    w = scaler._window_s
    cpu = CpuSample(0.0, 0.1 * w)
    assert scaler.observe(pool_busy_s=0.1 * w, models=[StageClock(rows=1)], now=T0 + w, cpu=cpu) is None
    assert scaler.processes == 2 and scaler.torch_threads() == 4
    assert scaler.decisions[-1].reason.startswith("preprocess keeps 0.1 cores busy")


@pytest.mark.parametrize(("rate_after", "kept"), [(2000.0, True), (1050.0, False)])
def test_more_threads_stay_only_if_the_model_gets_faster(rate_after: float, kept: bool) -> None:
    scaler = opened(2, interval_s=1.0)
    w = scaler._window_s
    model = StageClock(busy_s=w, rows=1 + int(1000 * w), cpu_s=w)  # 1000 rows per busy second on one thread
    scaler.observe(pool_busy_s=0.0, models=[model], now=T0 + w)
    assert scaler.torch_threads() == 2  # the idle pool's core goes to the model, on probation
    w2 = scaler._window_s
    after = StageClock(busy_s=w + w2, rows=model.rows + int(rate_after * w2), cpu_s=w + w2)
    scaler.observe(pool_busy_s=0.0, models=[after], now=T0 + w + w2)
    assert scaler.torch_threads() == (2 if kept else 1)
    if not kept:
        assert "the cores are not free" in scaler.decisions[-1].reason
        later = StageClock(busy_s=after.busy_s + 1.0, rows=after.rows + 1000, cpu_s=after.cpu_s + 1.0)
        scaler.observe(pool_busy_s=0.0, models=[later], now=T0 + w + w2 + 1.0)
        assert scaler.torch_threads() == 1  # not tried again


def test_model_stages_share_the_cores_left_by_their_busy_time() -> None:
    fresh = ElasticScaler(cpu_budget=6, cpu_model_stages=3)
    assert [fresh.torch_threads(i) for i in range(3)] == [2, 2, 2]  # 6 // 3 until measured
    scaler = opened(6, model_stages=3)
    w = scaler._window_s
    stages = [StageClock(busy_s=0.9 * w, rows=9, cpu_s=0.9 * w)]
    stages += [StageClock(busy_s=0.05 * w, cpu_s=0.05 * w) for _ in range(2)]
    scaler.observe(pool_busy_s=w, models=stages, now=T0 + w)
    assert [scaler.torch_threads(i) for i in range(3)] == [4, 1, 1]  # the embedder does 90% of the work


windows = st.fixed_dictionaries(
    {
        "busy": st.floats(0.0, 1.0),
        "starved": st.floats(0.0, 1.0),
        "model_busy": st.floats(0.0, 1.0),
        "model_on_cpu": st.floats(0.0, 1.0),
        "worker_cores": st.floats(0.0, 4.0),
        "children_share": st.floats(0.0, 1.0),
    }
)


@settings(max_examples=200, deadline=None)
@given(budget=st.integers(1, 8), stages=st.integers(1, 3), seen=st.lists(windows, min_size=1, max_size=12))
def test_any_run_of_windows_keeps_the_pool_and_threads_in_the_budget(
    budget: int, stages: int, seen: list[dict[str, float]]
) -> None:
    """Whatever is measured: 1 <= processes <= budget, 1 <= threads <= budget, one process fewer
    at a time, a grow only while the model starves, into a free core (or one the starved model's
    threads hold), by more only within the cores the worker would leave once the model is fed
    and to four times the pool at most, and every decision says why."""
    scaler = opened(budget, model_stages=stages)
    now, pool, clocks, cpu = T0, 0.0, [StageClock(rows=1) for _ in range(stages)], CpuSample(0.0, 0.0)
    for w in seen:
        length, before = scaler._window_s, scaler.processes
        now += length
        pool += w["busy"] * before * length
        for clock in clocks:
            clock.busy_s += w["model_busy"] * length
            clock.cpu_s += w["model_busy"] * w["model_on_cpu"] * length
            clock.rows += 100
        clocks[0].wait_in_s += w["starved"] * length
        children = w["children_share"] * w["busy"] * before * length
        cpu = CpuSample(cpu.worker_s + w["worker_cores"] * length, cpu.children_s + children)
        decided = scaler.observe(pool, clocks, now=now, cpu=cpu)
        assert 1 <= scaler.processes <= budget
        assert before - 1 <= scaler.processes <= scaling.MAX_GROWTH * before
        assert decided in (None, scaler.processes)
        assert all(1 <= scaler.torch_threads(i) <= budget for i in range(stages))
        if scaler.processes > before:
            free = budget - (w["worker_cores"] + children / length)
            on_their_cores = children >= scaling.GROW_WHEN_ON_CPU * w["busy"] * before * length - 1e-9
            assert w["starved"] >= scaling.GROW_WHEN_STARVED
            assert free >= scaling.GROW_WHEN_FREE - 1e-9 or on_their_cores
            speedup = 1 / max(1 - w["starved"], 1 / scaling.MAX_GROWTH)
            assert scaler.processes == before + 1 or scaler.processes <= budget - w["worker_cores"] * speedup + 1e-9
    assert all(d.reason for d in scaler.decisions)


def meter_against_the_kernel() -> dict[str, float | None]:
    """A child spinning and one asleep, stopped after 1 s, then killed and reaped: what the meter
    counted before and after, and what the kernel charged them (their rusage once reaped)."""
    meter = CpuMeter()
    assert meter.sample() is not None
    codes = ["while True: pass", "import time; time.sleep(30)"]
    children = [os.posix_spawn(sys.executable, [sys.executable, "-c", code], os.environ) for code in codes]
    time.sleep(1.0)
    for pid in children:
        os.kill(pid, signal.SIGSTOP)  # their CPU stops here
    time.sleep(0.1)
    counted = meter.sample()
    charged = 0.0
    for pid in children:
        os.kill(pid, signal.SIGKILL)
        _, _, usage = os.wait4(pid, 0)  # reaped here: the kernel's own count of their CPU
        charged += usage.ru_utime + usage.ru_stime
    gone = meter.sample()
    return {
        "counted": counted.children_s if counted else None,
        "charged": charged,
        "gone": gone.children_s if gone else None,
    }


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
def test_the_cpu_meter_counts_what_descendants_really_use() -> None:
    """The meter's count is the CPU the kernel charged the worker's descendants, not their wall
    time, and it stays counted after they exit. Measured in a fresh process: this one's other
    descendants (the store servers of other tests) would be counted too."""
    code = "import json; from tests.worker.test_scaling import meter_against_the_kernel as m; print(json.dumps(m()))"
    root = pathlib.Path(__file__).parents[2]
    done = subprocess.run([sys.executable, "-c", code], cwd=root, capture_output=True, text=True, check=True)
    figures = json.loads(done.stdout.strip().splitlines()[-1])
    assert figures["charged"] > 0.0
    assert figures["counted"] == pytest.approx(figures["charged"], abs=0.03)  # /proc counts in ticks of 10 ms
    assert figures["gone"] == figures["counted"]  # nothing goes negative
