"""The preprocess stage over child processes: feeds the pool, keeps input order, resizes the pool.

The pool (``preprocess_pool``) runs the hook in processes and may hand results back out of
order, split, or as quarantined records; this stage puts them back in the order their chunks
were read and asks the scaler, every round, whether the pool should grow or shrink.

Scoring does not wait for the pool to start. Until its first process is ready (the forkserver
may still be importing torch), this stage runs the hook itself, with the hook the worker has
loaded (``ThreadPreprocess``: exceptions split and quarantine as they do there), then hands
over to the processes for good. Only a shard's first try is preprocessed here: a record that
crashes the process would crash the worker, and the shard's next try, which the lease's epoch
tells apart, waits for the pool, where the record is isolated and quarantined. Once the worker
holds any retried shard, nothing more is preprocessed here: a worker restarted after such a
crash takes its earlier incarnation's tries first, and other records like it in other shards'
first tries would otherwise end this incarnation too (and a few such restarts fail a pod's slot).
``antbatch run``'s in-process worker turns this off (``preprocess_while_pool_starts``): there
the worker is the user's command, which a crashing record must not end.
"""

from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING, Any

from airflow_antbatch.worker.stages import DONE, POLL_S, Chunk, Quarantined, Stage, ThreadPreprocess

if TYPE_CHECKING:
    from collections.abc import Iterator, Sequence

    from airflow_antbatch.worker.preprocess_pool import Outcome, PreprocessPool
    from airflow_antbatch.worker.scaling import ElasticScaler, StageClock
    from airflow_antbatch.worker.stages import Flow


class PoolPreprocess(Stage):
    """Preprocessing in the pool's processes, and in ``inline`` until they start (see the module's
    docstring); ``model_clocks`` tell the scaler whether they starve."""

    def __init__(
        self,
        flow: Flow,
        pool: PreprocessPool,
        scaler: ElasticScaler,
        model_clocks: Sequence[StageClock],
        inline: ThreadPreprocess | None,
    ) -> None:
        super().__init__("preprocess", flow)
        self.pool = pool
        self.inline = inline
        self._scaler = scaler
        self._model_clocks = model_clocks
        self._inlining = inline is not None  # until the pool has started or a retried shard is held

    def run(self) -> None:
        try:
            self._feed()
        finally:
            self.clock.busy_s = self._busy_s()
            self.pool.close()

    def holds(self) -> int:
        return self.pool.capacity

    def _busy_s(self) -> float:
        return self.pool.busy_seconds() + (self.inline.clock.busy_s if self.inline is not None else 0.0)

    def _inline_now(self) -> ThreadPreprocess | None:
        """The stage to preprocess in here, before the pool has started, while no retry is held."""
        if self._inlining and (self.pool.started or any(w.lease.epoch for w in list(self.flow.shards.values()))):
            self._inlining = False  # for good
        return self.inline if self._inlining else None

    def _feed(self) -> None:
        """Feed the pool, put results back in input order, and resize the pool as the scaler says."""
        pool, order = self.pool, _InputOrder()
        finished = False
        while not self.flow.abort.is_set():
            inlined = False
            while not finished and pool.wants_more():
                item = self.get(timeout=0 if pool.in_flight else POLL_S)
                if item is None:
                    break
                key = order.next_key()
                if isinstance(item, Chunk) and not self.flow.dropping(item.shard_id):
                    if (inline := self._inline_now()) is not None:
                        order.ready[key] = inline.map(item)
                        inlined = True
                        break  # the pool may be ready by now: look before taking the next chunk
                    order.expect(key, item.shard_id, item.batch.num_rows)
                    pool.submit(key, item.batch)
                else:
                    order.ready[key] = [] if isinstance(item, Chunk) else [item]
                    finished = item is DONE
            for outcome in pool.poll(POLL_S if pool.in_flight and not inlined else 0):
                order.add(outcome)
            for item in order.emit():
                if isinstance(item, Chunk):
                    self.clock.rows += item.batch.num_rows
                self.flow.count_quarantined(item)
                self.put(item)
                if item is DONE:
                    return
            resize = self._scaler.observe(self._busy_s(), self._model_clocks, pool_started=pool.started)
            if resize is not None:
                pool.resize(resize)


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
