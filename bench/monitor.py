"""Peak memory and CPU time of a whole process tree, sampled from outside with psutil.

A system's cost is every process it starts: the antbatch worker's preprocess children, Ray's
raylet, GCS, object store and workers. The sampler walks the tree every ``interval_s`` and
keeps, per process, its last seen CPU time, so processes that exit between samples still count
(less their last interval). RSS is summed over the tree: pages shared between processes
(torch's libraries, Ray's object store in /dev/shm) count once per process, so the sum is an
upper bound of what the tree holds.
"""

from __future__ import annotations

import bisect
import dataclasses
import threading
import time

import psutil


@dataclasses.dataclass
class Sample:
    at: float  # time.time(), to line up with the windows the systems report
    cpu_s: float  # CPU seconds of the tree so far, exited processes included
    rss_bytes: int
    processes: int


class TreeMonitor:
    """Samples the tree under ``pid`` on a thread until ``stop``."""

    def __init__(self, pid: int, interval_s: float = 0.1) -> None:
        self.root = psutil.Process(pid)
        self.interval_s = interval_s
        self.samples: list[Sample] = []
        self._cpu: dict[tuple[int, float], float] = {}  # (pid, create_time) -> last CPU seconds
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="tree-monitor", daemon=True)

    def __enter__(self) -> TreeMonitor:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()

    def _run(self) -> None:
        while not self._stop.is_set():
            self._sample()
            self._stop.wait(self.interval_s)

    def _sample(self) -> None:
        try:
            procs = [self.root, *self.root.children(recursive=True)]
        except psutil.Error:
            return
        rss = 0
        alive = 0
        for proc in procs:
            try:
                with proc.oneshot():
                    times = proc.cpu_times()
                    rss += proc.memory_info().rss
                    key = (proc.pid, proc.create_time())
            except psutil.Error:
                continue
            alive += 1
            self._cpu[key] = times.user + times.system
        self.samples.append(Sample(time.time(), sum(self._cpu.values()), rss, alive))

    # -- summaries ---------------------------------------------------------------------------

    @property
    def peak_rss_mb(self) -> float:
        return max((s.rss_bytes for s in self.samples), default=0) / 2**20

    @property
    def max_processes(self) -> int:
        return max((s.processes for s in self.samples), default=0)

    def cpu_between(self, start: float, end: float) -> float:
        """CPU seconds the tree used between two wall-clock times (nearest samples)."""
        if not self.samples:
            return 0.0
        times = [s.at for s in self.samples]

        def at(t: float) -> float:
            index = min(len(self.samples) - 1, bisect.bisect_left(times, t))
            return self.samples[index].cpu_s

        return max(0.0, at(end) - at(start))

    def utilisation(self, start: float, end: float, cpus: int) -> float:
        """Share of the machine's CPUs the tree kept busy in the window (1.0: all of them)."""
        return self.cpu_between(start, end) / max(1e-9, (end - start) * cpus)
