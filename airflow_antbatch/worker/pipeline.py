"""The pipelined core: read -> preprocess -> model stage(s) -> postprocess -> write/commit.

Each stage is an object with its own thread and clock (``stages``; preprocess may fan out to
child processes, ``preprocess_stage``; each model is a ``model_stage.ScoringStage``), joined
to the next by a bounded channel, so a slow stage holds the others back instead of filling
memory, reading the next shard overlaps scoring the current one, and models on different
devices score at once. This module builds the list of stages and wires it; how they stop is
NOTE [pipeline shutdown] in ``stages``.

Nothing waits for the preprocess processes to start: their forkserver may still be importing
torch, and until a process is ready the preprocess stage runs the hook in its own thread
(first tries only: see ``preprocess_stage``). A process that cannot start fails the worker
with a ``WorkerError`` from that stage, and the worker releases the leases it holds.

Row order inside a shard's output is the input order, less quarantined rows.
"""

from __future__ import annotations

import dataclasses
import logging
import threading
from typing import TYPE_CHECKING

from airflow_antbatch.worker.model_stage import ScoringStage
from airflow_antbatch.worker.preprocess_pool import PreprocessPool
from airflow_antbatch.worker.preprocess_stage import PoolPreprocess
from airflow_antbatch.worker.scaling import ElasticScaler
from airflow_antbatch.worker.stages import (
    Channel,
    Claims,
    Flow,
    PostprocessStage,
    ReadStage,
    ShardWork,
    Stage,
    ThreadPreprocess,
    WriteStage,
)

if TYPE_CHECKING:
    from collections.abc import Callable, Iterable, Iterator

    import pyarrow as pa

    from airflow_antbatch.ledger import Lease
    from airflow_antbatch.shards import Shard
    from airflow_antbatch.worker.job_code import JobCode
    from airflow_antbatch.worker.scaling import StageClock
    from airflow_antbatch.worker.stages import Inbox

__all__ = ["Pipeline", "PipelineOptions", "ShardWork"]

log = logging.getLogger(__name__)


@dataclasses.dataclass
class PipelineOptions:
    cpu_budget: int
    preprocess_workers: int | None = None  # None: elastic; 0: preprocess in a thread
    torch_threads: int | None = None
    scale_interval_s: float = 2.0
    # Preprocess first tries in the worker until the pool has started (see preprocess_stage).
    # Off where the worker is the user's own command (`antbatch run`): a record that crashes
    # the hook must not end it, and its pool starts while it plans and imports torch anyway.
    preprocess_while_pool_starts: bool = True


class Pipeline:
    """Runs claimed shards through the stages; ``finish`` is called once per shard, in order."""

    def __init__(
        self,
        code: JobCode,
        options: PipelineOptions,
        *,
        read: Callable[[Shard], Iterator[pa.RecordBatch]],
        finish: Callable[[ShardWork], None],
        quarantine_limit: int = 10,
    ) -> None:
        self.options = options
        self.flow = Flow(threading.Event(), quarantine_limit)
        in_threads = code.preprocess_ref is None or options.preprocess_workers == 0
        self.scaler = ElasticScaler(
            options.cpu_budget,
            sum(1 for r in code.runners if r.uses_cpu),
            fixed_processes=0 if in_threads else options.preprocess_workers,
            fixed_threads=options.torch_threads,
            interval_s=options.scale_interval_s,
        )
        models = [ScoringStage(self.flow, runner, index, self.scaler) for index, runner in enumerate(code.runners)]
        self._pool_stage: PoolPreprocess | None = None
        in_thread = ThreadPreprocess(self.flow, code.preprocess)
        preprocess: Stage = in_thread
        if self.scaler.processes:
            assert code.preprocess_ref is not None
            pool = PreprocessPool(code.preprocess_ref, self.scaler.processes)  # starts in the background
            clocks = [m.clock for m in models]
            inline = in_thread if options.preprocess_while_pool_starts else None
            preprocess = self._pool_stage = PoolPreprocess(self.flow, pool, self.scaler, clocks, inline)
        self.stages: list[Stage] = [
            ReadStage(self.flow, read, code.assembler.check_input),
            preprocess,
            *models,
            PostprocessStage(self.flow, code.assembler),
            WriteStage(self.flow, finish),
        ]
        self._fatal: BaseException | None = None

    @property
    def clocks(self) -> dict[str, StageClock]:
        """Each stage's clock by its name, in pipeline order: the worker summary's ``stages``."""
        return {stage.name: stage.clock for stage in self.stages}

    @property
    def pool_restarts(self) -> int:
        """Preprocess processes replaced after dying."""
        return self._pool_stage.pool.restarts if self._pool_stage is not None else 0

    @property
    def rows_preprocessed_inline(self) -> int:
        """Rows the pool's stage preprocessed in its own thread while the processes started."""
        inline = self._pool_stage.inline if self._pool_stage is not None else None
        return inline.clock.rows if inline is not None else 0

    @property
    def unfinished(self) -> list[ShardWork]:
        """Shards claimed but not handed to ``finish`` (after a fatal error): their leases need releasing."""
        return list(self.flow.shards.values())

    def run(self, claims: Iterable[tuple[Lease, Shard]]) -> None:
        """Process every claimed shard; returns when ``claims`` is exhausted and all is written."""
        channels = [Channel(self.flow.abort) for _ in self.stages[1:]]
        inboxes: list[Inbox] = [Claims(claims), *channels]
        for stage, inbox, outbox in zip(self.stages, inboxes, [*channels, None], strict=True):
            stage.wire(inbox, outbox)
        threads = [threading.Thread(target=self._guard, args=(s,), name=f"antbatch-{s.name}") for s in self.stages]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        if self._fatal is not None:
            raise self._fatal

    def _guard(self, stage: Stage) -> None:
        try:
            stage.run()
        except BaseException as exc:
            if self._fatal is None:
                self._fatal = exc
            log.error("stage %r stopped the worker: %s", stage.name, exc)
            self.flow.abort.set()
