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
from airflow_antbatch.text_sample import odd_quotes

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
            with opener(piece) if opener else fsspec.open(piece.path, "rb", **options) as handle:
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


def _read_piece(
    handle: BinaryIO, piece: Piece, fmt: str, batch_size: int, columns: ExpectedColumns | None
) -> Iterator[pa.RecordBatch]:
    if fmt == "parquet":
        groups = list(piece.row_groups) if piece.row_groups is not None else None
        yield from pq.ParquetFile(handle).iter_batches(batch_size=batch_size, row_groups=groups)
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
    if start == 0:
        return lines  # the header is the range's first line
    handle.seek(0)
    return handle.readline() + lines


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
