"""Intra-node elastic scaling: how many preprocess processes, how many torch threads per model.

The worker watches where time goes. When the first model stage waits for input while every
preprocess process is busy, preprocessing is the bottleneck and gets one more process; when
the processes idle, one goes. Torch threads per CPU model stage take what the CPU budget leaves,
because OpenMP threads that outnumber free cores spin against each other and run many times
slower (docs/benchmarks.md, PERF_NOTES).
"""

from __future__ import annotations

import dataclasses
import logging
import time

log = logging.getLogger(__name__)

GROW_WHEN_STARVED = 0.10  # the first model stage waited this share of the window for input
GROW_WHEN_BUSY = 0.85  # ... while the preprocess processes were busy this share of theirs
SHRINK_BELOW = 0.70  # one process fewer would still be busy under this share


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
        self.decisions: list[ScalingDecision] = []
        self._started = time.monotonic()
        self._window_start = self._started
        self._last_busy = 0.0
        self._last_starved = 0.0

    @property
    def elastic(self) -> bool:
        return self.fixed_processes is None

    def torch_threads(self, stage_threads: int | None = None) -> int:
        """Intra-op threads for one CPU model stage: its own setting, the worker's, or the share left."""
        if stage_threads:
            return stage_threads
        if self.fixed_threads:
            return self.fixed_threads
        left = self.cpu_budget - self.processes
        return max(1, left // max(1, self.cpu_model_stages))

    def observe(self, pool_busy_s: float, model_starved_s: float, now: float | None = None) -> int | None:
        """Feed cumulative counters; returns a new pool size when one is decided."""
        now = time.monotonic() if now is None else now
        window = now - self._window_start
        if not self.elastic or window < self.interval_s:
            return None
        busy = (pool_busy_s - self._last_busy) / (window * self.processes)
        starved = (model_starved_s - self._last_starved) / window
        self._window_start, self._last_busy, self._last_starved = now, pool_busy_s, model_starved_s
        figures = f"first model stage waited {starved:.0%} of {window:.1f}s, preprocess processes busy {busy:.0%}"
        if starved >= GROW_WHEN_STARVED and busy >= GROW_WHEN_BUSY and self.processes < self.cpu_budget:
            return self._decide(self.processes + 1, now, f"preprocess is the bottleneck: {figures}")
        if self.processes > 1 and busy * self.processes < (self.processes - 1) * SHRINK_BELOW:
            return self._decide(self.processes - 1, now, f"preprocess has spare capacity: {figures}")
        return None

    def _decide(self, processes: int, now: float, reason: str) -> int:
        before, self.processes = self.processes, processes
        decision = ScalingDecision(round(now - self._started, 2), before, processes, self.torch_threads(), reason)
        self.decisions.append(decision)
        log.info(
            "preprocess processes %d -> %d (torch threads per model stage now %d): %s",
            before,
            processes,
            decision.torch_threads,
            reason,
        )
        return processes
