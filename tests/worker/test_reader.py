"""Reading pieces: Parquet row groups, and JSONL and CSV byte ranges that cover every line once."""

from __future__ import annotations

import io
import json
import pathlib
import tempfile
from collections.abc import Callable

import fsspec
import pyarrow as pa
import pyarrow.csv as pacsv
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from airflow_antbatch.errors import InputError
from airflow_antbatch.planning import plan_job
from airflow_antbatch.shards import Piece, Shard
from airflow_antbatch.spec import JobSpec
from airflow_antbatch.text_sample import SAMPLE_BYTES
from airflow_antbatch.worker import reader
from airflow_antbatch.worker.near_cache import CacheOptions, NearCache
from airflow_antbatch.worker.reader import header_line, iter_batches, read_line_range
from bench import resume as bench_resume
from bench.latencyfs import READ_LOG_ENV
from tests.conftest import write_transactions

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


_texts = st.text(st.characters(codec="utf-8", exclude_characters='\n\r"'), max_size=40)


@settings(max_examples=40, deadline=None, derandomize=True)
@given(
    fmt=st.sampled_from(["jsonl", "csv"]),
    files=st.lists(st.lists(_texts, min_size=1, max_size=120), min_size=1, max_size=5),
    max_rows=st.integers(1, 150),
)
def test_planned_text_shards_read_every_row_exactly_once_in_order(
    fmt: str, files: list[list[str]], max_rows: int
) -> None:
    """JSONL and CSV cut at estimated rows (byte ranges spanning files, a CSV range reading its
    file's header) give back every row once, in order, whatever the estimate's error."""
    with tempfile.TemporaryDirectory() as tmp:
        root = pathlib.Path(tmp)
        (root / "in").mkdir()
        first = 0
        for i, texts in enumerate(files):
            table = pa.table({"id": list(range(first, first + len(texts))), "text": texts})
            path = root / "in" / f"part-{i}.{fmt}"
            if fmt == "csv":
                pacsv.write_csv(table, path, pacsv.WriteOptions(quoting_style="all_valid"))
            else:
                path.write_text("".join(json.dumps(row) + "\n" for row in table.to_pylist()))
            first += len(texts)
        spec = JobSpec(input_uri=str(root / "in"), output_uri=str(root / "out"), model="m:f", max_shard_rows=max_rows)
        plan = plan_job(spec).plan
        ids = [i for s in plan.shards for b in iter_batches(s, fmt, 64) for i in b.column("id").to_pylist()]
    assert ids == list(range(first))


def test_a_csv_value_spanning_lines_fails_a_range_naming_the_file_and_keeps_sampled_files_whole(
    tmp_path: pathlib.Path,
) -> None:
    rows = "".join(f'{i},"line one\nline two"\n' if i == 900 else f"{i},plain\n" for i in range(1000))
    path = tmp_path / "in" / "notes.csv"
    path.parent.mkdir()
    path.write_text("id,text\n" + rows)
    torn = Shard(
        "00000-00000000", (Piece(str(path), 4000, byte_range=(path.stat().st_size - 4000, path.stat().st_size)),)
    )
    with pytest.raises(InputError, match=r"notes.csv has a quoted value spanning lines in bytes"):
        list(iter_batches(torn, "csv", 64))
    # Within the sampled head the planner sees it, and does not cut the file.
    path.write_text('id,text\n0,"line one\nline two"\n' + rows)
    plan = plan_job(
        JobSpec(input_uri=str(path), output_uri=str(tmp_path / "out"), model="m:f", max_shard_rows=100)
    ).plan
    assert len(plan.shards) == 1 and plan.shard(0).pieces[0].byte_range is None


@pytest.mark.parametrize("header_bytes", [10, SAMPLE_BYTES + 10])
@pytest.mark.parametrize("through", ["fsspec", "plain handle"])
def test_a_csv_range_reads_its_files_header_line(tmp_path: pathlib.Path, header_bytes: int, through: str) -> None:
    """Through fsspec the header is one small read of its own; a header longer than the sample,
    or a handle that is not an fsspec file, is read through the handle."""
    header = ",".join(f"c{i}" for i in range(header_bytes // 4)).encode() + b"\n"
    path = tmp_path / "wide.csv"
    path.write_bytes(header + b"1,2\n3,4\n")
    with fsspec.open(str(path), "rb") if through == "fsspec" else io.BytesIO(path.read_bytes()) as handle:
        assert header_line(handle) == header


@pytest.fixture
def read_log(tmp_path: pathlib.Path, monkeypatch: pytest.MonkeyPatch) -> Callable[[], list[tuple[str, int, int]]]:
    """Every GET of the ``latency://`` store from now on, (path, first byte, length); clears it when read."""
    directory = tmp_path / "gets"
    directory.mkdir()
    monkeypatch.setenv(READ_LOG_ENV, str(directory))

    def drain() -> list[tuple[str, int, int]]:
        gets = bench_resume.read_log(str(directory))
        for log in directory.iterdir():
            log.unlink()
        return gets

    return drain


def _footer_apart(logged: list[tuple[str, int, int]], size: int) -> tuple[list[tuple[int, int]], list[tuple[int, int]]]:
    """(first byte, length) of the footer reads (the file's last 64 KiB at most) and of the others."""
    footer = [(s, n) for _, s, n in logged if s + n == size and n <= 64 * 1024]
    return footer, [(s, n) for _, s, n in logged if (s, n) not in footer]


@pytest.mark.parametrize("through", ["store", "near cache"])
def test_a_parquet_shard_fetches_its_row_groups_and_no_byte_of_the_others(
    tmp_path: pathlib.Path, read_log: Callable[[], list[tuple[str, int, int]]], through: str
) -> None:
    """The bytes are counted at the filesystem: the benchmark's object-store double, whose reads
    go through fsspec's buffered files as s3fs's do. Besides the footer (the file's last 64 KiB,
    read as every Parquet reader does), a shard reads its own row groups' bytes, each once."""
    table = write_transactions(tmp_path / "in", files=1, rows_per_file=24_000, row_group_size=3_000)
    [local] = (tmp_path / "in").iterdir()
    options = {"first_byte_s": 0}
    spec = JobSpec(
        input_uri=f"latency://{tmp_path / 'in'}",
        output_uri=str(tmp_path / "out"),
        model="m:f",
        max_shard_rows=6_000,
        storage_options=options,
    )
    plan = plan_job(spec).plan
    assert len(plan.shards) == 4
    ranges = bench_resume.row_group_ranges(str(local))
    size = local.stat().st_size
    assert ranges[-2][0] < size - 64 * 1024  # the footer read lies within the last shard's row groups
    cache = NearCache(options, CacheOptions(max_file_bytes=size))
    opener = cache.open if through == "near cache" else None
    read_log()
    ids = []
    for shard in plan.shards:
        [piece] = shard.pieces
        assert piece.row_groups is not None
        batches = list(iter_batches(shard, "parquet", 1_000, options, opener=opener))
        ids += [i for b in batches for i in b.column("txn_id").to_pylist()]
        assert [b.num_rows for b in batches] == [1_000] * 6
        footer, gets = _footer_apart(read_log(), size)
        start, end = ranges[piece.row_groups[0]][0], ranges[piece.row_groups[-1]][1]
        assert len(footer) == 1
        assert all(start <= s and s + n <= end for s, n in gets), (shard.shard_id, gets, (start, end))
        assert len(gets) == 1 and gets[0][1] == end - start  # in one GET: the groups lie together
    assert ids == table["txn_id"].to_pylist()
    assert (cache.stats.misses, cache.stats.hits) == ((4, 0) if opener else (0, 0))  # streamed, not fetched whole


def test_a_large_piece_is_fetched_a_window_of_row_groups_at_a_time(
    tmp_path: pathlib.Path, read_log: Callable[[], list[tuple[str, int, int]]], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Memory stays bounded on a piece of many row groups: each window is fetched when its turn comes."""
    table = write_transactions(tmp_path / "in", files=1, rows_per_file=12_000, row_group_size=3_000)
    [local] = (tmp_path / "in").iterdir()
    ranges = bench_resume.row_group_ranges(str(local))
    monkeypatch.setattr(reader, "PREBUFFER_BYTES", ranges[0][1] - ranges[0][0] + 1)  # one row group a window
    piece = Piece(f"latency://{local}", local.stat().st_size, 12_000, row_groups=(0, 1, 2, 3))
    read_log()
    batches = list(iter_batches(Shard("00000-00000000", (piece,)), "parquet", 1_000, {"first_byte_s": 0}))
    assert pa.Table.from_batches(batches)["txn_id"].to_pylist() == table["txn_id"].to_pylist()
    footer, gets = _footer_apart(read_log(), local.stat().st_size)
    assert len(footer) == 1 and gets == [(a, b - a) for a, b in ranges]
