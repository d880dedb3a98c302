"""One model of the chain, run as its own stage: device, threads, autocast and compile.

Each model stage is a thread of its own (``ScoringStage``), so that stages on different devices
score different batches at once. On CUDA each stage has its own stream, so that stages on one
GPU overlap their copies and kernels; host tensors are pinned first so that copies to the
device can be asynchronous.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any

import pyarrow as pa
import torch

from airflow_antbatch.errors import UserCodeError
from airflow_antbatch.worker.stages import DONE, Chunk, Stage
from airflow_antbatch.worker.trees import concat_tree, slice_tree

if TYPE_CHECKING:
    from airflow_antbatch import spec
    from airflow_antbatch.worker.scaling import ElasticScaler
    from airflow_antbatch.worker.stages import Flow

Adapter = Callable[[Any, pa.RecordBatch], Any]


class ModelRunner:
    """Calls one model on batches; a thread of the pipeline owns it."""

    def __init__(self, stage: spec.ModelStage, model: torch.nn.Module, adapter: Adapter | None = None) -> None:
        self.stage = stage
        self.device = torch.device(stage.device or "cpu")
        self.adapter = adapter
        self.on_cuda = self.device.type == "cuda"
        if stage.compile:
            try:
                model = torch.compile(model, backend=stage.compile)  # type: ignore[assignment]
            except Exception as exc:
                raise UserCodeError(
                    f"stage {stage.name!r}: torch.compile(backend={stage.compile!r}) failed: {exc}"
                ) from exc
        self.model = model
        self._stream = torch.cuda.Stream(self.device) if self.on_cuda else None  # type: ignore[no-untyped-call]
        self._dtype = getattr(torch, stage.autocast_dtype) if stage.autocast_dtype else None

    @property
    def name(self) -> str:
        return self.stage.name

    @property
    def uses_cpu(self) -> bool:
        """Whether this stage may compete for the CPU budget with its intra-op threads: not on CUDA.
        The scaler then measures whether it does (a model that waits on another device does not)."""
        return not self.on_cuda

    def model_input(self, previous: Any, batch: pa.RecordBatch) -> Any:
        """What this stage's model is called with, from the previous stage's output."""
        if self.adapter is None:
            return previous
        try:
            return self.adapter(previous, batch)
        except UserCodeError:
            raise
        except Exception as exc:
            raise UserCodeError(f"stage {self.name!r}: adapter {self.stage.adapter!r} raised {exc!r}") from exc

    def __call__(self, inputs: Any, rows: int) -> Any:
        """The model's output for one batch, back on the host."""
        stream = torch.cuda.stream(self._stream) if self._stream is not None else contextlib.nullcontext()
        autocast = (
            torch.autocast(device_type=self.device.type, dtype=self._dtype)
            if self._dtype is not None
            else contextlib.nullcontext()
        )
        with torch.inference_mode(), stream, autocast:
            moved = to_device(inputs, self.device, pin=self.on_cuda)
            try:
                output = call_model(self.model, moved)
            except Exception as exc:
                raise UserCodeError(f"stage {self.name!r}: model raised {exc!r} on a batch of {rows} rows") from exc
            host = to_device(output, torch.device("cpu"), pin=False)
        if self._stream is not None:
            self._stream.synchronize()
        return host


class ScoringStage(Stage):
    """One model of the chain as a pipeline stage: re-batches to its own batch size, sets its
    torch threads as the scaler says, and runs the model."""

    def __init__(self, flow: Flow, runner: ModelRunner, index: int, scaler: ElasticScaler) -> None:
        super().__init__(runner.name, flow)
        self.runner = runner
        self._index = index
        self._scaler = scaler

    def run(self) -> None:
        runner = self.runner
        pending: list[Chunk] = []  # re-batching buffer for a stage whose batch size differs
        size = runner.stage.batch_size or 0
        threads = 0
        while True:
            item = self.get()
            if isinstance(item, Chunk):
                if self.flow.dropping(item.shard_id):
                    continue
                wanted = self._scaler.torch_threads(self._index, runner.stage.threads)
                if runner.uses_cpu and self._scaler.on_cpu(self._index) and wanted != threads:
                    torch.set_num_threads(wanted)
                    threads = wanted
                if self._index == 0:  # batches come read at this stage's size
                    self._score([item])
                    continue
                pending.append(item)
                while pending and sum(c.batch.num_rows for c in pending) >= size:
                    pending = self._score(pending, limit=size)
                continue
            if pending:  # a ShardEnd, a quarantined record or DONE: flush what is held first
                self._score(pending)
                pending = []
            self.put(item)
            if item is DONE:
                return

    def _score(self, chunks: list[Chunk], limit: int | None = None) -> list[Chunk]:
        """Run the model on the chunks' rows (at most ``limit``); returns the rows left over."""
        runner = self.runner
        cpu = time.thread_time()  # the scaler tells a stage that computes from one that waits on a device
        try:
            with self.busy():
                chunk = _join(chunks, f"stage {runner.name!r}") if len(chunks) > 1 else chunks[0]
                rest: list[Chunk] = []
                if limit is not None and chunk.batch.num_rows > limit:
                    chunk, tail = _split(chunk, limit)
                    rest = [tail]
                inputs = chunk.data if self._index == 0 else runner.model_input(chunk.data, chunk.batch)
                chunk.data = runner(inputs, chunk.batch.num_rows)
                if runner.stage.output_column:
                    chunk.kept[runner.stage.output_column] = chunk.data
        except UserCodeError as exc:
            self.flow.fail(chunks[0].shard_id, exc)
            return []
        finally:
            self.clock.cpu_s += time.thread_time() - cpu
        self.clock.rows += chunk.batch.num_rows
        self.put(chunk)
        return rest


def _join(chunks: list[Chunk], where: str) -> Chunk:
    batches = pa.Table.from_batches([c.batch for c in chunks]).combine_chunks().to_batches()
    kept = {name: concat_tree([c.kept[name] for c in chunks], where) for name in chunks[0].kept}
    return Chunk(chunks[0].shard_id, batches[0], concat_tree([c.data for c in chunks], where), kept)


def _split(chunk: Chunk, rows: int) -> tuple[Chunk, Chunk]:
    def cut(start: int, stop: int) -> Chunk:
        kept = {name: slice_tree(value, start, stop) for name, value in chunk.kept.items()}
        return Chunk(chunk.shard_id, chunk.batch.slice(start, stop - start), slice_tree(chunk.data, start, stop), kept)

    return cut(0, rows), cut(rows, chunk.batch.num_rows)


def call_model(model: torch.nn.Module, inputs: Any) -> Any:
    """The calling convention: model(**dict), model(*tuple), else model(x)."""
    if isinstance(inputs, Mapping):
        return model(**inputs)
    if isinstance(inputs, tuple):
        return model(*inputs)
    return model(inputs)


def to_device(value: Any, device: torch.device, *, pin: bool) -> Any:
    """Move every tensor in ``value``; ``pin`` pins host tensors first so the copy is asynchronous."""
    if isinstance(value, torch.Tensor):
        if value.device == device:
            return value
        if pin and value.device.type == "cpu" and not value.is_pinned():
            value = value.pin_memory()
        return value.to(device, non_blocking=pin or device.type == "cpu")
    if isinstance(value, Mapping):
        return {k: to_device(v, device, pin=pin) for k, v in value.items()}
    if isinstance(value, tuple | list):
        return type(value)(to_device(v, device, pin=pin) for v in value)
    return value
