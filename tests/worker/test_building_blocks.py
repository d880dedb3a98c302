"""The pipeline's small parts: the wire codec, row-wise trees, model stages (the scaler: test_scaling)."""

from __future__ import annotations

import concurrent.futures
import multiprocessing
from typing import Any

import numpy as np
import pyarrow as pa
import pytest
import torch

from airflow_antbatch.errors import UserCodeError
from airflow_antbatch.spec import ModelStage
from airflow_antbatch.worker import codec
from airflow_antbatch.worker.codec import (
    SHARED_MIN_BYTES,
    SharedBuffers,
    batch_from_bytes,
    batch_to_bytes,
    recv_batch,
    recv_tree,
    send_batch,
    send_tree,
    shares_memory,
)
from airflow_antbatch.worker.model_stage import ModelRunner, to_device
from airflow_antbatch.worker.trees import concat_tree, slice_tree


def _same(left: Any, right: Any) -> bool:
    if isinstance(left, torch.Tensor):
        return isinstance(right, torch.Tensor) and left.dtype == right.dtype and torch.equal(left, right)
    if isinstance(left, np.ndarray):
        return isinstance(right, np.ndarray) and left.dtype == right.dtype and np.array_equal(left, right)
    if isinstance(left, dict):
        return left.keys() == right.keys() and all(_same(left[k], right[k]) for k in left)
    if isinstance(left, tuple | list):
        return type(left) is type(right) and all(_same(a, b) for a, b in zip(left, right, strict=True))
    return bool(left == right)


@pytest.mark.parametrize(
    "value",
    [
        torch.arange(12).reshape(3, 4),
        {"input_ids": torch.ones(2, 5, dtype=torch.long), "mask": torch.zeros(2, 5, dtype=torch.bool)},
        (torch.randn(4, 3), np.arange(4.0), torch.ones(3, dtype=torch.bfloat16)),
        [torch.empty(0, 7), "a label", 3],
    ],
)
def test_trees_cross_a_pipe_unchanged(value: Any) -> None:
    sender, receiver = multiprocessing.Pipe()
    send_tree(sender, "ok", value)
    tag, received = recv_tree(receiver)
    assert tag == "ok" and _same(value, received)


def test_record_batches_cross_as_arrow_ipc() -> None:
    batch = pa.record_batch({"id": [1, 2], "text": ["a", None], "v": [[1.0], [2.0, 3.0]]})
    assert batch_from_bytes(batch_to_bytes(batch)).equals(batch)


class _CountingConnection:
    """A connection's sending end that counts the bytes that go down the pipe itself."""

    def __init__(self, conn: Any) -> None:
        self.conn, self.piped = conn, 0

    def send(self, obj: object) -> None:
        self.conn.send(obj)

    def send_bytes(self, data: Any) -> None:
        self.piped += memoryview(data).nbytes
        self.conn.send_bytes(data)

    def fileno(self) -> int:
        return int(self.conn.fileno())


needs_shared_memory = pytest.mark.skipif(not shares_memory(), reason="memfd is Linux's")


@pytest.mark.parametrize("shared", [pytest.param(True, marks=needs_shared_memory), False])
def test_large_buffers_cross_in_shared_memory_and_small_ones_down_the_pipe(
    shared: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Without shared memory (not Linux, or a sandbox that refuses memfd) everything takes the pipe."""
    if not shared:
        monkeypatch.setattr(codec, "shares_memory", lambda: False)
    sender, receiver = multiprocessing.Pipe()
    counting = _CountingConnection(sender)
    big = torch.arange(SHARED_MIN_BYTES // 2 + 3, dtype=torch.int32).to(torch.bfloat16)  # 1 MiB and 6 bytes
    value = {"pixels": torch.randint(0, 255, (8, 3, 224, 224), dtype=torch.uint8), "bf16": big, "ids": np.arange(5)}
    with concurrent.futures.ThreadPoolExecutor(1) as pool:  # a pipe's buffer holds less than the pixels
        received_later = pool.submit(recv_tree, receiver)
        send_tree(counting, "ok", value)  # type: ignore[arg-type]
        tag, received = received_later.result(timeout=60)
    assert tag == "ok" and _same(value, received)
    assert counting.piped == (5 * 8 if shared else 8 * 3 * 224 * 224 + big.nbytes + 5 * 8)
    received["pixels"] += 1  # the tensor's own, writable storage
    assert torch.equal(received["pixels"], value["pixels"] + 1)


@needs_shared_memory
def test_large_batches_cross_in_shared_memory_reused_once_given_back() -> None:
    sender, receiver = multiprocessing.Pipe()
    buffers = SharedBuffers()
    large = pa.record_batch({"id": list(range(1000)), "image": [bytes(2000)] * 999 + [b"last"]})
    small = pa.record_batch({"id": [1, 2], "text": ["a", None]})
    first = send_batch(sender, large, buffers)
    assert first is not None and batch_from_bytes(recv_batch(receiver)).equals(large)  # type: ignore[arg-type]
    assert send_batch(sender, small, buffers) is None and batch_from_bytes(recv_batch(receiver)).equals(small)  # type: ignore[arg-type]
    buffers.give_back(first, keep=1)
    assert send_batch(sender, large.slice(1), buffers) is first  # written over: the receiver was done with it
    assert batch_from_bytes(recv_batch(receiver)).equals(large.slice(1))  # type: ignore[arg-type]
    sender.send(None)
    assert recv_batch(receiver) is None
    buffers.give_back(first, keep=1)
    buffers.close()


def test_trees_are_cut_and_joined_by_rows() -> None:
    tree = {"x": torch.arange(10).reshape(5, 2), "pair": (np.arange(5), torch.ones(5, 3))}
    parts = [slice_tree(tree, 0, 2), slice_tree(tree, 2, 5)]
    assert [len(p["x"]) for p in parts] == [len(p["pair"][0]) for p in parts] == [2, 3]
    assert _same(concat_tree(parts, "stage 'x'"), tree)


def test_joining_ragged_outputs_says_which_stage_and_what_to_do() -> None:
    with pytest.raises(UserCodeError, match=r"stage 'embed': cannot join batches of shapes \[\(2, 5\), \(2, 7\)\]"):
        concat_tree([torch.ones(2, 5), torch.ones(2, 7)], "stage 'embed'")


def test_autocast_runs_the_stage_in_the_lower_precision() -> None:
    linear = torch.nn.Linear(4, 2)
    runner = ModelRunner(ModelStage(name="m", model="x", autocast_dtype="bfloat16"), linear)
    out = runner(torch.randn(3, 4), 3)
    assert out.dtype == torch.bfloat16


def test_compiled_stage_gives_the_eager_result() -> None:
    linear = torch.nn.Linear(4, 2)
    x = torch.randn(5, 4)
    runner = ModelRunner(ModelStage(name="m", model="x", compile="eager"), linear)
    with torch.inference_mode():
        expected = linear(x)
    assert torch.allclose(runner(x, 5), expected)


def test_adapter_errors_name_the_stage_and_the_adapter() -> None:
    def bad(previous: Any, batch: pa.RecordBatch) -> Any:
        raise KeyError("logits")

    runner = ModelRunner(ModelStage(name="rerank", model="x", adapter="pkg:bad"), torch.nn.Identity(), bad)
    with pytest.raises(UserCodeError, match=r"stage 'rerank': adapter 'pkg:bad' raised KeyError\('logits'\)"):
        runner.model_input(torch.ones(1), pa.record_batch({"a": [1]}))


def test_to_device_moves_every_tensor_and_leaves_the_rest() -> None:
    value = {"x": torch.ones(2), "meta": "keep", "pair": (torch.zeros(1), 3)}
    moved = to_device(value, torch.device("cpu"), pin=False)
    assert moved["meta"] == "keep" and moved["pair"][1] == 3 and torch.equal(moved["x"], value["x"])
