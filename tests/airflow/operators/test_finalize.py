"""FinalizeBatchInferenceOperator: manifest in the store, a compact summary in XCom."""

from __future__ import annotations

from typing import TYPE_CHECKING

import pytest

from airflow_antbatch.errors import JobIncompleteError
from airflow_antbatch.finalize import read_manifest
from airflow_antbatch.operators.finalize import FinalizeBatchInferenceOperator, output_root_asset
from airflow_antbatch.operators.plan import PlanBatchInferenceOperator
from tests.airflow.conftest import TABULAR, FakeTaskInstance, FinishedJob

if TYPE_CHECKING:
    import pathlib

    import pyarrow as pa

CTX = FakeTaskInstance().context()  # finalize reads nothing from its context


def test_returns_a_compact_summary_of_the_manifest(finished_job: FinishedJob) -> None:
    summary = FinalizeBatchInferenceOperator(task_id="finalize", plan_uri=finished_job.plan_uri).execute(CTX)
    assert summary == {
        "manifest_uri": f"{finished_job.output_uri}/_SUCCESS",
        "output_uri": finished_job.output_uri,
        "plan_uri": finished_job.plan_uri,
        "rows": finished_job.rows,
        "shards": 4,
        "attempt": 0,
    }
    manifest = read_manifest(finished_job.output_uri)
    assert manifest is not None and len(manifest["files"]) == 4  # the file list stays out of XCom


def test_refuses_an_unfinished_job(transactions: tuple[pathlib.Path, pa.Table]) -> None:
    directory, _ = transactions
    ti = FakeTaskInstance()
    PlanBatchInferenceOperator(
        task_id="plan", input_uri=str(directory), output_uri=str(directory.parent / "out"), model=f"{TABULAR}:m"
    ).execute(ti.context())
    with pytest.raises(JobIncompleteError, match="1 of 1 shards are not committed"):
        FinalizeBatchInferenceOperator(task_id="finalize", plan_uri=str(ti.xcom["plan_uri"])).execute(CTX)


@pytest.mark.parametrize(
    ("output_uri", "asset_uri"),
    [
        ("s3://lake/predictions/ds={{ ds }}/", "s3://lake/predictions"),
        ("s3://lake/predictions/{{ ds }}/part/", "s3://lake/predictions"),
        ("s3://lake/predictions/", "s3://lake/predictions"),
        ("/data/predictions/ds={{ ds }}", "file:///data/predictions"),
    ],
)
def test_the_output_asset_is_the_static_root_of_the_output_uri(output_uri: str, asset_uri: str) -> None:
    assert output_root_asset(output_uri).uri == asset_uri


@pytest.mark.parametrize("output_uri", ["{{ var.value.out }}", "s3://{{ var.value.bucket }}/out/", "out/{{ ds }}"])
def test_an_output_uri_without_a_static_root_is_refused_naming_the_fix(output_uri: str) -> None:
    with pytest.raises(ValueError, match=r"pass output_asset=Asset\(\.\.\.\)"):
        output_root_asset(output_uri)
