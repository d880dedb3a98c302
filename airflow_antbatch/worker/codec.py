"""Moving batches between processes as bytes: Arrow IPC for record batches, raw buffers for tensors.

Pickling a RecordBatch or a tensor copies it through Python objects; these helpers send the
column and tensor buffers as they lie in memory, with a small header that says how to rebuild
them, and receive them into preallocated buffers.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import numpy as np
import pyarrow as pa
import torch

if TYPE_CHECKING:
    from multiprocessing.connection import Connection


def batch_to_bytes(batch: pa.RecordBatch) -> pa.Buffer:
    sink = pa.BufferOutputStream()
    with pa.ipc.new_stream(sink, batch.schema) as writer:
        writer.write_batch(batch)
    return sink.getvalue()


def batch_from_bytes(data: bytes | bytearray | pa.Buffer) -> pa.RecordBatch:
    return pa.ipc.open_stream(data).read_next_batch()


def send_tree(conn: Connection, tag: str, value: Any) -> None:
    """Send ``(tag, value)``; tensors and arrays in ``value`` travel as raw buffers."""
    buffers: list[memoryview] = []
    header = _flatten(value, buffers)
    conn.send((tag, header, [b.nbytes for b in buffers]))
    for buffer in buffers:
        conn.send_bytes(buffer)


def recv_tree(conn: Connection) -> tuple[str, Any]:
    tag, header, sizes = conn.recv()
    buffers = []
    for size in sizes:
        buffer = bytearray(size)  # writable, so tensors built on it need no copy
        if size:
            conn.recv_bytes_into(buffer)
        else:
            conn.recv_bytes()
        buffers.append(buffer)
    return tag, _unflatten(header, buffers)


def _flatten(value: Any, buffers: list[memoryview]) -> Any:
    if isinstance(value, torch.Tensor):
        tensor = value.detach().to("cpu").contiguous()
        dtype = str(tensor.dtype).removeprefix("torch.")
        # numpy has no bfloat16: ship the bits as int16 and reinterpret on arrival.
        array = (tensor.view(torch.int16) if tensor.dtype == torch.bfloat16 else tensor).numpy()
        buffers.append(_bytes_view(array))
        return ("tensor", dtype, tuple(tensor.shape), len(buffers) - 1)
    if isinstance(value, np.ndarray):
        array = np.ascontiguousarray(value)
        buffers.append(_bytes_view(array))
        return ("ndarray", array.dtype.str, array.shape, len(buffers) - 1)
    if isinstance(value, dict):
        return ("dict", [(k, _flatten(v, buffers)) for k, v in value.items()])
    if isinstance(value, tuple | list):
        return (type(value).__name__, [_flatten(v, buffers) for v in value])
    return ("value", value)


def _bytes_view(array: np.ndarray[Any, Any]) -> memoryview:
    return array.reshape(-1).view(np.uint8).data if array.size else memoryview(b"")


def _unflatten(node: Any, buffers: list[bytearray]) -> Any:
    kind = node[0]
    if kind == "tensor":
        _, dtype, shape, index = node
        target = getattr(torch, dtype)
        wire = torch.int16 if target == torch.bfloat16 else target
        tensor = torch.frombuffer(buffers[index], dtype=wire) if buffers[index] else torch.empty(0, dtype=wire)
        tensor = tensor.reshape(shape)
        return tensor.view(torch.bfloat16) if target == torch.bfloat16 else tensor
    if kind == "ndarray":
        _, dtype, shape, index = node
        return np.frombuffer(buffers[index], dtype=np.dtype(dtype)).reshape(shape)
    if kind == "dict":
        return {k: _unflatten(v, buffers) for k, v in node[1]}
    if kind in ("tuple", "list"):
        items = [_unflatten(v, buffers) for v in node[1]]
        return tuple(items) if kind == "tuple" else items
    return node[1]
