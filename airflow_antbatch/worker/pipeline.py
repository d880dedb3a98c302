"""The pipelined core: read -> preprocess -> model stage(s) -> postprocess -> write/commit.

Each stage is a thread (preprocess fans out to child processes) joined to the next by a
bounded queue, so a slow stage holds the others back instead of filling memory, and reading
the next shard overlaps scoring the current one. Items of a shard travel in order and end with
a ``ShardEnd`` marker: when the marker reaches the writer, every row of the shard has been
scored (or quarantined), and the shard can be written and committed.

Row order inside a shard's output is the input order, less quarantined rows.
"""

from __future__ import annotations

import dataclasses
import logging
import queue
import threading
import time
import traceback
from typing import TYPE_CHECKING, Any

import pyarrow as pa
import torch

from airflow_antbatch.errors import AntBatchError, ShardError, UserCodeError
from airflow_antbatch.worker.preprocess_pool import Outcome, PreprocessPool
from airflow_antbatch.worker.scaling import ElasticScaler, StageClock
from airflow_antbatch.worker.trees import concat_tree, slice_tree

if TYPE_CHECKING:
    from collections.abc import Callable, Iterable, Iterator

    from airflow_antbatch.ledger import Lease
    from airflow_antbatch.shards import Shard
    from airflow_antbatch.worker.inference import Preprocess
    from airflow_antbatch.worker.job_code import JobCode
    from airflow_antbatch.worker.model_stage import ModelRunner

log = logging.getLogger(__name__)

QUEUE_DEPTH = 4
POLL_S = 0.05


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

    def fail(self, exc: Exception) -> None:
        if self.error is None:
            self.error = exc


@dataclasses.dataclass
class PipelineOptions:
    cpu_budget: int
    preprocess_workers: int | None = None  # None: elastic; 0: preprocess in a thread
    torch_threads: int | None = None
    scale_interval_s: float = 2.0


class Pipeline:
    """Runs claimed shards through the stages; ``finish`` is called once per shard, in order."""

    def __init__(
        self,
        code: JobCode,
        options: PipelineOptions,
        *,
        read: Callable[[Shard], Iterator[pa.RecordBatch]],
        finish: Callable[[ShardWork], None],
        stop: threading.Event,
        quarantine_limit: int = 10,
    ) -> None:
        self.code = code
        self.quarantine_limit = quarantine_limit
        self.options = options
        self._read = read
        self._finish = finish
        self._stop = stop
        self._abort = threading.Event()
        self._fatal: BaseException | None = None
        self._shards: dict[str, ShardWork] = {}
        cpu_stages = sum(1 for r in code.runners if r.uses_cpu)
        in_threads = code.preprocess_ref is None or options.preprocess_workers == 0
        self.scaler = ElasticScaler(
            options.cpu_budget,
            cpu_stages,
            fixed_processes=0 if in_threads else options.preprocess_workers,
            fixed_threads=options.torch_threads,
            interval_s=options.scale_interval_s,
        )
        self.clocks: dict[str, StageClock] = {"read": StageClock(), "preprocess": StageClock()}
        self.clocks.update({r.name: StageClock() for r in code.runners})
        self.clocks.update({"postprocess": StageClock(), "write": StageClock()})
        self.pool_restarts = 0
        self._pool: PreprocessPool | None = None
        if self.scaler.processes:
            # The children import the hook now, as the worker loaded its code: a hook that cannot
            # load fails before anything is claimed, and start-up is not counted as scoring time.
            assert code.preprocess_ref is not None
            self._pool = PreprocessPool(code.preprocess_ref, self.scaler.processes)
            self._pool.wait_ready()

    # -- running -------------------------------------------------------------------------------

    def run(self, claims: Iterable[tuple[Lease, Shard]]) -> None:
        """Process every claimed shard; returns when ``claims`` is exhausted and all is written."""
        queues = [queue.Queue[Any](maxsize=QUEUE_DEPTH) for _ in range(len(self.code.runners) + 3)]
        threads = [
            threading.Thread(target=self._guard, args=(self._reader, claims, queues[0]), name="antbatch-read"),
            threading.Thread(target=self._guard, args=(self._preprocessor, queues[0], queues[1]), name="antbatch-pre"),
        ]
        for index, runner in enumerate(self.code.runners):
            args = (self._model_stage, runner, index, queues[index + 1], queues[index + 2])
            threads.append(threading.Thread(target=self._guard, args=args, name=f"antbatch-{runner.name}"))
        threads.append(
            threading.Thread(
                target=self._guard, args=(self._postprocessor, queues[-2], queues[-1]), name="antbatch-post"
            )
        )
        threads.append(threading.Thread(target=self._guard, args=(self._writer, queues[-1]), name="antbatch-write"))
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        if self._fatal is not None:
            raise self._fatal

    @property
    def unfinished(self) -> list[ShardWork]:
        """Shards claimed but not handed to ``finish`` (after a fatal error): their leases need releasing."""
        return list(self._shards.values())

    def _guard(self, target: Callable[..., None], *args: Any) -> None:
        try:
            target(*args)
        except BaseException as exc:
            if self._fatal is None:
                self._fatal = exc
            log.error("%s stopped the worker: %s", threading.current_thread().name, exc)
            self._abort.set()

    def _put(self, q: queue.Queue[Any], item: Any, clock: StageClock) -> None:
        started = time.monotonic()
        while not self._abort.is_set():
            try:
                q.put(item, timeout=POLL_S)
                break
            except queue.Full:
                continue
        clock.wait_out_s += time.monotonic() - started

    def _get(self, q: queue.Queue[Any], clock: StageClock, timeout: float | None = None) -> Any:
        """The next item; DONE once the pipeline aborts; None if ``timeout`` passes first."""
        started = time.monotonic()
        try:
            while not self._abort.is_set():
                try:
                    return q.get(timeout=POLL_S if timeout is None else min(POLL_S, timeout))
                except queue.Empty:
                    if timeout is not None and time.monotonic() - started >= timeout:
                        return None
            return DONE
        finally:
            clock.wait_in_s += time.monotonic() - started

    def _dropping(self, shard_id: str) -> bool:
        """Whether a shard's rows need no more work: it failed, or the worker is stopping."""
        work = self._shards.get(shard_id)
        return self._stop.is_set() or work is None or work.error is not None

    def _fail(self, shard_id: str, exc: Exception) -> None:
        work = self._shards.get(shard_id)
        if work is not None:
            work.fail(exc)

    # -- stages --------------------------------------------------------------------------------

    def _reader(self, claims: Iterable[tuple[Lease, Shard]], out: queue.Queue[Any]) -> None:
        clock = self.clocks["read"]
        for lease, shard in claims:
            work = ShardWork(lease, shard)
            self._shards[shard.shard_id] = work
            try:
                self._read_shard(work, out, clock)
            except AntBatchError as exc:
                work.fail(exc)
            self._put(out, ShardEnd(shard.shard_id), clock)
            if self._abort.is_set():
                return
        self._put(out, DONE, clock)

    def _read_shard(self, work: ShardWork, out: queue.Queue[Any], clock: StageClock) -> None:
        batches = iter(self._read(work.shard))
        while True:
            started = time.monotonic()
            batch = next(batches, None)
            clock.busy_s += time.monotonic() - started
            if batch is None or self._dropping(work.shard.shard_id) or self._abort.is_set():
                return
            if batch.num_rows:
                self.code.assembler.check_input(batch)
                clock.rows += batch.num_rows
                self._put(out, Chunk(work.shard.shard_id, batch), clock)

    def _preprocessor(self, source: queue.Queue[Any], out: queue.Queue[Any]) -> None:
        clock = self.clocks["preprocess"]
        if self.scaler.processes == 0:
            self._preprocess_in_thread(self.code.preprocess, source, out, clock)
            return
        assert self.code.preprocess_ref is not None
        pool = self._pool
        assert pool is not None
        try:
            self._preprocess_in_pool(pool, source, out, clock)
        finally:
            self.pool_restarts = pool.restarts
            clock.busy_s = pool.busy_seconds()
            pool.close()

    def _preprocess_in_thread(
        self, preprocess: Preprocess, source: queue.Queue[Any], out: queue.Queue[Any], clock: StageClock
    ) -> None:
        def run(chunk: Chunk) -> list[Chunk | Quarantined]:
            """The chunk preprocessed; where the hook raises, halves until the record is alone."""
            try:
                return [Chunk(chunk.shard_id, chunk.batch, preprocess(chunk.batch))]
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
                return [item for part in parts for item in run(Chunk(chunk.shard_id, part))]

        self._map_chunks(run, source, out, clock)

    def _count_quarantined(self, item: Any) -> None:
        """A shard past its quarantine limit fails now: its other records need no more work."""
        if not isinstance(item, Quarantined):
            return
        work = self._shards.get(item.shard_id)
        if work is None:
            return
        work.quarantined_seen += 1
        if work.quarantined_seen > self.quarantine_limit:
            work.fail(
                ShardError(f"shard {item.shard_id}: more than quarantine_limit={self.quarantine_limit} bad records")
            )

    def _map_chunks(
        self, work: Callable[[Chunk], list[Any]], source: queue.Queue[Any], out: queue.Queue[Any], clock: StageClock
    ) -> None:
        """A stage that turns each chunk into items and passes everything else on."""
        while True:
            item = self._get(source, clock)
            if not isinstance(item, Chunk):
                self._put(out, item, clock)
                if item is DONE:
                    return
                continue
            if self._dropping(item.shard_id):
                continue
            started = time.monotonic()
            try:
                rows = item.batch.num_rows
                made = work(item)
            except UserCodeError as exc:
                self._fail(item.shard_id, exc)
                continue
            finally:
                clock.busy_s += time.monotonic() - started
            clock.rows += rows
            for result in made:
                self._count_quarantined(result)
                self._put(out, result, clock)

    def _preprocess_in_pool(
        self, pool: PreprocessPool, source: queue.Queue[Any], out: queue.Queue[Any], clock: StageClock
    ) -> None:
        """Feed the pool, put results back in input order, and resize the pool as the scaler says."""
        order = _InputOrder()
        finished = False
        model_clocks = [self.clocks[r.name] for r in self.code.runners]
        while not self._abort.is_set():
            while not finished and pool.wants_more():
                item = self._get(source, clock, timeout=0 if pool.in_flight else POLL_S)
                if item is None:
                    break
                key = order.next_key()
                if isinstance(item, Chunk) and not self._dropping(item.shard_id):
                    order.expect(key, item.shard_id, item.batch.num_rows)
                    pool.submit(key, item.batch)
                else:
                    order.ready[key] = [] if isinstance(item, Chunk) else [item]
                    finished = item is DONE
            for outcome in pool.poll(POLL_S if pool.in_flight else 0):
                order.add(outcome)
            for item in order.emit():
                if isinstance(item, Chunk):
                    clock.rows += item.batch.num_rows
                self._count_quarantined(item)
                self._put(out, item, clock)
                if item is DONE:
                    return
            resize = self.scaler.observe(pool.busy_seconds(), model_clocks)
            if resize is not None:
                pool.resize(resize)

    def _model_stage(self, runner: ModelRunner, index: int, source: queue.Queue[Any], out: queue.Queue[Any]) -> None:
        clock = self.clocks[runner.name]
        pending: list[Chunk] = []  # re-batching buffer for a stage whose batch size differs
        size = runner.stage.batch_size or 0
        threads = 0
        while True:
            item = self._get(source, clock)
            if isinstance(item, Chunk):
                if self._dropping(item.shard_id):
                    continue
                wanted = self.scaler.torch_threads(index, runner.stage.threads)
                if runner.uses_cpu and wanted != threads:
                    torch.set_num_threads(wanted)
                    threads = wanted
                if index == 0:
                    self._score(runner, index, [item], out, clock)
                    continue
                pending.append(item)
                while pending and sum(c.batch.num_rows for c in pending) >= size:
                    pending = self._score(runner, index, pending, out, clock, limit=size)
                continue
            if pending:  # a ShardEnd, a quarantined record or DONE: flush what is held first
                self._score(runner, index, pending, out, clock)
                pending = []
            self._put(out, item, clock)
            if item is DONE:
                return

    def _score(
        self,
        runner: ModelRunner,
        index: int,
        chunks: list[Chunk],
        out: queue.Queue[Any],
        clock: StageClock,
        limit: int | None = None,
    ) -> list[Chunk]:
        """Run the model on the chunks' rows (at most ``limit``); returns the rows left over."""
        shard_id = chunks[0].shard_id
        started = time.monotonic()
        try:
            chunk = _join(chunks, f"stage {runner.name!r}") if len(chunks) > 1 else chunks[0]
            rest: list[Chunk] = []
            if limit is not None and chunk.batch.num_rows > limit:
                chunk, tail = _split(chunk, limit)
                rest = [tail]
            inputs = chunk.data if index == 0 else runner.model_input(chunk.data, chunk.batch)
            chunk.data = runner(inputs, chunk.batch.num_rows)
            if runner.stage.output_column:
                chunk.kept[runner.stage.output_column] = chunk.data
        except UserCodeError as exc:
            self._fail(shard_id, exc)
            return []
        finally:
            clock.busy_s += time.monotonic() - started
        clock.rows += chunk.batch.num_rows
        self._put(out, chunk, clock)
        return rest

    def _postprocessor(self, source: queue.Queue[Any], out: queue.Queue[Any]) -> None:
        def run(chunk: Chunk) -> list[Scored]:
            return [Scored(chunk.shard_id, self.code.assembler(chunk.data, chunk.batch, chunk.kept))]

        self._map_chunks(run, source, out, self.clocks["postprocess"])

    def _writer(self, source: queue.Queue[Any]) -> None:
        clock = self.clocks["write"]
        while True:
            item = self._get(source, clock)
            if item is DONE:
                return
            work = self._shards[item.shard_id]
            if isinstance(item, Scored):
                work.tables.append(item.table)
            elif isinstance(item, Quarantined):
                work.quarantined.append(item)
            elif isinstance(item, ShardEnd):
                started = time.monotonic()
                try:
                    self._finish(work)
                finally:
                    clock.busy_s += time.monotonic() - started
                clock.rows += work.rows
                del self._shards[item.shard_id]


@dataclasses.dataclass
class _OpenChunk:
    """A chunk in the preprocess pool, possibly split into parts that come back one by one."""

    shard_id: str
    rows_left: int
    outcomes: list[Outcome] = dataclasses.field(default_factory=list)


class _InputOrder:
    """Puts preprocess results back in the order their chunks were read.

    Every item read gets a key; chunks sent to the pool are complete once all their rows are
    back (as parts or quarantined records), and items leave strictly by key.
    """

    def __init__(self) -> None:
        self.ready: dict[int, list[Any]] = {}
        self._open: dict[int, _OpenChunk] = {}
        self._next = 0
        self._emit = 0

    def next_key(self) -> int:
        self._next += 1
        return self._next - 1

    def expect(self, key: int, shard_id: str, rows: int) -> None:
        self._open[key] = _OpenChunk(shard_id, rows)

    def add(self, outcome: Outcome) -> None:
        """Record one outcome; the chunk is ready once all its rows are back."""
        chunk = self._open[outcome.key]
        chunk.outcomes.append(outcome)
        chunk.rows_left -= len(outcome.batch)
        if chunk.rows_left:
            return
        del self._open[outcome.key]
        items: list[Any] = []
        for part in sorted(chunk.outcomes, key=lambda o: o.offset):
            if part.quarantine_reason is not None:
                items.append(Quarantined(chunk.shard_id, part.batch, part.quarantine_reason))
            else:
                items.append(Chunk(chunk.shard_id, part.batch, part.output))
        self.ready[outcome.key] = items

    def emit(self) -> Iterator[Any]:
        while self._emit in self.ready:
            yield from self.ready.pop(self._emit)
            self._emit += 1


def _join(chunks: list[Chunk], where: str) -> Chunk:
    batches = pa.Table.from_batches([c.batch for c in chunks]).combine_chunks().to_batches()
    kept = {name: concat_tree([c.kept[name] for c in chunks], where) for name in chunks[0].kept}
    return Chunk(chunks[0].shard_id, batches[0], concat_tree([c.data for c in chunks], where), kept)


def _split(chunk: Chunk, rows: int) -> tuple[Chunk, Chunk]:
    def cut(start: int, stop: int) -> Chunk:
        kept = {name: slice_tree(value, start, stop) for name, value in chunk.kept.items()}
        return Chunk(chunk.shard_id, chunk.batch.slice(start, stop - start), slice_tree(chunk.data, start, stop), kept)

    return cut(0, rows), cut(rows, chunk.batch.num_rows)
