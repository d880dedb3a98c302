"""SmallFileMergeOperator: packs in the store, counts in XCom, the packs' location for the plan."""

from __future__ import annotations

import pathlib

import fsspec
import pytest

from airflow_antbatch.errors import InputNotFoundError
from airflow_antbatch.operators.merge import INPUT_URI_KEY, SmallFileMergeOperator
from tests.airflow.conftest import FakeTaskInstance
from tests.test_merge import make_objects, read_packs


def test_packs_the_objects_and_hands_the_packs_to_the_plan(tmp_path: pathlib.Path) -> None:
    made = make_objects(fsspec.filesystem("file"), str(tmp_path / "objects"), 30)
    ti = FakeTaskInstance()
    out = str(tmp_path / "packs")
    op = SmallFileMergeOperator(
        task_id="merge", sources=str(tmp_path / "objects"), output_uri=out, target_pack_bytes=64 * 1024
    )
    summary = op.execute(ti.context())
    assert ti.xcom[INPUT_URI_KEY] == out
    assert summary["objects"] == 30 and summary["packs"] == summary["packs_written"] > 1
    assert read_packs(out) == made
    assert op.execute(FakeTaskInstance().context())["packs_written"] == 0  # a retry keeps every pack


def test_a_missing_prefix_is_named(tmp_path: pathlib.Path) -> None:
    op = SmallFileMergeOperator(task_id="merge", sources=[str(tmp_path / "none")], output_uri=str(tmp_path / "p"))
    with pytest.raises(InputNotFoundError, match="none does not exist"):
        op.execute(FakeTaskInstance().context())


def test_auto_mode_passes_large_objects_on_unmerged(tmp_path: pathlib.Path) -> None:
    make_objects(fsspec.filesystem("file"), str(tmp_path / "objects"), 10)  # 1-9 KiB each
    ti = FakeTaskInstance()
    source = str(tmp_path / "objects")
    op = SmallFileMergeOperator(
        task_id="merge", sources=source, output_uri=str(tmp_path / "packs"), small_object_bytes=1024
    )
    summary = op.execute(ti.context())
    assert summary["merged"] is False and summary["packs"] == 0 and summary["objects"] == 10
    assert ti.xcom[INPUT_URI_KEY] == source
    assert not (tmp_path / "packs").exists()


def test_auto_mode_takes_one_source() -> None:
    with pytest.raises(ValueError, match="exactly one source"):
        SmallFileMergeOperator(task_id="merge", sources=["a", "b"], output_uri="out", small_object_bytes=1)
