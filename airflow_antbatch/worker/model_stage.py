"""One model of the chain, run as its own stage: device, threads, autocast and compile.

On CUDA each stage has its own stream, so that stages on one GPU overlap their copies and
kernels; host tensors are pinned first so that copies to the device can be asynchronous.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any

import torch

from airflow_antbatch.errors import UserCodeError

if TYPE_CHECKING:
    import pyarrow as pa

    from airflow_antbatch.spec import ModelStage

Adapter = Callable[[Any, "pa.RecordBatch"], Any]


class ModelRunner:
    """Calls one model on batches; a thread of the pipeline owns it."""

    def __init__(self, stage: ModelStage, model: torch.nn.Module, adapter: Adapter | None = None) -> None:
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
        """Whether this stage competes for the CPU budget with its intra-op threads."""
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
