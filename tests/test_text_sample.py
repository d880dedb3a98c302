"""Row estimates of JSONL and CSV input from the heads of a few files."""

from __future__ import annotations

import json
import pathlib
from collections import Counter

import fsspec
import pytest
from fsspec.implementations.local import LocalFileSystem
from hypothesis import given
from hypothesis import strategies as st

from airflow_antbatch.planning import plan_job
from airflow_antbatch.spec import JobSpec
from airflow_antbatch.text_sample import SAMPLE_BYTES, SAMPLE_FILES, sample_indexes, sample_text


@given(count=st.integers(0, 5000), wanted=st.integers(2, 16))
def test_sample_indexes_spread_over_the_listing_from_first_to_last(count: int, wanted: int) -> None:
    picked = sample_indexes(count, wanted)
    assert picked == sorted(set(picked)) and len(picked) == min(count, wanted)
    if count:
        assert picked[0] == 0 and picked[-1] == count - 1


def test_small_files_are_counted_and_big_ones_estimated_from_the_heads(tmp_path: pathlib.Path) -> None:
    small, big = tmp_path / "a.csv", tmp_path / "b.csv"
    small.write_text("id,x\n" + "".join(f"{i},{i % 7}\n" for i in range(100)))
    big.write_text("id,x\n" + "".join(f"{i:06d},abcdefgh\n" for i in range(20_000)))  # 16 bytes a row
    fs = fsspec.filesystem("file")
    files = [(str(p), p.stat().st_size) for p in (small, big)]
    sample = sample_text(fs, "csv", files)
    assert sample.counted == {str(small): 100}  # the header is not a row
    assert sample.rows(*files[0]) == 100
    assert 0.9 * 20_000 < sample.rows(*files[1]) < 1.1 * 20_000
    assert sample.splittable


def test_thousands_of_files_cost_a_few_reads_and_coalesce_up_to_max_shard_rows(
    tmp_path: pathlib.Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """2,000 JSONL files of 10 rows: the planner reads SAMPLE_FILES heads and one first line,
    never every file, and packs 70 files into each shard of max_shard_rows=700."""
    directory = tmp_path / "in"
    directory.mkdir()
    for i in range(2000):  # rows of one length: the estimate is exact
        rows = (json.dumps({"id": f"{i * 10 + j:06d}"}) + "\n" for j in range(10))
        (directory / f"part-{i:04d}.jsonl").write_text("".join(rows))
    reads: Counter[str] = Counter()
    cat_file, open_ = LocalFileSystem.cat_file, LocalFileSystem._open

    def counting_cat_file(self: LocalFileSystem, path: str, *args: object, **kwargs: object) -> bytes:
        reads["head"] += str(directory) in str(path)
        return cat_file(self, path, *args, **kwargs)  # type: ignore[arg-type]

    def counting_open(self: LocalFileSystem, path: str, *args: object, **kwargs: object) -> object:
        reads["open"] += str(directory) in str(path)
        return open_(self, path, *args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(LocalFileSystem, "cat_file", counting_cat_file)
    monkeypatch.setattr(LocalFileSystem, "_open", counting_open)
    spec = JobSpec(input_uri=str(directory), output_uri=str(tmp_path / "out"), model="m:f", max_shard_rows=700)
    plan = plan_job(spec).plan
    assert reads["head"] == SAMPLE_FILES and reads["open"] == SAMPLE_FILES + 1  # + the first line
    assert len(plan) == 2000 * 10 // 700 + 1
    assert all(len(plan.shard(i).pieces) == 70 for i in range(len(plan) - 1))
    assert all(p.byte_range is None for s in plan.shards for p in s.pieces)  # small files stay whole
    assert SAMPLE_BYTES > (directory / "part-0000.jsonl").stat().st_size  # so the sampled ones were counted
