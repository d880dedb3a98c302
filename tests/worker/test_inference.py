"""The user-code contract for preprocess, model and postprocess, one batch at a time."""

from __future__ import annotations

from typing import Any

import numpy as np
import pyarrow as pa
import pytest
import torch

from airflow_antbatch.errors import UserCodeError
from airflow_antbatch.examples import tabular
from airflow_antbatch.worker.job_code import JobCode


def score(code: JobCode, batch: pa.RecordBatch) -> pa.Table:
    """What the pipeline's stages do to one batch, in sequence."""
    code.assembler.check_input(batch)
    data = code.preprocess(batch)
    for index, runner in enumerate(code.runners):
        data = runner(data if index == 0 else runner.model_input(data, batch), batch.num_rows)
    return code.assembler(data, batch)


@pytest.fixture
def batch() -> pa.RecordBatch:
    return tabular.generate_transactions(10).to_batches()[0]


def test_example_hooks_score_with_ids_and_kept_columns(batch: pa.RecordBatch) -> None:
    code = JobCode.in_process(
        tabular.build_model(),
        preprocess=tabular.preprocess,
        postprocess=tabular.postprocess,
        id_column="txn_id",
        keep_columns=["merchant"],
    )
    out = score(code, batch)
    assert out.column_names == ["txn_id", "merchant", "fraud_score", "is_fraud"]
    assert out.column("txn_id").to_pylist() == batch.column("txn_id").to_pylist()
    scores = np.asarray(out.column("fraud_score"))
    assert ((scores >= 0) & (scores <= 1)).all()


def test_defaults_use_numeric_columns_and_a_prediction_column() -> None:
    batch = pa.record_batch({"id": [1, 2, 3], "a": [1.0, 2.0, 3.0], "b": [0, 1, 0], "s": ["x", "y", "z"]})
    linear = torch.nn.Linear(2, 3)
    out = score(JobCode.in_process(linear, id_column="id"), batch)
    assert out.column_names == ["id", "prediction"]
    assert out.column("prediction").type == pa.list_(pa.float32(), 3)
    expected = linear(torch.tensor([[1.0, 0.0], [2.0, 1.0], [3.0, 0.0]])).detach().numpy()
    got = np.array(out.column("prediction").to_pylist(), dtype=np.float32)
    assert np.allclose(got, expected)


def test_single_output_column_is_flattened() -> None:
    batch = pa.record_batch({"a": [1.0, 2.0]})
    out = score(JobCode.in_process(torch.nn.Linear(1, 1)), batch)
    assert out.column("prediction").type == pa.float32()


def test_dict_and_tuple_inputs_reach_the_model() -> None:
    class TwoInputs(torch.nn.Module):
        def forward(self, left: torch.Tensor, right: torch.Tensor) -> torch.Tensor:
            return left + right

    batch = pa.record_batch({"a": [1.0, 2.0], "b": [10.0, 20.0]})

    def as_tuple(b: pa.RecordBatch) -> tuple[torch.Tensor, torch.Tensor]:
        return torch.tensor(b.column("a").to_pylist()), torch.tensor(b.column("b").to_pylist())

    def as_dict(b: pa.RecordBatch) -> dict[str, torch.Tensor]:
        left, right = as_tuple(b)
        return {"left": left, "right": right}

    for hook in (as_tuple, as_dict):
        out = score(JobCode.in_process(TwoInputs(), preprocess=hook), batch)
        assert out.column("prediction").to_pylist() == [11.0, 22.0]


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"id_column": "nope"}, r"lacks the id/keep column\(s\) \['nope'\]"),
        ({"postprocess": lambda o, b: {"x": [1]}}, "postprocess returned 1 rows for a batch of 10"),
        ({"postprocess": lambda o, b: 42}, "must return a dict of columns or a pyarrow Table, got int"),
        ({"id_column": "txn_id", "postprocess": lambda o, b: {"txn_id": o}}, "clash with the id/keep columns"),
    ],
)
def test_contract_violations_are_explained(batch: pa.RecordBatch, kwargs: dict[str, Any], message: str) -> None:
    kwargs.setdefault("preprocess", tabular.preprocess)
    code = JobCode.in_process(tabular.build_model(), **kwargs)
    with pytest.raises(UserCodeError, match=message):
        score(code, batch)


def test_model_error_names_the_batch_size(batch: pa.RecordBatch) -> None:
    from tests.slow_model import build_failing_model

    with pytest.raises(UserCodeError, match="model raised RuntimeError.*on a batch of 10 rows"):
        score(JobCode.in_process(build_failing_model(), preprocess=tabular.preprocess), batch)


def test_default_preprocess_needs_numeric_columns() -> None:
    with pytest.raises(UserCodeError, match="needs numeric feature columns"):
        score(JobCode.in_process(torch.nn.Identity()), pa.record_batch({"s": ["a"]}))
