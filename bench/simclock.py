"""A discrete-event virtual clock for real threads: thousands of simulated workers, hours of
virtual time, seconds of real time.

Real wall-clock is impossible for the scale benchmark (one worker over 100,000 shards at S3
latencies would take days), yet it must drive the real ``Claimer`` and ``Ledger``, which are
blocking code written for threads. So each simulated worker is a real thread, and the clock
passes a baton: exactly one registered thread runs at a time; when it calls :meth:`SimClock.sleep`
it is queued at ``now + d`` and the earliest queued thread (ties in queue order) gets the baton,
with virtual time jumping to its wake-up. Virtual time advances only when every registered
thread is blocked in ``sleep`` or finished, which is then trivially true.

Why a baton rather than "advance when all are blocked" over free-running threads: it needs no
global condition variable woken for every event (1,000 threads x millions of events), and it
makes a run deterministic for fixed seeds, whatever the OS scheduler does.

The condition for soundness: a thread must not sleep while holding a lock another simulated
thread may want, and must not block on anything but ``sleep`` (a real ``time.sleep`` or
``Event.wait`` stalls the whole simulation; one that waits for another simulated thread
deadlocks it). The ledger and the simulated store take their locks around in-memory work only,
so this holds. A watchdog turns a stall into an error that names every thread's stack.
"""

from __future__ import annotations

import heapq
import itertools
import sys
import threading
import traceback
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from collections.abc import Callable

# 1,000 threads at the default 8 MiB of stack reserve 8 GiB of address space; the ledger's call
# depth (JSON, hashing) is shallow.
THREAD_STACK_BYTES = 512 * 1024


class SimStallError(RuntimeError):
    """No simulated thread passed the baton for too long: something blocked outside ``sleep``."""


class _Sleeper:
    """One simulated thread's wake-up signal: a lock held while it is parked.

    A plain lock is CPython's cheapest hand-off: the waker releases it, the sleeper's pending
    ``acquire`` returns (or, if the waker was quicker, the next ``acquire`` does not block).
    """

    __slots__ = ("gate", "name")

    def __init__(self, name: str) -> None:
        self.name = name
        self.gate = threading.Lock()
        self.gate.acquire()

    def park(self) -> None:
        self.gate.acquire()

    def wake(self) -> None:
        self.gate.release()


class SimClock:
    """Virtual seconds shared by simulated threads; ``now`` is the ``clock`` the ledger reads."""

    def __init__(self, start: float = 0.0) -> None:
        self._now = start
        self._queue: list[tuple[float, int, _Sleeper]] = []
        self._seq = itertools.count()
        self._mutex = threading.Lock()
        self._local = threading.local()
        self._threads: list[threading.Thread] = []
        self._alive = 0
        self._done = threading.Event()
        self._errors: list[tuple[str, BaseException]] = []
        self.switches = 0  # baton passes, for the watchdog and the report
        self.started = False

    # -- the two calls simulated code makes ------------------------------------------------

    def now(self) -> float:
        return self._now

    def is_simulated(self) -> bool:
        """Whether the calling thread is one of this clock's (may call :meth:`sleep`)."""
        return getattr(self._local, "sleeper", None) is not None

    def sleep(self, seconds: float) -> None:
        """Block the calling simulated thread until virtual time reaches ``now + seconds``."""
        me: _Sleeper | None = getattr(self._local, "sleeper", None)
        if me is None:
            raise RuntimeError("SimClock.sleep called from a thread the clock did not spawn")
        with self._mutex:
            heapq.heappush(self._queue, (self._now + max(0.0, seconds), next(self._seq), me))
            nxt = self._pop_locked()
        if nxt is me:  # the earliest wake-up is this thread's own: keep the baton
            return
        nxt.wake()
        me.park()

    # -- running a simulation ------------------------------------------------------------------

    def spawn(self, fn: Callable[..., Any], *args: Any, name: str | None = None) -> None:
        """Add a simulated thread that starts at the current virtual time (before :meth:`run`)."""
        if self.started:
            raise RuntimeError("spawn simulated threads before run()")
        sleeper = _Sleeper(name or f"sim-{len(self._threads)}")
        with self._mutex:
            self._alive += 1
            heapq.heappush(self._queue, (self._now, next(self._seq), sleeper))
        previous = threading.stack_size(THREAD_STACK_BYTES)
        try:
            thread = threading.Thread(target=self._body, args=(sleeper, fn, args), name=sleeper.name, daemon=True)
            thread.start()
        finally:
            threading.stack_size(previous)
        self._threads.append(thread)

    def run(self, *, stall_s: float = 120.0) -> None:
        """Give the baton to the first thread and return once every simulated thread finished.

        Raises the first exception a simulated thread raised, or :class:`SimStallError` with every
        thread's stack when no baton passed for ``stall_s`` real seconds.
        """
        self.started = True
        with self._mutex:
            first = self._pop_locked() if self._queue else None
        if first is None:
            return
        first.wake()
        seen = -1
        while not self._done.wait(stall_s):
            if self.switches == seen:
                raise SimStallError(f"no simulated thread moved for {stall_s:.0f} s real time\n{_stacks()}")
            seen = self.switches
        for thread in self._threads:
            thread.join()
        if self._errors:
            name, exc = self._errors[0]
            raise RuntimeError(f"simulated thread {name} failed: {exc!r}") from exc

    def _body(self, me: _Sleeper, fn: Callable[..., Any], args: tuple[Any, ...]) -> None:
        self._local.sleeper = me
        me.park()
        try:
            fn(*args)
        except BaseException as exc:  # reported by run(); the simulation goes on without it
            self._errors.append((me.name, exc))
        finally:
            with self._mutex:
                self._alive -= 1
                nxt = self._pop_locked() if self._queue else None
                if self._alive == 0:
                    self._done.set()
            if nxt is not None:
                nxt.wake()

    def _pop_locked(self) -> _Sleeper:
        when, _, sleeper = heapq.heappop(self._queue)
        self._now = when
        self.switches += 1
        return sleeper


def _stacks() -> str:
    """Every thread's current stack, for a stall report."""
    names = {t.ident: t.name for t in threading.enumerate()}
    out = []
    for ident, frame in sys._current_frames().items():
        out.append(f"--- {names.get(ident, ident)}\n{''.join(traceback.format_stack(frame)[-8:])}")
    return "\n".join(out[:40])
