"""Running the user's preprocess hook in child processes that may die.

Preprocess code is CPU-bound Python, so it runs in processes beside the model stages rather than
in threads that would fight over the GIL. A child that dies (``os._exit``, a segfault, an OOM
kill) is replaced and its batch tried again. A batch that kills a child twice, or on which the
hook raises, is split in halves, and halves are split again, until the record that does it is
alone: that record is quarantined with the reason, and every other record of the batch goes
on. Nothing is lost and nothing is scored twice.

The pool starts in the background: starting a child waits for the forkserver, which may still
be importing torch and the hook, so the first children are started by a thread of their own
and say they are ready through ``poll``. Until then (``started`` is False) the caller has
no process to run the hook in and may run it itself (``preprocess_stage``).

A child added to a running pool warms up first: its first call of the hook may pay set-up the
hook does lazily (a tokenizer's vocabulary, a lookup table: 0.25 s on a batch of 0.1 s in the
bench's), and results leave in input order, so a real batch sent to it would hold up every
batch behind it for that long. So it is sent a copy of the batch submitted last, whose output
is dropped, and real batches only once that comes back. The hook may run on rows more than once
already (a batch is retried after a child dies), so a hook must not count on once.
"""

from __future__ import annotations

import collections
import dataclasses
import logging
import multiprocessing
import multiprocessing.connection
import queue
import signal
import sys
import threading
import time
import traceback
from typing import TYPE_CHECKING, Any

from airflow_antbatch.errors import WorkerError
from airflow_antbatch.worker import forkserver
from airflow_antbatch.worker.codec import (
    SharedBuffer,
    SharedBuffers,
    batch_from_bytes,
    recv_batch,
    recv_tree,
    send_batch,
    send_tree,
)
from airflow_antbatch.worker.user_code import load_callable

if TYPE_CHECKING:
    import mmap
    from multiprocessing.connection import Connection
    from multiprocessing.process import BaseProcess

    import pyarrow as pa

log = logging.getLogger(__name__)

# A whole batch gets one death for free (an OOM kill may be the machine's fault, not the
# data's); a record alone gets one too before it is quarantined.
DEATHS_BEFORE_SPLIT = 2
DEATHS_BEFORE_QUARANTINE = 2
# Children that die before they are ready point at a broken environment, not bad data.
MAX_START_FAILURES = 3
# How long the first child may take to import torch and the hook before the worker gives up.
READY_TIMEOUT_S = 300.0
# Tasks sent to a child at once: the next one waits in its pipe while it works on the first,
# so that it never idles for the round trip through the parent (a few milliseconds, against
# a batch's few milliseconds of feature code).
TASKS_PER_CHILD = 2
WARM_UP_KEY = -1  # the key of a warm-up task (a copy: its outcome is dropped)


@dataclasses.dataclass
class Task:
    """Rows of one chunk to preprocess; a part of it once the chunk has been split."""

    key: int
    offset: int
    batch: pa.RecordBatch
    deaths: int = 0
    is_part: bool = False
    sent_at: float = 0.0  # when it went down the child's pipe (time.monotonic)
    shared: SharedBuffer | None = None  # the shared memory the child reads it from, until it is back


@dataclasses.dataclass
class Outcome:
    """What became of one task: its output, or the reason its lone record was quarantined."""

    key: int
    offset: int
    batch: pa.RecordBatch
    output: Any = None
    quarantine_reason: str | None = None


class _Child:
    def __init__(self, process: BaseProcess, conn: Connection) -> None:
        self.process = process
        self.conn = conn
        self.tasks: collections.deque[Task] = collections.deque()  # in the order sent; the first is running
        self.retiring = False
        self.warm_up: pa.RecordBatch | None = None  # a copy to run before real batches (module docstring)
        self.ready = False  # it has imported the hook: only now may it be blamed for a death
        self.free_at = 0.0  # when its last result came back: the next task in its pipe started then


class PreprocessPool:
    """A resizable set of preprocess processes, each fed up to ``TASKS_PER_CHILD`` tasks; results
    come back by ``poll``."""

    def __init__(self, preprocess_ref: str, size: int) -> None:
        self.ref = preprocess_ref
        self._ctx = forkserver.context(preprocess_ref)
        self._children: list[_Child] = []
        self._queue: collections.deque[Task] = collections.deque()
        self._buffers = SharedBuffers()  # large batches go to the children in shared memory
        self._target = max(1, size)
        self._busy_s = 0.0  # finished tasks, as the children measured them
        self._busy_seen = 0.0  # the most busy_seconds has said
        self._last_batch: pa.RecordBatch | None = None  # what a child added later warms up on
        self._start_failures = 0
        self.restarts = 0
        self.started = False  # a child has been ready: from now on the pool never lacks processes for long
        self._ready_by = time.monotonic() + READY_TIMEOUT_S
        # The first children, started by a thread (see the module's docstring); adopted by poll.
        self._lock = threading.Lock()
        self._closed = False
        self._first: list[_Child] | BaseException | None = None
        self._starter: threading.Thread | None = threading.Thread(
            target=self._start_first, args=(self._target,), name="antbatch-pool-start", daemon=True
        )
        self._starter.start()

    @property
    def size(self) -> int:
        return self._target

    @property
    def in_flight(self) -> int:
        return len(self._queue) + sum(len(c.tasks) for c in self._children)

    @property
    def capacity(self) -> int:
        """Batches the pool takes at once: one running and one waiting in each child's pipe, and
        one more in the parent's queue, ready for the first child that frees."""
        return self._target * TASKS_PER_CHILD + 1

    def wants_more(self) -> bool:
        """True while a new chunk would find room in a child's pipe: keeps memory bounded."""
        return self.in_flight < self.capacity

    def busy_seconds(self) -> float:
        """Time children have spent inside the hook up to now: the CPU preprocess takes.

        Finished tasks count as the child measured them, because the time a task is out also
        holds the time the parent took to collect it, which grows when the model stages are the
        bottleneck. A task still running counts from when it started (sent, or its child's last
        result back, whichever is later), so that the scaler's windows each get the time spent
        in them: counted whole when it comes back, a batch begun before a window opened (the
        first, with the hook's lazy set-up) once read as 1.6 cores busy for one process and
        took a core from the model."""
        now = time.monotonic()
        running = (c for c in self._children if c.tasks and c.tasks[0].key != WARM_UP_KEY)
        counted = self._busy_s + sum(max(0.0, now - max(c.tasks[0].sent_at, c.free_at)) for c in running)
        # Never less than before: a batch done but not yet collected counted on until it came
        # back, longer than the child measured, and a window must not see negative time.
        self._busy_seen = max(self._busy_seen, counted)
        return self._busy_seen

    def wait_ready(self) -> None:
        """Block until every child has imported the hook (or raise why one cannot)."""
        while self._starter is not None or any(not c.ready for c in self._children):
            self.poll(1.0)

    def submit(self, key: int, batch: pa.RecordBatch) -> None:
        self._queue.append(Task(key, 0, batch))
        self._last_batch = batch

    def resize(self, size: int) -> None:
        """Grow at once; shrink by retiring idle children now and busy ones when they finish.
        While the first children are starting, they are matched to the size once adopted."""
        self._target = max(1, size)
        if self._starter is not None:
            return
        live = [c for c in self._children if not c.retiring]
        for child in live[self._target :]:
            child.retiring = True
        while len([c for c in self._children if not c.retiring]) < self._target:
            child = self._start()
            child.warm_up = self._last_batch if self.started else None  # the first children have nothing to wait behind
            self._children.append(child)
        self._retire_idle()

    def poll(self, timeout: float) -> list[Outcome]:
        """Hand queued tasks to idle children, wait up to ``timeout`` for results, handle deaths."""
        if not self.started and time.monotonic() > self._ready_by:
            raise WorkerError(f"preprocess processes did not import {self.ref!r} within {READY_TIMEOUT_S:.0f}s")
        if not self._adopt(timeout):
            return []
        self._dispatch()
        watched = [c for c in self._children if c.tasks or not c.ready]
        if not watched:
            return []
        waitables: list[Any] = [c.conn for c in watched] + [c.process.sentinel for c in watched]
        ready = set(multiprocessing.connection.wait(waitables, timeout))
        outcomes: list[Outcome] = []
        for child in watched:
            if child.conn not in ready and child.process.sentinel not in ready:
                continue
            if not child.ready:
                self._handshake(child)
            elif child.conn in ready:
                outcomes.extend(self._receive(child))
            else:
                outcomes.extend(self._died(child))
        self._retire_idle()
        self._dispatch()
        return outcomes

    def close(self) -> None:
        """Stop every child; first children still starting are stopped by their thread, not waited for."""
        with self._lock:
            self._closed = True
            first = self._first if isinstance(self._first, list) else []
            self._first = None
        for child in [*self._children, *first]:
            self._stop_child(child)
            for task in child.tasks:
                self._release(task)
        self._children.clear()
        self._queue.clear()
        self._buffers.close()

    # -- the first children, in the background ------------------------------------------------

    def _start_first(self, size: int) -> None:
        """The starter thread: each start waits until the forkserver has imported its modules."""
        children: list[_Child] = []
        try:
            children.extend(self._start() for _ in range(size))  # those started stay listed if one fails
        except BaseException as exc:  # handed to poll, which raises it in the pipeline's thread
            for child in children:
                self._stop_child(child)
            with self._lock:
                self._first = exc
            return
        with self._lock:
            closed = self._closed
            if not closed:
                self._first = children
        if closed:
            for child in children:
                self._stop_child(child)

    def _adopt(self, timeout: float) -> bool:
        """Whether the first children have been started, waiting up to ``timeout`` for it."""
        if self._starter is None:
            return True
        self._starter.join(timeout)
        if self._starter.is_alive():
            return False
        self._starter = None
        with self._lock:
            first, self._first = self._first, None
        if isinstance(first, BaseException):
            raise WorkerError(f"preprocess processes cannot start: {first!r}") from first
        self._children = list(first or [])
        self.resize(self._target)
        return True

    # -- children ----------------------------------------------------------------------------

    def _start(self) -> _Child:
        parent_end, child_end = self._ctx.Pipe()
        process = self._ctx.Process(
            target=_child_main, args=(child_end, self.ref), name="antbatch-preprocess", daemon=True
        )
        process.start()
        child_end.close()
        return _Child(process, parent_end)

    def _stop_child(self, child: _Child) -> None:
        """A ready child finishes its task and exits; one still importing is killed at once."""
        if not child.ready:
            child.process.kill()
        try:
            child.conn.send(None)
        except OSError:
            pass
        child.conn.close()
        child.process.join(timeout=2)
        if child.process.is_alive():
            child.process.kill()
            child.process.join()

    def _retire_idle(self) -> None:
        for child in [c for c in self._children if c.retiring and not c.tasks]:
            self._children.remove(child)
            self._stop_child(child)

    def _dispatch(self) -> None:
        """A task to every child with none, then a second to each: the load spreads first. A child
        warming up gets its copy first and nothing more until that is back."""
        for child in [c for c in self._children if c.warm_up is not None and c.ready and not c.retiring]:
            task, child.warm_up = Task(WARM_UP_KEY, 0, child.warm_up), None
            if not self._send(child, task):
                self._replace(child)
        for depth in range(TASKS_PER_CHILD):
            for child in list(self._children):
                if not self._queue:
                    return
                warming = bool(child.tasks) and child.tasks[0].key == WARM_UP_KEY
                if len(child.tasks) != depth or child.retiring or not child.ready or warming:
                    continue
                task = self._queue.popleft()
                if not self._send(child, task):
                    self._queue.appendleft(task)
                    if not child.tasks:  # it died while idle; one with tasks is judged by poll
                        self._replace(child)

    def _send(self, child: _Child, task: Task) -> bool:
        """Whether the task reached the child's pipe (False: the child is gone)."""
        try:
            task.shared = send_batch(child.conn, task.batch, self._buffers)
        except OSError:
            return False
        task.sent_at = time.monotonic()
        child.tasks.append(task)
        return True

    def _receive(self, child: _Child) -> list[Outcome]:
        try:
            tag, value = recv_tree(child.conn)
        except (EOFError, OSError):
            return self._died(child)
        task = child.tasks.popleft()
        self._release(task)
        child.free_at = time.monotonic()
        seconds, value = value
        if task.key == WARM_UP_KEY:  # dropped, whatever it says; not counted as the job's preprocessing
            return []
        self._busy_s += seconds
        if tag == "ok":
            return [Outcome(task.key, task.offset, task.batch, output=value)]
        if len(task.batch) == 1:
            log.error("quarantining a record on which the preprocess hook raised %s", value)
            return [Outcome(task.key, task.offset, task.batch, quarantine_reason=f"preprocess hook raised {value}")]
        log.warning("the preprocess hook raised %s on a batch of %d rows: splitting it", value, len(task.batch))
        self._split(task)
        return []

    def _died(self, child: _Child) -> list[Outcome]:
        child.process.join(timeout=5)
        reason = _exit_reason(child.process.exitcode)
        task, waiting = child.tasks.popleft(), list(child.tasks)  # it died on the first; the rest never started
        for sent in (task, *waiting):  # sent again, to another child, from a buffer of their own
            self._release(sent)
        self._replace(child)
        self._queue.extendleft(reversed(waiting))
        if task.key == WARM_UP_KEY:  # nothing to retry; its replacement starts cold (no warm_up)
            log.warning("a preprocess process %s while warming up; replaced", reason)
            return []
        task.deaths += 1
        return self._after_death(task, reason)

    def _after_death(self, task: Task, reason: str) -> list[Outcome]:
        rows = len(task.batch)
        if rows == 1 and task.deaths >= DEATHS_BEFORE_QUARANTINE:
            log.error("quarantining a record that killed the preprocess process %d times (%s)", task.deaths, reason)
            why = f"preprocess process {reason} on this record {task.deaths} times"
            return [Outcome(task.key, task.offset, task.batch, quarantine_reason=why)]
        if rows > 1 and (task.is_part or task.deaths >= DEATHS_BEFORE_SPLIT):
            log.warning(
                "a batch of %d rows %s the preprocess process (%d deaths): splitting it to find the record",
                rows,
                reason,
                task.deaths,
            )
            self._split(task)
        else:
            log.warning("the preprocess process %s; retrying its batch of %d rows", reason, rows)
            self._queue.appendleft(task)
        return []

    def _release(self, task: Task) -> None:
        """The child is done with the task's shared memory: the next batch may be written there."""
        if task.shared is not None:
            self._buffers.give_back(task.shared, keep=self.capacity)
            task.shared = None

    def _split(self, task: Task) -> None:
        """Halves of the task go first in the queue, in order."""
        half = len(task.batch) // 2
        parts = [
            Task(task.key, task.offset, task.batch.slice(0, half), is_part=True),
            Task(task.key, task.offset + half, task.batch.slice(half), is_part=True),
        ]
        self._queue.extendleft(reversed(parts))

    def _handshake(self, child: _Child) -> None:
        """A new child says it is ready, or why it cannot be; one that dies first is a start failure."""
        try:
            tag, message = recv_tree(child.conn)
        except (EOFError, OSError):
            child.process.join(timeout=5)
            tag, message = "died", f"it {_exit_reason(child.process.exitcode)} before it was ready"
        if tag == "ready":
            child.ready = self.started = True
            self._start_failures = 0
            return
        self._start_failures += 1
        if tag == "fatal" or self._start_failures >= MAX_START_FAILURES:
            raise WorkerError(
                f"preprocess processes cannot start ({message}); a script that runs the worker in-process "
                "needs the `if __name__ == '__main__':` guard, as all multiprocessing code does"
            )
        log.warning("a preprocess process failed to start (%s); starting another", message)
        self._replace(child)

    def _replace(self, child: _Child) -> None:
        index = self._children.index(child)
        child.conn.close()
        self.restarts += 1
        if child.retiring:
            self._children.pop(index)
        else:
            self._children[index] = self._start()


def _exit_reason(code: int | None) -> str:
    if code is None:
        return "stopped answering"
    if code < 0:
        try:
            return f"was killed by {signal.Signals(-code).name}"
        except ValueError:
            return f"was killed by signal {-code}"
    return f"exited with code {code}"


def _child_main(conn: Connection, preprocess_ref: str) -> None:
    # The parent decides when children stop (a message or a closed pipe); a terminal's Ctrl-C
    # or a SIGTERM sent to the whole process group must not kill a batch half-way.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    if "torch" in sys.modules:
        sys.modules["torch"].set_num_threads(1)
    try:
        preprocess = load_callable(preprocess_ref, "preprocess hook")
    except Exception as exc:
        send_tree(conn, "fatal", str(exc))
        return
    send_tree(conn, "ready", None)
    tasks: queue.SimpleQueue[bytes | mmap.mmap | None] = queue.SimpleQueue()
    # Tasks are taken off the pipe as they come, so that the parent's send of the next one never
    # waits for this process, which may itself be waiting to send a result: with both pipes
    # full, neither would move.
    threading.Thread(target=_take_tasks, args=(conn, tasks), name="antbatch-tasks", daemon=True).start()
    try:
        _serve(conn, preprocess, tasks)
    except (BrokenPipeError, ConnectionResetError):
        # The parent closed the pool while this process worked (the job ended, or the pool shrank
        # beside a warm-up copy): nobody wants the result, and a traceback would say otherwise.
        return


def _serve(conn: Connection, preprocess: Any, tasks: queue.SimpleQueue[bytes | mmap.mmap | None]) -> None:
    while (data := tasks.get()) is not None:
        batch = batch_from_bytes(data)
        started = time.perf_counter()
        try:
            output = preprocess(batch)
        except Exception as exc:
            where = traceback.extract_tb(exc.__traceback__)[-1]
            send_tree(conn, "error", (time.perf_counter() - started, f"{exc!r} at {where.filename}:{where.lineno}"))
            continue
        send_tree(conn, "ok", (time.perf_counter() - started, output))


def _take_tasks(conn: Connection, tasks: queue.SimpleQueue[bytes | mmap.mmap | None]) -> None:
    """The child's reader: each task's batch, then None once the parent says stop or goes away."""
    try:
        while (data := recv_batch(conn)) is not None:
            tasks.put(data)
    except (EOFError, OSError):
        pass
    tasks.put(None)


forkserver.preloaded()
