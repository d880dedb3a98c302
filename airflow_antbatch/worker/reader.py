"""Reading a shard's pieces as record batches, through fsspec."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import fsspec
import pyarrow as pa
import pyarrow.csv as pacsv
import pyarrow.json as pajson
import pyarrow.parquet as pq

from airflow_antbatch.errors import InputError

if TYPE_CHECKING:
    from collections.abc import Iterator

    from airflow_antbatch.shards import Piece, Shard


def iter_batches(
    shard: Shard, fmt: str, batch_size: int, storage_options: dict[str, Any] | None = None
) -> Iterator[pa.RecordBatch]:
    """Batches of at most ``batch_size`` rows, piece by piece, in planned order."""
    for piece in shard.pieces:
        try:
            yield from _read_piece(piece, fmt, batch_size, storage_options or {})
        except FileNotFoundError as exc:
            raise InputError(f"shard {shard.shard_id}: input file {piece.path} disappeared after planning") from exc
        except (pa.ArrowException, OSError, ValueError) as exc:
            raise InputError(f"shard {shard.shard_id}: cannot read {fmt} file {piece.path}: {exc}") from exc


def _read_piece(piece: Piece, fmt: str, batch_size: int, storage_options: dict[str, Any]) -> Iterator[pa.RecordBatch]:
    with fsspec.open(piece.path, "rb", **storage_options) as handle:
        if fmt == "parquet":
            groups = list(piece.row_groups) if piece.row_groups is not None else None
            yield from pq.ParquetFile(handle).iter_batches(batch_size=batch_size, row_groups=groups)
            return
        if fmt == "jsonl":
            table = pajson.read_json(handle)
        elif fmt == "csv":
            table = pacsv.read_csv(handle)
        else:
            raise InputError(f"unknown input format {fmt!r} for {piece.path}")
        yield from table.to_batches(max_chunksize=batch_size)
