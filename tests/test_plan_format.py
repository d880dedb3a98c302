"""The plan on the store and in memory: an Arrow file of a few bytes per shard, opened as columns,
with a Shard made only when one is asked for."""

from __future__ import annotations

import gc
import random
import tracemalloc

import pyarrow as pa
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from airflow_antbatch.errors import LedgerCorruptError
from airflow_antbatch.shards import PLAN_FORMAT, JobPlan, Piece, Shard, ShardTable
from airflow_antbatch.spec import JobSpec

SPEC = JobSpec(input_uri="s3://bucket/lake", output_uri="s3://bucket/out", model="pkg:model")
SOURCE = "s3://bucket/out/_antbatch/attempt-000/plan.arrow"


def _plan(shards: list[Shard] | ShardTable, **kw: object) -> JobPlan:
    fields: dict[str, object] = {
        "spec": SPEC,
        "attempt": 2,
        "fingerprint": "f" * 64,
        "input_format": "jsonl",
        "shards": shards,
        "created_at": "2026-12-01T00:00:00+00:00",
        **kw,
    }
    return JobPlan(**fields)  # type: ignore[arg-type]


_HEX = "0123456789abcdef"
_versions = st.one_of(
    st.none(),
    st.text(_HEX, min_size=32, max_size=32),  # an ETag, bare
    st.text(_HEX, min_size=32, max_size=32).map(lambda h: f'"{h}"'),  # an ETag as S3 sends it
    st.text(_HEX.upper(), min_size=32, max_size=32),  # not lower-case: kept as text
    st.text(max_size=20),  # an mtime, or anything else
)
_ints = st.integers(0, 2**40)
_pieces = st.builds(
    Piece,
    path=st.sampled_from(["s3://b/x.jsonl", "s3://b/y.parquet", "/local/z.csv", "s3://b/é ü.jsonl"]),
    size=_ints,
    rows=st.none() | _ints,
    row_groups=st.none() | st.lists(st.integers(0, 2**31 - 1), max_size=5).map(tuple),
    byte_range=st.none() | st.tuples(_ints, _ints),
    file_size=st.none() | _ints,
    version=_versions,
)
_shards = st.lists(st.tuples(st.integers(0, 2**32 - 1), st.lists(_pieces, min_size=1, max_size=4)), max_size=12).map(
    lambda drawn: [Shard(f"{i:05d}-{d:08x}", tuple(p)) for i, (d, p) in enumerate(drawn)]
)


@settings(max_examples=150, deadline=None, derandomize=True)
@given(shards=_shards, columns=st.none() | st.lists(st.text(max_size=5), max_size=3).map(tuple))
def test_a_plan_round_trips_through_its_bytes(shards: list[Shard], columns: tuple[str, ...] | None) -> None:
    plan = _plan(shards, input_columns=columns, columns_from=None if columns is None else "s3://b/x.jsonl")
    again = JobPlan.from_bytes(plan.to_bytes(), source=SOURCE)
    assert again == plan
    assert list(again.shards) == shards
    assert [again.shard(i) for i in range(len(again))] == shards
    assert list(again.shard_ids) == [s.shard_id for s in shards]
    assert [again.index_of(s.shard_id) for s in shards] == list(range(len(shards)))
    assert [again.shard_rows(i) for i in range(len(again))] == [s.rows for s in shards]
    all_rows = [s.rows for s in shards]
    planned = None if not shards or None in all_rows else sum(r for r in all_rows if r is not None)
    assert again.planned_rows == planned
    assert again.shards.input_paths() == {p.path for s in shards for p in s.pieces}


def test_shards_and_ids_are_sequences_that_look_up_by_id() -> None:
    shards = [Shard(f"{i:05d}-{i:08x}", (Piece(f"/in/{i}.jsonl", 10 + i),)) for i in range(10_000)]
    plan = _plan(shards)
    assert len(plan) == len(plan.shards) == len(plan.shard_ids) == 10_000
    assert plan.shards[-1] == shards[-1] and plan.shards[2:5] == shards[2:5]
    assert plan.shard_ids[-1] == "09999-0000270f" and plan.shard_ids[::5000] == ["00000-00000000", "05000-00001388"]
    assert plan.shard_ids == [s.shard_id for s in shards] and plan.shard_ids == _plan(shards).shard_ids
    assert "04096-00001000" in plan.shard_ids
    for stranger in ("04096-00001001", "4096-00001000", "004096-00001000", "10000-00002710", "x", 7):
        assert stranger not in plan.shard_ids
    with pytest.raises(KeyError, match="04096-00001001"):
        plan.index_of("04096-00001001")
    with pytest.raises(IndexError):
        plan.shard(10_000)


def test_ids_that_do_not_start_with_their_position_or_shards_without_pieces_are_refused() -> None:
    piece = Piece("/in/a.jsonl", 1)
    with pytest.raises(ValueError, match=r"'00001-0000abcd' at position 0"):
        _plan([Shard("00001-0000abcd", (piece,))])
    with pytest.raises(ValueError, match="has no pieces"):
        _plan([Shard("00000-0000abcd", ())])


def _jsonl_shards(count: int) -> list[Shard]:
    """One S3 object per shard: varied sizes, a random quoted ETag each, as s3fs lists them."""
    rng = random.Random(0)
    shards = []
    for i in range(count):
        size = rng.randrange(64 * 2**20, 128 * 2**20)
        etag = f'"{rng.randbytes(16).hex()}"'
        piece = Piece(f"s3://bucket/lake/ds=2026-12-01/part-{i:07d}.jsonl", size, file_size=size, version=etag)
        shards.append(Shard(f"{i:05d}-{rng.getrandbits(32):08x}", (piece,)))
    return shards


def test_a_100k_shard_plan_takes_at_most_32_bytes_a_shard_and_opens_without_an_object_per_shard() -> None:
    shards = _jsonl_shards(100_000)
    data = _plan(ShardTable.from_shards(shards)).to_bytes()
    del shards
    assert len(data) / 100_000 <= 32
    gc.collect()
    objects = len(gc.get_objects())
    tracemalloc.start()
    try:
        plan = JobPlan.from_bytes(data, source=SOURCE)
        _, peak = tracemalloc.get_traced_memory()  # Python and numpy memory; Arrow's own is not traced
    finally:
        tracemalloc.stop()
    assert peak / 100_000 < 32  # the three numpy indexes; a Python object per shard costs more
    assert len(gc.get_objects()) - objects < 1000
    assert plan.shard(99_999).pieces[0].path.endswith("part-0099999.jsonl")
    assert plan.shards.batch.schema.names == ["shard", "path", "size", "file_size_delta", "etag", "etag_quoted"]


def _write(batch: pa.RecordBatch, header: bytes | None) -> bytes:
    schema = batch.schema.with_metadata({b"airflow-antbatch": header} if header is not None else None)
    sink = pa.BufferOutputStream()
    with pa.ipc.new_file(sink, schema) as writer:
        writer.write_batch(batch)
    return bytes(sink.getvalue())


def _good_plan() -> bytes:
    return _plan([Shard("00000-0000abcd", (Piece("/in/a.jsonl", 5),))]).to_bytes()


def _with_columns(**columns: pa.Array) -> bytes:
    """The good plan's header over other columns."""
    header = pa.ipc.open_file(pa.py_buffer(_good_plan())).schema.metadata[b"airflow-antbatch"]
    return _write(pa.RecordBatch.from_pydict(columns), header)


@pytest.mark.parametrize(
    ("data", "message"),
    [
        (b"", "is malformed"),
        (b'{"format": "airflow-antbatch/plan"}', "is malformed"),  # the JSON plan of earlier releases
        (_good_plan()[:-100], "is malformed"),
        (_write(pa.record_batch({"x": [1]}), None), "is not an airflow-antbatch plan"),
        (_write(pa.record_batch({"x": [1]}), b'{"format": "someone-else"}'), "is not an airflow-antbatch plan"),
        (_with_columns(shard=pa.array([1], pa.uint32()), path=pa.array(["/a"])), r"no \['size'\] column"),
        (_with_columns(shard=pa.array([1]), path=pa.array(["/a"]), size=pa.array([5])), "plan columns"),
        (
            _with_columns(shard=pa.array([None, 1], pa.uint32()), path=pa.array(["/a"] * 2), size=pa.array([5, 5])),
            "first piece starts no shard",
        ),
    ],
)
def test_corrupt_or_foreign_bytes_name_the_file(data: bytes, message: str) -> None:
    with pytest.raises(LedgerCorruptError, match=message) as caught:
        JobPlan.from_bytes(data, source=SOURCE)
    assert SOURCE in str(caught.value)


def test_the_format_tag_and_a_bad_spec_are_checked() -> None:
    header = pa.ipc.open_file(pa.py_buffer(_good_plan())).schema.metadata[b"airflow-antbatch"]
    batch = pa.ipc.open_file(pa.py_buffer(_good_plan())).get_batch(0)
    assert PLAN_FORMAT.encode() in header
    bad_spec = header.replace(b'"spec_version": 1', b'"spec_version": 99')
    with pytest.raises(LedgerCorruptError, match=f"{SOURCE}: job spec field 'spec_version'"):
        JobPlan.from_bytes(_write(batch, bad_spec), source=SOURCE)
