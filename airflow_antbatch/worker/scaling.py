"""Intra-node elastic scaling: how many preprocess processes, how many torch threads per model.

The worker watches where time goes (stage clocks) and what really uses the cores (the kernel's
CPU count for the worker and its preprocess processes, ``CpuMeter``). When the first model
stage waits for input while every preprocess process is busy and a core of the budget is
free by the kernel's count, or the processes ran on the cores they were busy for (then the
starved model's threads hold the rest, and give it up), preprocessing is the bottleneck and
gets more processes: as many as would keep the model busy, within the cores left free (a
process waiting for a core is not taken for one using it); when the processes idle for a
whole window after the last ones were added, one goes. A model stage counts
as using cores only if its thread is on the CPU while it works: one that waits on a device
(CUDA, or anything that blocks without computing) leaves its cores to preprocessing. Torch
threads per CPU model stage take the cores that preprocessing leaves, because OpenMP threads
that spin while they wait and outnumber free cores run many times slower (docs/operations.md,
"Performance notes"), while a light hook should leave the model every core. Threads that wait
passively (``OMP_WAIT_POLICY=PASSIVE``, which the ``antbatch`` command sets) lose little when
they share cores with busy preprocess processes, and two beat one there: then the model keeps
every core and the kernel shares them.

The first window opens when the first batch has been scored (the pipeline's fill is not a
bottleneck) and lasts ``FIRST_WINDOW_S``; each next one is twice as long, up to the interval,
so a job of a few seconds gets its decisions in time and a long one does not flap.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import os
import time
from itertools import zip_longest
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from collections.abc import Sequence

log = logging.getLogger(__name__)

GROW_WHEN_STARVED = 0.10  # the first model stage waited this share of the window for input
GROW_WHEN_BUSY = 0.75  # ... while the preprocess processes were inside the hook this share of theirs
GROW_WHEN_FREE = 0.75  # ... and the worker's processes left this many cores of the budget unused,
GROW_WHEN_ON_CPU = 0.80  # ... or the processes were on a core this share of their busy time
MAX_GROWTH = 4  # a saturated pool grows at most to this many times its size in one window
SHRINK_BELOW = 0.70  # one process fewer would still be busy under this share
PROBE_GAIN = 1.10  # more torch threads must make the model this much faster to stay
# A model stage whose thread is on the CPU under this share of its busy time waits on a device: one
# that waits on a simulated device measured 2%; one that computes, on a core shared with a load of
# 9 on 2 cores, 22%.
ON_CPU_SHARE = 0.10
FIRST_WINDOW_S = 0.5
MEASURED_SHARE = 0.20  # a stage busy under this share of a window has too little to say


@dataclasses.dataclass
class StageClock:
    """Where one pipeline stage spent its time; written by its own thread only. ``cpu_s`` is the
    CPU time of that thread while busy (model stages): near zero for a stage that waits on a device."""

    busy_s: float = 0.0
    wait_in_s: float = 0.0
    wait_out_s: float = 0.0
    rows: int = 0
    cpu_s: float = 0.0

    def to_dict(self) -> dict[str, float | int]:
        return {k: round(v, 3) if isinstance(v, float) else v for k, v in dataclasses.asdict(self).items()}


@dataclasses.dataclass(frozen=True)
class ScalingDecision:
    at_s: float
    processes_from: int
    processes_to: int
    torch_threads: int  # per CPU model stage, after the change
    reason: str

    def to_dict(self) -> dict[str, object]:
        return dataclasses.asdict(self)


@dataclasses.dataclass(frozen=True)
class CpuSample:
    """Cumulative CPU seconds: of this process (every thread: stages, torch's threads) and of its
    descendants (the preprocess processes and their forkserver)."""

    worker_s: float
    children_s: float


class CpuMeter:
    """Reads what the worker's process tree used from the kernel (Linux ``/proc``), so that a
    process waiting for a core does not count as using one. Elsewhere ``sample`` returns None
    and the scaler estimates from busy times."""

    def __init__(self) -> None:
        self._tick = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100
        self._seen: dict[int, float] = {}  # descendant pid -> its CPU seconds at the last sample
        self._children_s = 0.0  # the sum of their increases: descendants that exit keep what they used

    def sample(self) -> CpuSample | None:
        try:
            now = {pid: self._cpu_s(pid) for pid in self._descendants(os.getpid())}
        except OSError:
            return None
        self._children_s += sum(max(0.0, cpu - self._seen.get(pid, 0.0)) for pid, cpu in now.items())
        self._seen = now
        return CpuSample(time.process_time(), self._children_s)

    def _descendants(self, pid: int) -> list[int]:
        found: list[int] = []
        for task in os.listdir(f"/proc/{pid}/task"):
            try:
                with open(f"/proc/{pid}/task/{task}/children") as handle:
                    children = [int(c) for c in handle.read().split()]
            except FileNotFoundError:  # the thread ended meanwhile
                continue
            for child in children:
                found.append(child)
                try:
                    found.extend(self._descendants(child))
                except FileNotFoundError:  # it exited meanwhile
                    continue
        return found

    def _cpu_s(self, pid: int) -> float:
        try:
            with open(f"/proc/{pid}/stat") as handle:
                fields = handle.read().rsplit(")", 1)[1].split()
        except FileNotFoundError:
            return self._seen.get(pid, 0.0)
        return (int(fields[11]) + int(fields[12])) / self._tick  # utime, stime


@dataclasses.dataclass(frozen=True)
class Window:
    """What one window measured: the figures every decision is made from and logged with."""

    seconds: float
    demand: float  # cores' worth of time the processes spent inside the hook (summed over processes)
    busy: float  # ... per process: whether they had work
    starved: float  # share of the window the first model stage waited for input
    preprocess_cpu: float  # cores the preprocess processes really used (the kernel's count), else ``demand``
    model_cores: float  # cores the model stages used: their threads on the CPU, times torch threads
    worker_cores: float  # cores the worker's own threads used (models, reader, writer), else ``model_cores``
    free: float  # cores of the budget the worker left unused
    devices: int  # model stages that waited on a device rather than computed

    def text(self, processes: int) -> str:
        waiting = f", {self.devices} model stage(s) waiting on a device" if self.devices else ""
        return (
            f"first model stage waited {self.starved:.0%} of {self.seconds:.1f}s, {processes} preprocess "
            f"process(es) busy {self.busy:.0%} on {self.preprocess_cpu:.1f} cores, model stages on "
            f"{self.model_cores:.1f} cores, {max(0.0, self.free):.1f} cores free{waiting}"
        )


class ElasticScaler:
    """Decides the preprocess pool size at the end of each window from busy, wait and CPU times."""

    def __init__(
        self,
        cpu_budget: int,
        cpu_model_stages: int,
        *,
        fixed_processes: int | None = None,
        fixed_threads: int | None = None,
        interval_s: float = 2.0,
        passive_wait: bool | None = None,
    ) -> None:
        self.cpu_budget = max(1, cpu_budget)
        self.cpu_model_stages = cpu_model_stages  # as declared (not on CUDA), until measured
        self.fixed_processes = fixed_processes
        self.fixed_threads = fixed_threads
        self.interval_s = interval_s
        # Whether torch's OpenMP threads wait passively (None: as this process's environment says).
        self.passive_wait = passive_wait if passive_wait is not None else _waits_passively()
        self.processes = fixed_processes if fixed_processes is not None else 1
        # Until measured, the model stages get every core: with a passive OpenMP wait policy,
        # threads that share a core with a busy preprocess process lose little, and the first
        # window says how many cores preprocessing really needs.
        self.preprocess_cores = 0
        self._thread_cap: int | None = None
        self._probe: tuple[int, float] | None = None  # threads and model rate before an increase
        self._last_models: list[StageClock] = []
        self._shares: list[float] = []  # each model stage's share of the CPU model stages' busy time
        self._on_cpu: list[bool] | None = None  # each model stage, once measured
        self.decisions: list[ScalingDecision] = []
        self._started = time.monotonic()
        self._window_start: float | None = None  # opens once the first batch has been scored
        self._window_s = min(FIRST_WINDOW_S, interval_s)
        self._last_busy = 0.0
        self._last_cpu: CpuSample | None = None
        self._grew = False  # the last window's decision added a process
        self._pool_starting = False  # the preprocess processes have not started yet (``observe``)
        self._meter = CpuMeter()

    @property
    def elastic(self) -> bool:
        return self.fixed_processes is None

    def on_cpu(self, stage: int) -> bool:
        """Whether model stage ``stage`` computes on the CPU (so its torch threads matter), as measured."""
        return self._on_cpu is None or stage >= len(self._on_cpu) or self._on_cpu[stage]

    def torch_threads(self, stage: int = 0, stage_threads: int | None = None) -> int:
        """Intra-op threads for model stage ``stage``: its own setting, the worker's, or its share of the
        cores left (by its share of the CPU model stages' busy time, once measured)."""
        if stage_threads:
            return stage_threads
        if self.fixed_threads:
            return self.fixed_threads
        left = self.cpu_budget - self.preprocess_cores
        if len(self._shares) > stage:
            threads = round(left * self._shares[stage])
        else:
            stages = sum(self._on_cpu) if self._on_cpu is not None else self.cpu_model_stages
            threads = left // max(1, stages)
        return max(1, min(threads, self._thread_cap or self.cpu_budget))

    def observe(
        self,
        pool_busy_s: float,
        models: Sequence[StageClock],
        now: float | None = None,
        cpu: CpuSample | None = None,
        *,
        pool_started: bool = True,
    ) -> int | None:
        """Feed cumulative counters (the pool's, the model stages'); returns a new pool size when decided.

        ``pool_busy_s`` is the time spent inside the preprocess hook, summed over processes: over
        a window it says whether the processes had work. ``cpu`` (read from the kernel when
        ``now`` is not given) says what they and the worker really used, so the model stages'
        threads get the cores left: a light hook leaves the model every core, a heavy one gets
        its own. More threads are kept only if the model then scores faster: on a loaded
        machine they can make it slower, and the scaler goes back.

        Until ``pool_started``, the worker preprocesses in its own thread while the first
        processes start: a window then measures that thread, not the processes it counts, so it
        never shrinks the pool, and the first window after the start opens afresh, short. On a
        16-core GPU machine whose processes took 3 s to start, windows that read "4 processes
        busy 25%" (the thread alone) held the pool at 4 until 6.5 s into a 9 s job.
        """
        # The kernel is read only when a window opens or closes: this runs on every turn of the
        # preprocess stage's loop, and a read of /proc costs about 0.4 ms of its CPU.
        live = now is None
        now = time.monotonic() if now is None else now
        if self.processes == 0 or not models:
            return None
        if not pool_started:
            self._pool_starting = True
        elif self._pool_starting and self._window_start is not None:
            self._pool_starting, self._window_start = False, None  # the first window of the processes opens now
            self._window_s = min(FIRST_WINDOW_S, self.interval_s)
        if self._window_start is None:
            if models[0].rows:
                self._open(now, pool_busy_s, models, cpu or (self._meter.sample() if live else None))
            return None
        if now - self._window_start < self._window_s:
            return None
        cpu = cpu or (self._meter.sample() if live else None)
        measured = self._measure(now - self._window_start, pool_busy_s, models, cpu)
        rate = self._model_rate(models[0], now - self._window_start)
        self._open(now, pool_busy_s, models, cpu)
        self._window_s = min(self.interval_s, 2 * self._window_s)
        log.debug("scaling window: %s", measured.text(self.processes))
        if self._check_probe(rate, now):
            return None
        return self._decide(measured, rate, now)

    def _open(self, now: float, pool_busy_s: float, models: Sequence[StageClock], cpu: CpuSample | None) -> None:
        self._window_start, self._last_busy, self._last_cpu = now, pool_busy_s, cpu
        self._last_models = [dataclasses.replace(m) for m in models]

    def _model_rate(self, model: StageClock, window: float) -> float | None:
        """Rows per busy second of the first model stage, if it was busy enough to tell."""
        last = self._last_models[0]
        busy = model.busy_s - last.busy_s
        return (model.rows - last.rows) / busy if busy > MEASURED_SHARE * window else None

    def _measure(
        self, window: float, pool_busy_s: float, models: Sequence[StageClock], cpu: CpuSample | None
    ) -> Window:
        """The window's figures; also learns which model stages compute and how they share the cores."""
        demand = (pool_busy_s - self._last_busy) / window
        deltas = [
            StageClock(m.busy_s - o.busy_s, m.wait_in_s - o.wait_in_s, 0.0, m.rows - o.rows, m.cpu_s - o.cpu_s)
            for m, o in zip_longest(models, self._last_models, fillvalue=StageClock())
        ][: len(models)]
        on_cpu = list(self._on_cpu or [True] * len(models))
        for i, d in enumerate(deltas):
            if d.busy_s > MEASURED_SHARE * window:
                on_cpu[i] = d.cpu_s >= ON_CPU_SHARE * d.busy_s
        self._on_cpu = on_cpu
        cpu_busy = [d.busy_s if on else 0.0 for d, on in zip(deltas, on_cpu, strict=True)]
        if sum(cpu_busy) > MEASURED_SHARE * window:
            self._shares = [b / sum(cpu_busy) for b in cpu_busy]
        model_cores = sum(
            min(1.0, d.busy_s / window) * self.torch_threads(i) if on else d.cpu_s / window
            for i, (d, on) in enumerate(zip(deltas, on_cpu, strict=True))
        )
        last = self._last_cpu
        if cpu is not None and last is not None:
            preprocess_cpu = (cpu.children_s - last.children_s) / window
            worker_cores = (cpu.worker_s - last.worker_s) / window
        else:  # estimated: a process waiting for a core counts as using it
            preprocess_cpu, worker_cores = demand, model_cores
        return Window(
            seconds=window,
            demand=demand,
            busy=demand / self.processes,
            starved=min(1.0, deltas[0].wait_in_s / window),
            preprocess_cpu=preprocess_cpu,
            model_cores=model_cores,
            worker_cores=worker_cores,
            free=self.cpu_budget - preprocess_cpu - worker_cores,
            devices=on_cpu.count(False),
        )

    def _decide(self, w: Window, rate: float | None, now: float) -> int | None:
        figures = w.text(self.processes)
        # A process added in the last window may still be starting: its first window does not
        # count against it (the pool is not shrunk straight back). Nor do windows before the first
        # processes have started.
        grew = self._grew or self._pool_starting
        processes, reason = self.processes, f"preprocess keeps {w.demand:.1f} cores busy: {figures}"
        bottleneck = w.starved >= GROW_WHEN_STARVED and w.busy >= GROW_WHEN_BUSY
        # A core is there for another process if the worker leaves one unused, or if its processes
        # got the cores they were busy for: then what holds the rest is the starved model's threads,
        # which give it up (they are set from the cores preprocessing leaves). Measured on the
        # new-user job (600k rows, 2 cores): 2 processes 14.8 s median against 1 process 16.8 s.
        room = w.free >= GROW_WHEN_FREE or w.preprocess_cpu >= GROW_WHEN_ON_CPU * w.demand
        if self.elastic and bottleneck and room and processes < self.cpu_budget:
            processes, reason = processes + self._grow_by(w), f"preprocess is the bottleneck: {figures}"
        elif self.elastic and not grew and processes > 1 and w.demand < (processes - 1) * SHRINK_BELOW:
            processes, reason = processes - 1, f"preprocess has spare capacity: {figures}"
        threads = self.torch_threads()
        if self.passive_wait:
            # Sleeping threads share cores gracefully (module docstring): preprocessing keeps none.
            # Measured, interleaved: the full profile's single job 1,281 against 1,076 rows/s, its
            # chain 1,151 against 1,100, the new-user job 3.54 against 3.76 s (120k rows) and
            # 11.4 against 11.9 s (600k).
            cores = 0
        elif processes > self.processes:  # a process that is added is assumed busy
            cores = processes
        else:
            # Preprocessing keeps the cores it mostly uses, and a core it uses only now and then
            # is offered to the model (on probation). Counted by the clock, not the kernel: a
            # process with work competes for a core even while it waits for one, and spinning
            # torch threads that outnumber the free cores collapse.
            cores = min(processes, math.floor(w.demand + 0.25))
        self._grew = processes > self.processes
        before, self.processes, self.preprocess_cores = self.processes, processes, cores
        # Threads matter only to stages that compute on the CPU.
        threads_moved = self.torch_threads() != threads and any(self._on_cpu or [True])
        if processes == before and not threads_moved:
            return None
        if self.torch_threads() > threads and rate is not None:
            self._probe = (threads, rate)
        self._record(before, now, reason)
        return processes if processes != before else None

    def _grow_by(self, w: Window) -> int:
        """Processes to add to a saturated pool: as many as would keep the starved model busy, at
        most four times the pool in one window, and within the cores left once it is fed (always
        one: a core the starved model's threads hold is theirs to give up).

        Busy processes feed the model in proportion to their number while each has a core, so
        ``processes / (1 - starved)`` would fill it (a floor: the model also waits on output and
        on itself). Fed that much faster, the worker's own threads (the model's, the reader's,
        the writer's) use that much more CPU too. One process a window left a 16-core GPU
        machine at 4 and 6 processes when its 12- and 9-second jobs ended (bench.gpu: GPU 9% and
        47% busy)."""
        speedup = 1.0 / max(1.0 - w.starved, 1.0 / MAX_GROWTH)
        fed = math.ceil(self.processes * speedup)
        room = math.floor(self.cpu_budget - w.worker_cores * speedup)
        return max(1, min(fed, room, self.cpu_budget) - self.processes)

    def _check_probe(self, rate: float | None, now: float) -> bool:
        """After adding threads: keep them if the model got faster, else go back for good."""
        if self._probe is None or rate is None:
            return False
        threads, rate_before = self._probe
        self._probe = None
        if rate >= rate_before * PROBE_GAIN:
            return False
        more = self.torch_threads()
        self._thread_cap = threads
        reason = (
            f"{more} torch threads scored {rate:.0f} rows per busy second against {rate_before:.0f} with {threads}: "
            "the cores are not free"
        )
        self._record(self.processes, now, reason)
        return True

    def _record(self, before: int, now: float, reason: str) -> None:
        decision = ScalingDecision(round(now - self._started, 2), before, self.processes, self.torch_threads(), reason)
        self.decisions.append(decision)
        log.info(
            "preprocess processes %d -> %d, torch threads per model stage %d: %s",
            before,
            self.processes,
            decision.torch_threads,
            reason,
        )


def _waits_passively() -> bool:
    return os.environ.get("OMP_WAIT_POLICY", "").strip().upper() == "PASSIVE"
