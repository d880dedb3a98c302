"""The pipeline's small parts: the wire codec, row-wise trees, the scaler's rule, model stages."""

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
from airflow_antbatch.worker.scaling import ElasticScaler, StageClock
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


@pytest.mark.parametrize(
    ("starved", "busy", "processes", "expected", "threads"),
    [
        (0.5, 0.95, 1, 2, 2),  # the model waits on a saturated pool: grow; the new process gets a core
        (0.5, 0.95, 4, None, 1),  # ... but not past the budget
        (0.0, 0.95, 1, None, 3),  # the model never waits: preprocess keeps up on its one core
        (0.5, 0.50, 1, None, 4),  # the pool idles too (the reader is the bottleneck): its core is offered
        (0.0, 0.30, 3, 2, 3),  # 0.9 cores of demand: two processes would do; the model gets 3 threads
        (0.0, 0.02, 1, None, 4),  # a light hook leaves the model every core
    ],
)
def test_the_scaler_grows_on_a_preprocess_bottleneck_only(
    starved: float, busy: float, processes: int, expected: int | None, threads: int
) -> None:
    scaler = ElasticScaler(cpu_budget=4, cpu_model_stages=1, interval_s=1.0)
    scaler.processes = scaler.preprocess_cores = processes
    start = scaler._window_start
    model = StageClock(wait_in_s=starved * 2.0)
    decided = scaler.observe(pool_busy_s=busy * processes * 2.0, models=[model], now=start + 2.0)
    assert decided == expected
    assert scaler.torch_threads() == threads


def test_fixed_settings_are_never_scaled() -> None:
    scaler = ElasticScaler(cpu_budget=8, cpu_model_stages=2, fixed_processes=3, fixed_threads=5)
    assert scaler.observe(100.0, [StageClock(wait_in_s=100.0)], now=scaler._window_start + 60) is None
    assert (scaler.processes, scaler.torch_threads(), scaler.torch_threads(stage_threads=1)) == (3, 5, 1)
    assert ElasticScaler(cpu_budget=8, cpu_model_stages=2).torch_threads() == 4  # until measured: 8 cores // 2


def test_a_fixed_pool_still_hands_idle_cores_to_the_model() -> None:
    scaler = ElasticScaler(cpu_budget=4, cpu_model_stages=1, fixed_processes=2, interval_s=1.0)
    scaler.preprocess_cores = 2
    assert scaler.observe(pool_busy_s=0.1, models=[StageClock()], now=scaler._window_start + 2.0) is None
    assert scaler.processes == 2 and scaler.torch_threads() == 4
    assert scaler.decisions[-1].reason.startswith("preprocess uses 0.1 cores")


@pytest.mark.parametrize(("rate_after", "kept"), [(2000.0, True), (1050.0, False)])
def test_more_threads_stay_only_if_the_model_gets_faster(rate_after: float, kept: bool) -> None:
    scaler = ElasticScaler(cpu_budget=2, cpu_model_stages=1, interval_s=1.0)
    scaler.preprocess_cores = 1  # as after a window in which preprocessing kept a core busy
    start = scaler._window_start
    model = StageClock(busy_s=2.0, rows=2000)  # 1000 rows per busy second on one thread
    scaler.observe(pool_busy_s=0.0, models=[model], now=start + 2.0)
    assert scaler.torch_threads() == 2  # the idle pool's core goes to the model, on probation
    after = StageClock(busy_s=4.0, rows=2000 + int(rate_after * 2.0))
    scaler.observe(pool_busy_s=0.0, models=[after], now=start + 4.0)
    assert scaler.torch_threads() == (2 if kept else 1)
    if not kept:
        assert "the cores are not free" in scaler.decisions[-1].reason
        scaler.observe(pool_busy_s=0.0, models=[StageClock(busy_s=6.0, rows=6000)], now=start + 6.0)
        assert scaler.torch_threads() == 1  # not tried again


def test_model_stages_share_the_cores_left_by_their_busy_time() -> None:
    scaler = ElasticScaler(cpu_budget=6, cpu_model_stages=3, interval_s=1.0)
    assert [scaler.torch_threads(i) for i in range(3)] == [2, 2, 2]  # 6 // 3 until measured
    stages = [StageClock(busy_s=1.8), StageClock(busy_s=0.1), StageClock(busy_s=0.1)]
    scaler.observe(pool_busy_s=2.0, models=stages, now=scaler._window_start + 2.0)
    assert [scaler.torch_threads(i) for i in range(3)] == [4, 1, 1]  # the embedder does 90% of the work


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
