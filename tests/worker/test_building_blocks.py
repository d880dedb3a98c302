"""The pipeline's small parts: the wire codec, row-wise trees, model stages (the scaler: test_scaling)."""

from __future__ import annotations

import multiprocessing
from typing import Any

import numpy as np
import pyarrow as pa
import pytest
import torch

from airflow_antbatch.errors import UserCodeError
from airflow_antbatch.spec import ModelStage
from airflow_antbatch.worker.codec import batch_from_bytes, batch_to_bytes, recv_tree, send_tree
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
