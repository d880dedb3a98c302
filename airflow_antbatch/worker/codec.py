"""Moving batches between processes: Arrow IPC for record batches, raw buffers for tensors.

Pickling a RecordBatch or a tensor copies it through Python objects; these helpers send the
column and tensor buffers as they lie in memory, with a small header that says how to rebuild
them. Small buffers go down the connection. A buffer of ``SHARED_MIN_BYTES`` or more goes in
shared memory instead, and only its file descriptor crosses: through a pipe, a 38 MB batch of
images in and its 38 MB tensor out cost the parent 136 ms of CPU (``Connection`` reads and
writes 64 KB at a time and copies each piece twice), which held a 16-core GPU machine's pool to
5 batches a second. The memory is a memfd, not a file in ``/dev/shm``, which containers cap
at 64 MB by default.
"""

from __future__ import annotations

import functools
import logging
import mmap
import os
from multiprocessing.reduction import recv_handle, send_handle
from typing import TYPE_CHECKING, Any

import numpy as np
import pyarrow as pa
import torch

if TYPE_CHECKING:
    from multiprocessing.connection import Connection

log = logging.getLogger(__name__)

SHARED_MIN_BYTES = 1 << 20  # below this a copy through the pipe costs less than a mapping's set-up


@functools.cache
def shares_memory() -> bool:
    """Whether buffers can cross as shared memory here: Linux's memfd (fds cross the socket),
    unless a sandbox refuses it. Tried once per process."""
    if not hasattr(os, "memfd_create"):
        return False
    try:
        os.close(os.memfd_create("antbatch-probe", os.MFD_CLOEXEC))
    except OSError:
        return False
    return True


class SharedBuffer:
    """Anonymous shared memory and this process's writable mapping of it; another process maps
    the same pages from the file descriptor ``send`` passes over the connection. A mapping holds
    a descriptor of its own while it lives (Python's mmap keeps one)."""

    def __init__(self, size: int) -> None:
        self.size = size
        self.fd = os.memfd_create("antbatch", os.MFD_CLOEXEC)
        try:
            os.ftruncate(self.fd, size)
            self.map = mmap.mmap(self.fd, size)
        except OSError:
            os.close(self.fd)
            raise

    def send(self, conn: Connection) -> None:
        send_handle(conn, self.fd, 0)  # the pid matters on Windows only

    def close(self) -> None:
        self.map.close()
        os.close(self.fd)


def _shared(size: int) -> SharedBuffer | None:
    try:
        return SharedBuffer(size)
    except OSError as exc:  # out of memory or descriptors: the pipe still works
        log.warning("no shared memory of %d bytes (%s): sending through the pipe", size, exc)
        return None


def _receive_mapping(conn: Connection, size: int, access: int = mmap.ACCESS_WRITE) -> mmap.mmap:
    """Map the buffer whose descriptor comes next; it stays mapped while anything uses it."""
    fd = recv_handle(conn)
    try:
        return mmap.mmap(fd, size, access=access)
    finally:
        os.close(fd)


class SharedBuffers:
    """Shared buffers a sender writes batches into, reused once the receiver is done with one: a
    fresh mapping pays a page fault per page on first touch (28 ms for 38 MB on a 2-core VM,
    against 3 ms to copy into pages touched before)."""

    def __init__(self) -> None:
        self._free: list[SharedBuffer] = []

    def take(self, size: int) -> SharedBuffer | None:
        """A buffer of ``size`` bytes or more; None if the system gives no more (the pipe then)."""
        for index, buffer in enumerate(self._free):
            if buffer.size >= size:
                return self._free.pop(index)
        return _shared(size + size // 8)  # room for the next batch to be a little larger

    def give_back(self, buffer: SharedBuffer, keep: int) -> None:
        """Keep at most ``keep`` for reuse: as many as can be on their way at once."""
        self._free.append(buffer)
        while len(self._free) > keep:
            self._free.pop(0).close()

    def close(self) -> None:
        for buffer in self._free:
            buffer.close()
        self._free.clear()


def batch_to_bytes(batch: pa.RecordBatch) -> pa.Buffer:
    sink = pa.BufferOutputStream()
    _write_batch(sink, batch)
    return sink.getvalue()


def batch_from_bytes(data: bytes | bytearray | mmap.mmap | pa.Buffer) -> pa.RecordBatch:
    return pa.ipc.open_stream(pa.py_buffer(data)).read_next_batch()


def _write_batch(sink: pa.NativeFile, batch: pa.RecordBatch) -> None:
    with pa.ipc.new_stream(sink, batch.schema) as writer:
        writer.write_batch(batch)


def send_batch(conn: Connection, batch: pa.RecordBatch, buffers: SharedBuffers) -> SharedBuffer | None:
    """Send a record batch; returns the shared buffer it lies in, which the receiver reads until
    it says it is done (then give it back to ``buffers``), or None when it went down the pipe.
    Only a batch large enough for shared memory is sized as IPC first (a pass over it): the
    small ones, most of them, are written once."""
    if batch.nbytes >= SHARED_MIN_BYTES and shares_memory():
        mock = pa.MockOutputStream()
        _write_batch(mock, batch)
        size = mock.size()
        buffer = buffers.take(size)
        if buffer is not None:
            try:
                _write_batch(pa.FixedSizeBufferWriter(pa.py_buffer(buffer.map)), batch)
                conn.send(("shared", size))
                buffer.send(conn)
            except BaseException:
                buffer.close()
                raise
            return buffer
    data = batch_to_bytes(batch)
    conn.send(("pipe", data.size))
    conn.send_bytes(data)
    return None


def recv_batch(conn: Connection) -> bytes | mmap.mmap | None:
    """What ``send_batch`` sent, for ``batch_from_bytes``; None when the sender says stop."""
    message = conn.recv()
    if message is None:
        return None
    how, size = message
    return _receive_mapping(conn, size, mmap.ACCESS_READ) if how == "shared" else conn.recv_bytes()


def send_tree(conn: Connection, tag: str, value: Any) -> None:
    """Send ``(tag, value)``; tensors and arrays in ``value`` travel as raw buffers, large ones
    in shared memory of their own (the receiver keeps it as their storage)."""
    buffers: list[memoryview] = []
    header = _flatten(value, buffers)
    shared = [_shared(b.nbytes) if b.nbytes >= SHARED_MIN_BYTES and shares_memory() else None for b in buffers]
    try:
        conn.send((tag, header, [b.nbytes for b in buffers], [m is not None for m in shared]))
        for buffer, memory in zip(buffers, shared, strict=True):
            if memory is None:
                conn.send_bytes(buffer)
            else:
                memory.map[:] = buffer
                memory.send(conn)
    finally:
        for memory in shared:
            if memory is not None:
                memory.close()  # the receiver's descriptor keeps the pages


def recv_tree(conn: Connection) -> tuple[str, Any]:
    tag, header, sizes, shared = conn.recv()
    buffers: list[bytearray | mmap.mmap] = []
    for size, in_shared_memory in zip(sizes, shared, strict=True):
        if in_shared_memory:
            buffers.append(_receive_mapping(conn, size))
            continue
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


def _unflatten(node: Any, buffers: list[bytearray | mmap.mmap]) -> Any:
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
