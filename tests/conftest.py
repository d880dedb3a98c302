"""Fixtures shared by the whole suite: sample input data and an environment for worker subprocesses."""

from __future__ import annotations

import os
import pathlib
from collections.abc import Iterator

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

pytest_plugins = ["tests.s3_servers", "tests.cloud_servers"]

REPO_ROOT = pathlib.Path(__file__).resolve().parent.parent
TABULAR = "airflow_antbatch.examples.tabular"


@pytest.fixture
def subprocess_env(monkeypatch: pytest.MonkeyPatch) -> Iterator[dict[str, str]]:
    """Make ``tests.*`` user code importable by worker subprocesses, and keep them to 1 thread."""
    path = os.pathsep.join(p for p in (str(REPO_ROOT), os.environ.get("PYTHONPATH", "")) if p)
    monkeypatch.setenv("PYTHONPATH", path)
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    yield dict(os.environ)


def write_transactions(directory: pathlib.Path, files: int, rows_per_file: int, row_group_size: int) -> pa.Table:
    """Parquet input of unique txn_ids spread over ``files`` files; returns all rows written."""
    from airflow_antbatch.examples.tabular import generate_transactions

    directory.mkdir(parents=True, exist_ok=True)
    tables = []
    for i in range(files):
        table = generate_transactions(rows_per_file, seed=i, first_id=i * rows_per_file)
        pq.write_table(table, directory / f"part-{i:03d}.parquet", row_group_size=row_group_size)
        tables.append(table)
    return pa.concat_tables(tables)


@pytest.fixture
def transactions(tmp_path: pathlib.Path) -> tuple[pathlib.Path, pa.Table]:
    """3 files x 1,000 rows, row groups of 250: 12 row groups in all."""
    directory = tmp_path / "in"
    return directory, write_transactions(directory, files=3, rows_per_file=1000, row_group_size=250)


def committed_ids(output_uri: str, id_column: str = "txn_id") -> list[int]:
    """Every id in the files the manifest lists: what a downstream reader would see."""
    from airflow_antbatch.finalize import read_manifest

    manifest = read_manifest(output_uri)
    assert manifest is not None, f"no manifest under {output_uri}"
    ids: list[int] = []
    for entry in manifest["files"]:
        ids.extend(pq.read_table(entry["uri"], columns=[id_column]).column(id_column).to_pylist())
    return ids
