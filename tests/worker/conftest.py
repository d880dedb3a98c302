"""Fixtures shared by the worker tests."""

from __future__ import annotations

import pathlib

import pyarrow as pa
import pytest

from airflow_antbatch.planning import plan_job
from airflow_antbatch.spec import JobSpec
from tests.conftest import TABULAR


def tabular_spec(input_uri: str, tmp_path: pathlib.Path) -> JobSpec:
    """The tabular example job over ``input_uri``: shards of 500 rows, batches of 100."""
    return JobSpec(
        input_uri=input_uri,
        output_uri=str(tmp_path / "out"),
        model=f"{TABULAR}:build_model",
        id_column="txn_id",
        max_shard_rows=500,
        batch_size=100,
        lease_ttl_s=5.0,
    )


@pytest.fixture
def plan_uri(transactions: tuple[pathlib.Path, pa.Table], tmp_path: pathlib.Path) -> str:
    """The tabular example job over ``transactions``: 6 shards of 500 rows."""
    return plan_job(tabular_spec(str(transactions[0]), tmp_path)).plan_uri
