"""Reading pieces: Parquet row groups, and JSONL byte ranges that cover every line once."""

from __future__ import annotations

import io
import json
import pathlib

from hypothesis import given, settings
from hypothesis import strategies as st

from airflow_antbatch.planning import plan_job
from airflow_antbatch.spec import JobSpec
from airflow_antbatch.worker.reader import iter_batches, read_line_range

_lines = st.lists(st.binary(max_size=30).map(lambda b: b.replace(b"\n", b"") + b"\n"), max_size=40)


@settings(max_examples=300, deadline=None, derandomize=True)
@given(lines=_lines, cuts=st.lists(st.integers(0, 2000), max_size=6), last_newline=st.booleans())
def test_line_ranges_cover_every_line_exactly_once(lines: list[bytes], cuts: list[int], last_newline: bool) -> None:
    data = b"".join(lines)
    if not last_newline and data:
        data = data[:-1]  # a file whose last line has no line break
    bounds = sorted({0, len(data), *(c for c in cuts if c < len(data))})
    pieces = [read_line_range(io.BytesIO(data), a, b) for a, b in zip(bounds, bounds[1:], strict=False)]
    assert b"".join(pieces) == data


def test_big_jsonl_is_split_into_ranges_and_read_back_whole(tmp_path: pathlib.Path) -> None:
    path = tmp_path / "big.jsonl"
    path.write_text("".join(json.dumps({"id": i, "text": "x" * (i % 50)}) + "\n" for i in range(2000)))
    spec = JobSpec(
        input_uri=str(path), output_uri=str(tmp_path / "out"), model="m:f", target_shard_bytes=10_000, batch_size=64
    )
    plan = plan_job(spec).plan
    assert len(plan.shards) > 5
    assert all(p.byte_range is not None for s in plan.shards for p in s.pieces)
    ids = [i for s in plan.shards for b in iter_batches(s, "jsonl", 64) for i in b.column("id").to_pylist()]
    assert ids == list(range(2000))


def test_a_line_longer_than_its_range_leaves_the_ranges_it_covers_empty(tmp_path: pathlib.Path) -> None:
    path = tmp_path / "long.jsonl"
    path.write_text("".join(json.dumps({"id": i, "text": "x" * (500 if i == 3 else 5)}) + "\n" for i in range(8)))
    spec = JobSpec(input_uri=str(path), output_uri=str(tmp_path / "out"), model="m:f", target_shard_bytes=100)
    plan = plan_job(spec).plan
    ids = [i for s in plan.shards for b in iter_batches(s, "jsonl", 64) for i in b.column("id").to_pylist()]
    assert ids == list(range(8))
