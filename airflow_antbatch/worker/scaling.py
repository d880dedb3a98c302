"""Intra-node elastic scaling: how many preprocess processes, how many torch threads per model.

The worker watches where time goes. When the first model stage waits for input while every
preprocess process is busy, preprocessing is the bottleneck and gets one more process; when
the processes idle, one goes. Torch threads per CPU model stage take the cores that
preprocessing leaves, because OpenMP threads that outnumber free cores run many times slower
(docs/operations.md, "Performance notes"), while a light hook should leave the model every core.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import time
from itertools import zip_longest
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from collections.abc import Sequence

log = logging.getLogger(__name__)

GROW_WHEN_STARVED = 0.10  # the first model stage waited this share of the window for input
GROW_WHEN_BUSY = 0.85  # ... while the preprocess processes were busy this share of theirs
SHRINK_BELOW = 0.70  # one process fewer would still be busy under this share
PROBE_GAIN = 1.10  # more torch threads must make the model this much faster to stay


@dataclasses.dataclass
class StageClock:
    """Where one pipeline stage spent its time; written by its own thread only."""

    busy_s: float = 0.0
    wait_in_s: float = 0.0
    wait_out_s: float = 0.0
    rows: int = 0

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


class ElasticScaler:
    """Decides the preprocess pool size every ``interval_s`` from busy and wait times."""

    def __init__(
        self,
        cpu_budget: int,
        cpu_model_stages: int,
        *,
        fixed_processes: int | None = None,
        fixed_threads: int | None = None,
        interval_s: float = 2.0,
    ) -> None:
        self.cpu_budget = max(1, cpu_budget)
        self.cpu_model_stages = cpu_model_stages
        self.fixed_processes = fixed_processes
        self.fixed_threads = fixed_threads
        self.interval_s = interval_s
        self.processes = fixed_processes if fixed_processes is not None else 1
        # Until measured, the model stages get every core: with a passive OpenMP wait policy,
        # threads that share a core with a busy preprocess process lose little, and the first
        # window (half an interval) says how many cores preprocessing really needs.
        self.preprocess_cores = 0
        self._thread_cap: int | None = None
        self._probe: tuple[int, float] | None = None  # threads and model rate before an increase
        self._last_models: list[StageClock] = []
        self._shares: list[float] = []  # each model stage's share of the stages' busy time
        self.decisions: list[ScalingDecision] = []
        self._started = time.monotonic()
        self._window_start = self._started
        self._last_busy = 0.0

    @property
    def elastic(self) -> bool:
        return self.fixed_processes is None

    def torch_threads(self, stage: int = 0, stage_threads: int | None = None) -> int:
        """Intra-op threads for model stage ``stage``: its own setting, the worker's, or its share of the
        cores left (by its share of the model stages' busy time, once measured)."""
        if stage_threads:
            return stage_threads
        if self.fixed_threads:
            return self.fixed_threads
        left = self.cpu_budget - self.preprocess_cores
        if len(self._shares) > stage:
            threads = round(left * self._shares[stage])
        else:
            threads = left // max(1, self.cpu_model_stages)
        return max(1, min(threads, self._thread_cap or self.cpu_budget))

    def observe(self, pool_busy_s: float, models: Sequence[StageClock], now: float | None = None) -> int | None:
        """Feed cumulative counters (the pool's, the model stages'); returns a new pool size when decided.

        ``pool_busy_s`` is the time spent inside the preprocess hook, summed over processes;
        over a window it says how many cores preprocessing keeps busy, and the model stages'
        threads get the rest: a light hook leaves the model every core, a heavy one gets its own.
        More threads are kept only if the model then scores faster: on a loaded machine they
        can make it slower, and the scaler goes back.
        """
        now = time.monotonic() if now is None else now
        window = now - self._window_start
        first = not self._last_models
        if window < (self.interval_s / 2 if first else self.interval_s) or self.processes == 0:
            return None
        demand = (pool_busy_s - self._last_busy) / window
        busy = demand / self.processes
        model, last = models[0], self._last_models[0] if self._last_models else StageClock()
        starved = min(1.0, (model.wait_in_s - last.wait_in_s) / window)
        model_busy = model.busy_s - last.busy_s
        rate = (model.rows - last.rows) / model_busy if model_busy > 0.2 * window else None
        busy_by_stage = [m.busy_s - (o.busy_s if o else 0.0) for m, o in zip_longest(models, self._last_models)]
        if sum(busy_by_stage) > 0.2 * window:
            self._shares = [b / sum(busy_by_stage) for b in busy_by_stage]
        self._window_start, self._last_busy = now, pool_busy_s
        self._last_models = [dataclasses.replace(m) for m in models]
        figures = f"first model stage waited {starved:.0%} of {window:.1f}s, preprocess processes busy {busy:.0%}"
        if self._check_probe(rate, now):
            return None
        processes, reason = self.processes, f"preprocess uses {demand:.1f} cores: {figures}"
        if self.elastic and starved >= GROW_WHEN_STARVED and busy >= GROW_WHEN_BUSY and processes < self.cpu_budget:
            processes, reason = processes + 1, f"preprocess is the bottleneck: {figures}"
        elif self.elastic and processes > 1 and demand < (processes - 1) * SHRINK_BELOW:
            processes, reason = processes - 1, f"preprocess has spare capacity: {figures}"
        threads = self.torch_threads()
        # A process that is added is assumed busy; otherwise preprocessing keeps the cores it
        # mostly uses, and a core it uses only now and then is offered to the model (on probation).
        cores = processes if processes > self.processes else min(processes, math.floor(demand + 0.25))
        before, self.processes, self.preprocess_cores = self.processes, processes, cores
        if processes == before and self.torch_threads() == threads:
            return None
        if self.torch_threads() > threads and rate is not None:
            self._probe = (threads, rate)
        self._record(before, now, reason)
        return processes if processes != before else None

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
