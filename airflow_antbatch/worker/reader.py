"""Reading a shard's pieces as record batches, through fsspec."""

from __future__ import annotations

import io
from typing import TYPE_CHECKING, Any, BinaryIO

import fsspec
import pyarrow as pa
import pyarrow.csv as pacsv
import pyarrow.json as pajson
import pyarrow.parquet as pq

from airflow_antbatch.errors import InputError, StoreError
from airflow_antbatch.store import is_transport_error
from airflow_antbatch.text_sample import SAMPLE_BYTES, odd_quotes

# The bytes of row groups fetched at once: pyarrow's largest coalesced read (32 MiB), so a
# window costs one GET where its row groups lie together, as a shard's do.
PREBUFFER_BYTES = 32 * 2**20

if TYPE_CHECKING:
    from collections.abc import Callable, Iterator
    from contextlib import AbstractContextManager

    from airflow_antbatch.shards import Piece, Shard

    Opener = Callable[[Piece], AbstractContextManager[BinaryIO]]
    ExpectedColumns = tuple[tuple[str, ...], str]


def iter_batches(
    shard: Shard,
    fmt: str,
    batch_size: int,
    storage_options: dict[str, Any] | None = None,
    *,
    opener: Opener | None = None,
    columns: ExpectedColumns | None = None,
) -> Iterator[pa.RecordBatch]:
    """Batches of at most ``batch_size`` rows, piece by piece, in planned order.

    ``opener`` opens each piece's file (the worker's near cache); default: straight from the
    store. ``columns`` (names, and the file they were read from when planning): a CSV or JSONL
    file whose columns differ fails its shard, naming both files.
    """
    options = storage_options or {}
    for piece in shard.pieces:
        try:
            with opener(piece) if opener else open_piece(piece, options) as handle:
                yield from _read_piece(handle, piece, fmt, batch_size, columns)
        except FileNotFoundError as exc:
            raise InputError(f"shard {shard.shard_id}: input file {piece.path} disappeared after planning") from exc
        except (pa.ArrowException, OSError, ValueError) as exc:
            raise InputError(f"shard {shard.shard_id}: cannot read {fmt} file {piece.path}: {exc}") from exc
        except Exception as exc:
            if not is_transport_error(exc):
                raise
            # The store, not the file: the worker gives the shard back uncounted.
            raise StoreError(f"shard {shard.shard_id}: reading {piece.path} failed: {exc}") from exc


def open_piece(piece: Piece, storage_options: dict[str, Any]) -> AbstractContextManager[BinaryIO]:
    """The piece's file, straight from the store.

    Row groups of a Parquet file are opened with no read-ahead (``cache_type="none"``): the
    reader asks for exactly their bytes (``_read_row_groups``), where a read-ahead block (5 MiB
    in fsspec, 50 MiB in s3fs) would run on into the next row groups, which other shards own
    and may have committed.
    """
    fs, path = fsspec.core.url_to_fs(piece.path, **storage_options)
    extra = {"cache_type": "none"} if piece.row_groups is not None else {}
    handle: AbstractContextManager[BinaryIO] = fs.open(path, "rb", **extra)
    return handle


def _read_row_groups(handle: BinaryIO, piece: Piece, batch_size: int) -> Iterator[pa.RecordBatch]:
    """The piece's row groups, each window of them fetched as few ranges of exactly their column
    chunks (pyarrow's ``pre_buffer`` coalesces them), a window of ``PREBUFFER_BYTES`` at most
    (or one row group) at a time so that memory stays bounded on a large piece.

    Besides, pyarrow reads the file's last 64 KiB for the footer, as any Parquet reader does.
    """
    parquet = pq.ParquetFile(handle, pre_buffer=True)
    meta = parquet.metadata
    groups = list(piece.row_groups) if piece.row_groups is not None else list(range(meta.num_row_groups))
    for window in _windows(meta, groups):
        yield from parquet.iter_batches(batch_size=batch_size, row_groups=window)


def _windows(meta: pq.FileMetaData, groups: list[int]) -> Iterator[list[int]]:
    """``groups`` in runs of at most ``PREBUFFER_BYTES`` of column chunks (a larger group alone)."""
    window: list[int] = []
    window_bytes = 0
    for group in groups:
        row_group = meta.row_group(group)
        size = sum(row_group.column(c).total_compressed_size for c in range(row_group.num_columns))
        if window and window_bytes + size > PREBUFFER_BYTES:
            yield window
            window, window_bytes = [], 0
        window.append(group)
        window_bytes += size
    if window:
        yield window


def _read_piece(
    handle: BinaryIO, piece: Piece, fmt: str, batch_size: int, columns: ExpectedColumns | None
) -> Iterator[pa.RecordBatch]:
    if fmt == "parquet":
        yield from _read_row_groups(handle, piece, batch_size)
        return
    if fmt not in ("jsonl", "csv"):
        raise InputError(f"unknown input format {fmt!r} for {piece.path}")
    source: BinaryIO = handle
    if piece.byte_range is not None:
        data = _text_range(handle, piece, fmt)
        if data is None:  # no line starts in this range: a longer line than the range covers it
            return
        source = io.BytesIO(data)
    table = pajson.read_json(source) if fmt == "jsonl" else pacsv.read_csv(source)
    if columns is not None and set(table.column_names) != set(columns[0]):
        missing, extra = (
            sorted(set(columns[0]) - set(table.column_names)),
            sorted(set(table.column_names) - set(columns[0])),
        )
        raise InputError(
            f"input file {piece.path} has other columns than {columns[1]}, which the job was planned from: "
            f"missing {missing}, unexpected {extra}"
        )
    yield from table.to_batches(max_chunksize=batch_size)


def _text_range(handle: BinaryIO, piece: Piece, fmt: str) -> bytes | None:
    """The range's lines, after its file's header line for CSV; None when no line starts in it.

    A CSV line with an odd number of quotes is a value spanning lines, which a range cut at a
    line start tears apart: the shard fails rather than read torn rows (the planner does not
    cut CSV whose sample shows one, but the sample is only the head of a few files).
    """
    assert piece.byte_range is not None
    start, end = piece.byte_range
    lines = read_line_range(handle, start, end)
    if fmt == "jsonl" or not lines:
        return lines or None
    if any(odd_quotes(line) for line in lines.splitlines()):
        raise InputError(
            f"CSV file {piece.path} has a quoted value spanning lines in bytes {start}-{end}, so it cannot be "
            "read in byte ranges: raise max_shard_rows and target_shard_bytes above the file's rows and size"
        )
    return lines if start == 0 else header_line(handle) + lines  # at 0 the header is the first line


def header_line(handle: BinaryIO) -> bytes:
    """The file's first line. An fsspec file's is fetched on its own, in one small GET: through
    the handle it would cost a read-ahead block (50 MiB on S3) besides the range's own."""
    fs, path = getattr(handle, "fs", None), getattr(handle, "path", None)
    head: bytes = fs.cat_file(path, 0, SAMPLE_BYTES) if fs is not None and path is not None else b""
    if b"\n" in head:
        return head[: head.index(b"\n") + 1]
    handle.seek(0)  # no fsspec file, or a header longer than the sample
    return handle.readline()


def read_line_range(handle: BinaryIO, start: int, end: int) -> bytes:
    """The whole lines that start in ``[start, end)``: Hadoop's rule for splitting text files.

    A line straddling ``start`` belongs to the previous range, so the reader skips to the
    first line break at or after ``start - 1``; it then reads lines while they start before ``end``.
    """
    if start > 0:
        handle.seek(start - 1)
        handle.readline()
    else:
        handle.seek(0)
    chunks = []
    position = handle.tell()
    while position < end:
        line = handle.readline()
        if not line:
            break
        chunks.append(line)
        position += len(line)
    return b"".join(chunks)
