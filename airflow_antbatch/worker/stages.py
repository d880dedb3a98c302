"""The pipeline's stages as objects: each runs in its own thread, on its own clock.

Ray Data's physical operators are the model: a stage takes items from its inbox, puts what it
makes in its outbox and counts its own busy and wait time (``StageClock``), so the scaler and
the worker's summary read each stage's figures from the stage itself. ``Pipeline`` only wires
a list of them.

Items of a shard travel in order and end with a ``ShardEnd`` marker: when the marker reaches
the writer, every row of the shard has been scored (or quarantined), and the shard can be
written and committed.

NOTE [pipeline shutdown]: no thread of the pipeline can hang. Every wait on a channel is
timed (``POLL_S``) and gives up once the pipeline aborts; a stage that raises sets the abort
(``Pipeline`` guards every thread), so the others return within ``POLL_S``, and the error is
re-raised in the caller. The end of the stream is ``DONE``, which every stage forwards before
it returns. A failed shard's rows, or those of a shard the worker gives back once it stops
(NOTE [drain] in worker/drain.py), are dropped on the way.
"""

from __future__ import annotations

import abc
import contextlib
import dataclasses
import logging
import queue
import time
import traceback
from typing import TYPE_CHECKING, Any, Protocol

from airflow_antbatch.errors import AntBatchError, ShardError, UserCodeError
from airflow_antbatch.worker.scaling import StageClock

if TYPE_CHECKING:
    import threading
    from collections.abc import Callable, Iterable, Iterator

    import pyarrow as pa

    from airflow_antbatch.ledger import Lease
    from airflow_antbatch.shards import Shard
    from airflow_antbatch.worker.inference import OutputAssembler, Preprocess

log = logging.getLogger(__name__)

QUEUE_DEPTH = 4
POLL_S = 0.05


# -- what travels between the stages ---------------------------------------------------------


@dataclasses.dataclass
class Chunk:
    """Rows of one shard on their way through the stages, with what the stages made of them."""

    shard_id: str
    batch: pa.RecordBatch
    data: Any = None
    kept: dict[str, Any] = dataclasses.field(default_factory=dict)


@dataclasses.dataclass
class Quarantined:
    shard_id: str
    batch: pa.RecordBatch
    reason: str


@dataclasses.dataclass
class ShardEnd:
    shard_id: str


@dataclasses.dataclass
class Scored:
    shard_id: str
    table: pa.Table


class _Done:
    """The end of the stream: every stage forwards it and stops."""


DONE = _Done()


@dataclasses.dataclass
class ShardWork:
    """One claimed shard inside the pipeline; the writer hands it back once its marker arrives."""

    lease: Lease
    shard: Shard
    started: float = dataclasses.field(default_factory=time.monotonic)
    error: Exception | None = None
    tables: list[pa.Table] = dataclasses.field(default_factory=list)
    quarantined: list[Quarantined] = dataclasses.field(default_factory=list)
    quarantined_seen: int = 0  # counted as they leave preprocessing, to stop early past the limit

    @property
    def rows(self) -> int:
        return sum(t.num_rows for t in self.tables)

    @property
    def rows_quarantined(self) -> int:
        """Input rows set aside as bad records (a copy of the list: stages may still append)."""
        return sum(q.batch.num_rows for q in list(self.quarantined))

    def fail(self, exc: Exception) -> None:
        if self.error is None:
            self.error = exc


# -- what the stages share ---------------------------------------------------------------------


@dataclasses.dataclass
class Flow:
    """What every stage sees: the shards in flight, what the stopped worker gives back and the
    pipeline's abort."""

    abort: threading.Event
    quarantine_limit: int
    shards: dict[str, ShardWork] = dataclasses.field(default_factory=dict)
    kept: frozenset[str] | None = None  # once the worker stopped: the tries it still finishes

    def dropping(self, shard_id: str) -> bool:
        """Whether a shard's rows need no more work: it failed, or the stopped worker gives it back."""
        work = self.shards.get(shard_id)
        return work is None or work.error is not None or self.given_back(shard_id)

    def given_back(self, shard_id: str) -> bool:
        """Whether the worker stopped and gives this try back unfinished (NOTE [drain])."""
        kept = self.kept
        return kept is not None and shard_id not in kept

    def give_back(self, keep: Iterable[str] = ()) -> None:
        """From now on, drop the rows of every try but ``keep``: only ever fewer (NOTE [drain])."""
        keep = frozenset(keep)
        self.kept = keep if self.kept is None else self.kept & keep

    def fail(self, shard_id: str, exc: Exception) -> None:
        work = self.shards.get(shard_id)
        if work is not None:
            work.fail(exc)

    def count_quarantined(self, item: Any) -> None:
        """A shard past its quarantine limit fails now: its other records need no more work."""
        if not isinstance(item, Quarantined):
            return
        work = self.shards.get(item.shard_id)
        if work is None:
            return
        work.quarantined_seen += 1
        if work.quarantined_seen > self.quarantine_limit:
            work.fail(
                ShardError(f"shard {item.shard_id}: more than quarantine_limit={self.quarantine_limit} bad records")
            )


class Inbox(Protocol):
    def get(self, clock: StageClock, timeout: float | None = None) -> Any: ...


class Channel:
    """A bounded queue from one stage to the next: a slow stage holds the others back instead
    of filling memory. Its waits end on abort (NOTE [pipeline shutdown])."""

    def __init__(self, abort: threading.Event, depth: int = QUEUE_DEPTH) -> None:
        self._queue = queue.Queue[Any](maxsize=depth)
        self._abort = abort

    def put(self, item: Any, clock: StageClock) -> None:
        started = time.monotonic()
        while not self._abort.is_set():
            try:
                self._queue.put(item, timeout=POLL_S)
                break
            except queue.Full:
                continue
        clock.wait_out_s += time.monotonic() - started

    def get(self, clock: StageClock, timeout: float | None = None) -> Any:
        """The next item; DONE once the pipeline aborts; None if ``timeout`` passes first."""
        started = time.monotonic()
        try:
            while not self._abort.is_set():
                try:
                    return self._queue.get(timeout=POLL_S if timeout is None else min(POLL_S, timeout))
                except queue.Empty:
                    if timeout is not None and time.monotonic() - started >= timeout:
                        return None
            return DONE
        finally:
            clock.wait_in_s += time.monotonic() - started


class Claims:
    """The first stage's inbox: the worker's claimed shards, then DONE. Waiting for a claim is
    the claimer's time, not the reader's, so it is not clocked."""

    def __init__(self, claims: Iterable[tuple[Lease, Shard]]) -> None:
        self._claims = iter(claims)

    def get(self, clock: StageClock, timeout: float | None = None) -> Any:
        return next(self._claims, DONE)


# -- the stages --------------------------------------------------------------------------------


class Stage(abc.ABC):
    """One step of the pipeline, run by ``Pipeline`` in a thread of its own once wired."""

    def __init__(self, name: str, flow: Flow) -> None:
        self.name = name
        self.flow = flow
        self.clock = StageClock()
        self._inbox: Inbox | None = None
        self._outbox: Channel | None = None

    def wire(self, inbox: Inbox, outbox: Channel | None) -> None:
        self._inbox, self._outbox = inbox, outbox

    def holds(self) -> int:
        """Batches this stage works on at once when fed: the worker reads that many ahead for it."""
        return 1

    @abc.abstractmethod
    def run(self) -> None:
        """Take items until DONE, forward it, and return (NOTE [pipeline shutdown])."""

    def get(self, timeout: float | None = None) -> Any:
        assert self._inbox is not None, f"stage {self.name!r} is not wired"
        return self._inbox.get(self.clock, timeout)

    def put(self, item: Any) -> None:
        assert self._outbox is not None, f"stage {self.name!r} has no outbox"
        self._outbox.put(item, self.clock)

    @contextlib.contextmanager
    def busy(self) -> Iterator[None]:
        """Count the time inside as this stage's work."""
        started = time.monotonic()
        try:
            yield
        finally:
            self.clock.busy_s += time.monotonic() - started


class ReadStage(Stage):
    """Claimed shards in, their record batches out, each shard closed by its ``ShardEnd``."""

    def __init__(
        self,
        flow: Flow,
        read: Callable[[Shard], Iterator[pa.RecordBatch]],
        check_input: Callable[[pa.RecordBatch], None],
    ) -> None:
        super().__init__("read", flow)
        self._read = read
        self._check_input = check_input

    def run(self) -> None:
        while True:
            claim = self.get()
            if claim is DONE:
                self.put(DONE)
                return
            lease, shard = claim
            work = ShardWork(lease, shard)
            self.flow.shards[shard.shard_id] = work
            try:
                self._read_shard(work)
            except AntBatchError as exc:
                work.fail(exc)
            self.put(ShardEnd(shard.shard_id))
            if self.flow.abort.is_set():
                return

    def _read_shard(self, work: ShardWork) -> None:
        batches = iter(self._read(work.shard))
        while True:
            with self.busy():
                batch = next(batches, None)
            if batch is None or self.flow.dropping(work.shard.shard_id) or self.flow.abort.is_set():
                return
            if batch.num_rows:
                self._check_input(batch)
                self.clock.rows += batch.num_rows
                self.put(Chunk(work.shard.shard_id, batch))


class MapStage(Stage):
    """A stage that turns each chunk into items (``apply``) and passes everything else on."""

    @abc.abstractmethod
    def apply(self, chunk: Chunk) -> list[Any]:
        """What the chunk becomes: chunks, quarantined records or scored tables."""

    def run(self) -> None:
        while True:
            item = self.get()
            if not isinstance(item, Chunk):
                self.put(item)
                if item is DONE:
                    return
                continue
            if self.flow.dropping(item.shard_id):
                continue
            for result in self.map(item):
                self.flow.count_quarantined(result)
                self.put(result)

    def map(self, chunk: Chunk) -> list[Any]:
        """``apply`` on this stage's clock; a ``UserCodeError`` fails the chunk's shard, and nothing comes out."""
        rows = chunk.batch.num_rows
        try:
            with self.busy():
                made = self.apply(chunk)
        except UserCodeError as exc:
            self.flow.fail(chunk.shard_id, exc)
            return []
        self.clock.rows += rows
        return made


class ThreadPreprocess(MapStage):
    """The preprocess hook in this thread: the default features, a hook given as a Python object,
    or ``preprocess_workers=0``; and the pool's stand-in while its processes start
    (``PoolPreprocess``), which calls ``map`` from its own thread."""

    def __init__(self, flow: Flow, preprocess: Preprocess) -> None:
        super().__init__("preprocess", flow)
        self._preprocess = preprocess

    def apply(self, chunk: Chunk) -> list[Any]:
        """The chunk preprocessed; where the hook raises, halves until the record is alone."""
        try:
            return [Chunk(chunk.shard_id, chunk.batch, self._preprocess(chunk.batch))]
        except UserCodeError:
            raise  # the job's code or settings, not a record
        except Exception as exc:
            rows = chunk.batch.num_rows
            if rows == 1:
                where = traceback.extract_tb(exc.__traceback__)[-1]
                reason = f"preprocess hook raised {exc!r} at {where.filename}:{where.lineno}"
                log.error("quarantining a record: %s", reason)
                return [Quarantined(chunk.shard_id, chunk.batch, reason)]
            half = rows // 2
            parts = [chunk.batch.slice(0, half), chunk.batch.slice(half)]
            return [item for part in parts for item in self.apply(Chunk(chunk.shard_id, part))]


class PostprocessStage(MapStage):
    """The last model output of each chunk as output rows, with the id and kept columns."""

    def __init__(self, flow: Flow, assembler: OutputAssembler) -> None:
        super().__init__("postprocess", flow)
        self._assembler = assembler

    def apply(self, chunk: Chunk) -> list[Any]:
        return [Scored(chunk.shard_id, self._assembler(chunk.data, chunk.batch, chunk.kept))]


class WriteStage(Stage):
    """Collects each shard's rows and hands the shard to ``finish`` when its marker arrives."""

    def __init__(self, flow: Flow, finish: Callable[[ShardWork], None]) -> None:
        super().__init__("write", flow)
        self._finish = finish

    def run(self) -> None:
        while True:
            item = self.get()
            if item is DONE:
                return
            work = self.flow.shards[item.shard_id]
            if isinstance(item, Scored):
                work.tables.append(item.table)
            elif isinstance(item, Quarantined):
                work.quarantined.append(item)
            elif isinstance(item, ShardEnd):
                with self.busy():
                    self._finish(work)
                self.clock.rows += work.rows
                del self.flow.shards[item.shard_id]
