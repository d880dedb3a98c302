"""``merge_small_files=True`` end to end through ``dag.test()``: merge -> plan -> workers -> finalize."""

from __future__ import annotations

import collections
import json
from typing import TYPE_CHECKING

import fsspec
import pyarrow.parquet as pq
import pytest

from airflow_antbatch.finalize import read_manifest
from tests.airflow.test_dag_e2e import _load_dag, _states
from tests.test_merge import make_objects

if TYPE_CHECKING:
    import pathlib

pytestmark = [pytest.mark.airflow, pytest.mark.slow]


def test_small_objects_are_packed_then_scored_exactly_once(
    airflow_db: pathlib.Path,
    tmp_path: pathlib.Path,
    monkeypatch: pytest.MonkeyPatch,
    subprocess_env: dict[str, str],
) -> None:
    made = make_objects(fsspec.filesystem("file"), str(tmp_path / "objects"), 50)
    monkeypatch.setenv("ANTBATCH_TEST_DATA_ROOT", str(tmp_path))
    dag = _load_dag("antbatch_merge_dags.py", "antbatch_small_files")

    run = dag.test()
    assert run.state == "success", _states(run)
    packs = json.loads((tmp_path / "out" / "_packs" / "_merge" / "manifest.json").read_text())
    assert packs["objects"] == len(made) and len(packs["packs"]) > 1
    manifest = read_manifest(str(tmp_path / "out"))
    assert manifest is not None and manifest["rows"] == len(made)
    scored = [p for f in manifest["files"] for p in pq.read_table(f["uri"], columns=["path"])["path"].to_pylist()]
    assert collections.Counter(scored) == collections.Counter(list(made))
