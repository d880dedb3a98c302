"""The plan's data model: pieces of input files, shards of pieces, and the job plan.

Kept apart from planning (which lists and cuts) and the ledger (which tracks progress), since
the worker, the ledger, the planner and the Airflow side all read these shapes.

A plan may hold a million shards, and every worker reads it whole before it claims one, so the
plan is stored and held as Arrow columns (``ShardTable``: one row per piece) and a ``Shard``
object is made only when one is asked for. On the store it is an Arrow IPC file with zstd
buffers, the job's header (spec, attempt, fingerprint) as JSON in the schema metadata.
"""

from __future__ import annotations

import dataclasses
import json
import re
from collections.abc import Iterable, Iterator, Sequence
from itertools import accumulate
from typing import TYPE_CHECKING, Any, overload

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from airflow_antbatch.errors import LedgerCorruptError, SpecError
from airflow_antbatch.spec import JobSpec

if TYPE_CHECKING:
    import numpy.typing as npt

PLAN_FORMAT = "airflow-antbatch/plan-arrow-1"
SHARD_ID = re.compile(r"[0-9]{5,}-[0-9a-f]{8}")
_HEADER_KEY = b"airflow-antbatch"
# zstd level 1 holds a million-shard JSONL plan in ~28 bytes per shard; higher levels shave a
# byte or two off the paths for ten times the planner's CPU.
_WRITE_OPTIONS = pa.ipc.IpcWriteOptions(compression=pa.Codec("zstd", compression_level=1))
_CHUNK = 4096  # shards made per step when iterating: amortises Arrow's per-slice cost
# An S3 ETag of a single-part upload: 32 hex digits, in quotes as S3 sends it or bare.
_ETAG = re.compile(r'(")?([0-9a-f]{32})(?(1)")')

# The plan's columns, one row per piece in shard order. Columns with no value in any row are
# left out of the file, so a JSONL plan carries no row-group or row-count columns at all.
_COLUMNS = {
    "shard": pa.uint32(),  # the shard id's digest, on each shard's first piece; null on the others
    "path": pa.string(),  # null where it is the previous piece's file: each run of a file stores it once
    "size": pa.int64(),
    "rows": pa.int64(),
    "row_groups": pa.list_(pa.int32()),  # each index as its step from the previous one (the first from 0)
    "byte_range": pa.list_(pa.int64(), 2),
    "file_size_delta": pa.int64(),  # file_size - size: zero for a whole JSONL or CSV file
    "etag": pa.binary(16),  # a version that is an ETag, as 16 bytes instead of 32 hex digits
    "etag_quoted": pa.bool_(),
    "version": pa.string(),  # any other version (an mtime)
}
_REQUIRED = ("shard", "path", "size")


@dataclasses.dataclass(frozen=True)
class Piece:
    """A whole input file, some row groups of a Parquet file, or a byte range of a JSONL file.

    A byte range ``(start, end)`` holds the lines that *start* inside it, so consecutive ranges
    cover every line of the file exactly once.
    """

    path: str
    size: int
    rows: int | None = None
    row_groups: tuple[int, ...] | None = None
    byte_range: tuple[int, int] | None = None
    # The file's size and version (ETag or mtime) at planning, set only where the piece is the
    # whole file: what the near cache fetches and keys on.
    file_size: int | None = None
    version: str | None = None


@dataclasses.dataclass(frozen=True)
class Shard:
    """The unit of claiming, output and commit: minutes of work, never hours."""

    shard_id: str
    pieces: tuple[Piece, ...]

    @property
    def rows(self) -> int | None:
        """Planned rows, when every piece's row count is known (Parquet); else None."""
        counts = [p.rows for p in self.pieces]
        return None if any(c is None for c in counts) else sum(c for c in counts if c is not None)

    @property
    def size(self) -> int:
        return sum(p.size for p in self.pieces)


class ShardTable(Sequence[Shard]):
    """A plan's shards as Arrow columns: indexing and iteration make ``Shard`` objects on demand.

    Holds only the columns and three numpy indexes (where each shard's pieces start, the id
    digests, where each run of a file's path starts), so opening a plan costs no Python object
    per shard.
    """

    def __init__(self, batch: pa.RecordBatch) -> None:
        _check_columns(batch)
        self.batch = batch
        shard = batch.column("shard")
        self._starts: npt.NDArray[np.int64] = np.append(np.flatnonzero(_valid(shard)), batch.num_rows)
        self._digests: npt.NDArray[np.uint32] = shard.drop_null().to_numpy()
        self._path_runs: npt.NDArray[np.int64] = np.flatnonzero(_valid(batch.column("path")))

    @classmethod
    def from_shards(cls, shards: Iterable[Shard]) -> ShardTable:
        """Pack shards (a generator will do: the planner streams them) whose ids start with
        their position, as the planner makes them."""
        columns = _Columns()
        for index, shard in enumerate(shards):
            columns.add(index, shard)
        return cls(columns.batch())

    def __len__(self) -> int:
        return len(self._digests)

    @overload
    def __getitem__(self, index: int) -> Shard: ...

    @overload
    def __getitem__(self, index: slice) -> list[Shard]: ...

    def __getitem__(self, index: int | slice) -> Shard | list[Shard]:
        if isinstance(index, slice):
            return [self[i] for i in range(*index.indices(len(self)))]
        position = range(len(self))[index]
        return self._shards(position, position + 1)[0]

    def __iter__(self) -> Iterator[Shard]:
        for start in range(0, len(self), _CHUNK):
            yield from self._shards(start, min(len(self), start + _CHUNK))

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, ShardTable):
            return NotImplemented
        return bool(self.batch.equals(other.batch))

    def shard_id(self, index: int) -> str:
        position = range(len(self))[index]
        return _format_id(position, int(self._digests[position]))

    def index_of(self, shard_id: str) -> int:
        """The shard's position, read off its id's prefix; KeyError if the plan has no such shard."""
        index = int(shard_id.partition("-")[0]) if SHARD_ID.fullmatch(shard_id) else -1
        if 0 <= index < len(self) and self.shard_id(index) == shard_id:
            return index
        raise KeyError(f"{shard_id!r} is not a shard of this plan")

    def total_rows(self) -> int | None:
        """Every shard's rows, when every piece's row count is known (Parquet); else None."""
        rows = _column(self.batch, "rows")
        if rows is None or rows.null_count:
            return None
        return int(pc.sum(rows).as_py() or 0)

    def input_paths(self) -> set[str]:
        """Every input file the plan reads from."""
        return set(self.batch.column("path").drop_null().to_pylist())

    def ids(self, start: int, stop: int) -> list[str]:
        """The ids of shards ``start`` to ``stop``, made in one step."""
        return [_format_id(i, d) for i, d in enumerate(self._digests[start:stop].tolist(), start)]

    def _shards(self, start: int, stop: int) -> list[Shard]:
        bounds: list[int] = self._starts[start : stop + 1].tolist()
        first = bounds[0]
        pieces = self._pieces(first, bounds[-1])
        return [
            Shard(shard_id, tuple(pieces[a - first : b - first]))
            for shard_id, a, b in zip(self.ids(start, stop), bounds[:-1], bounds[1:], strict=True)
        ]

    def _pieces(self, first: int, last: int) -> list[Piece]:
        values = {name: _values(self.batch, name, first, last) for name in _COLUMNS}
        return [
            Piece(
                path,
                size,
                rows,
                None if steps is None else tuple(accumulate(steps)),
                None if pair is None else (pair[0], pair[1]),
                None if delta is None else size + delta,
                _join_version(etag, quoted, version),
            )
            for path, size, rows, steps, pair, delta, etag, quoted, version in zip(
                self._fill_paths(values["path"], first),
                values["size"],
                values["rows"],
                values["row_groups"],
                values["byte_range"],
                values["file_size_delta"],
                values["etag"],
                values["etag_quoted"],
                values["version"],
                strict=True,
            )
        ]

    def _fill_paths(self, paths: list[str | None], first: int) -> list[str]:
        """A null path repeats the one before it: start from the run that piece ``first`` is in."""
        run = int(self._path_runs[np.searchsorted(self._path_runs, first, side="right") - 1])
        current: str = self.batch.column("path")[run].as_py()
        filled = []
        for path in paths:
            current = current if path is None else path
            filled.append(current)
        return filled


class ShardIds(Sequence[str]):
    """A plan's shard ids, made on access; ``in`` reads the position off the id, without a scan."""

    def __init__(self, table: ShardTable) -> None:
        self._table = table

    def __len__(self) -> int:
        return len(self._table)

    @overload
    def __getitem__(self, index: int) -> str: ...

    @overload
    def __getitem__(self, index: slice) -> list[str]: ...

    def __getitem__(self, index: int | slice) -> str | list[str]:
        if isinstance(index, slice):
            return [self[i] for i in range(*index.indices(len(self)))]
        return self._table.shard_id(index)

    def __iter__(self) -> Iterator[str]:
        for start in range(0, len(self), _CHUNK):
            yield from self._table.ids(start, min(len(self), start + _CHUNK))

    def __contains__(self, item: object) -> bool:
        try:
            return isinstance(item, str) and self._table.index_of(item) >= 0
        except KeyError:
            return False

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Sequence) or isinstance(other, str):
            return NotImplemented
        return len(self) == len(other) and all(a == b for a, b in zip(self, other, strict=True))


@dataclasses.dataclass(frozen=True)
class JobPlan:
    """A job spec, its shards, and the fingerprint of the input they were cut from."""

    spec: JobSpec
    attempt: int
    fingerprint: str
    input_format: str
    # Held as a ShardTable; any other sequence of shards given here is packed into one.
    shards: ShardTable
    created_at: str
    # The columns every input file must have, as read from ``columns_from`` when planning.
    input_columns: tuple[str, ...] | None = None
    columns_from: str | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.shards, ShardTable):
            object.__setattr__(self, "shards", ShardTable.from_shards(self.shards))

    def __len__(self) -> int:
        return len(self.shards)

    def shard(self, index: int) -> Shard:
        return self.shards[index]

    def shard_id(self, index: int) -> str:
        return self.shards.shard_id(index)

    def index_of(self, shard_id: str) -> int:
        """The shard's position in the plan; KeyError if the plan has no such shard."""
        return self.shards.index_of(shard_id)

    def shard_rows(self, index: int) -> int | None:
        return self.shards[index].rows

    @property
    def shard_ids(self) -> ShardIds:
        return ShardIds(self.shards)

    @property
    def planned_rows(self) -> int | None:
        return self.shards.total_rows()

    def to_bytes(self) -> bytes:
        header = {
            "format": PLAN_FORMAT,
            "attempt": self.attempt,
            "fingerprint": self.fingerprint,
            "input_format": self.input_format,
            "created_at": self.created_at,
            "spec": self.spec.to_dict(),
            "input_columns": None if self.input_columns is None else list(self.input_columns),
            "columns_from": self.columns_from,
        }
        batch = self.shards.batch
        schema = batch.schema.with_metadata({_HEADER_KEY: json.dumps(header, sort_keys=True)})
        sink = pa.BufferOutputStream()
        with pa.ipc.new_file(sink, schema, options=_WRITE_OPTIONS) as writer:
            writer.write_batch(batch)
        return bytes(sink.getvalue())

    @classmethod
    def from_bytes(cls, data: bytes, *, source: str) -> JobPlan:
        try:
            reader = pa.ipc.open_file(pa.py_buffer(data))
            header = _read_header(reader.schema, source)
            if reader.num_record_batches != 1:
                raise ValueError(f"{reader.num_record_batches} record batches, not 1")
            columns = header["input_columns"]
            return cls(
                spec=JobSpec.from_dict(header["spec"]),
                attempt=int(header["attempt"]),
                fingerprint=str(header["fingerprint"]),
                input_format=str(header["input_format"]),
                shards=ShardTable(reader.get_batch(0)),
                created_at=str(header["created_at"]),
                input_columns=None if columns is None else tuple(str(c) for c in columns),
                columns_from=header["columns_from"],
            )
        except SpecError as exc:
            raise LedgerCorruptError(f"{source}: {exc}") from exc
        except (pa.ArrowException, ValueError, KeyError, TypeError) as exc:
            raise LedgerCorruptError(f"{source} is malformed: {exc!r}") from exc


def _read_header(schema: pa.Schema, source: str) -> dict[str, Any]:
    header = json.loads((schema.metadata or {}).get(_HEADER_KEY, b"null"))
    if not isinstance(header, dict) or header.get("format") != PLAN_FORMAT:
        raise LedgerCorruptError(f"{source} is not an airflow-antbatch plan (no format {PLAN_FORMAT!r})")
    return header


class _Columns:
    """The plan's columns as Python lists, filled a piece at a time, then made Arrow at once."""

    def __init__(self) -> None:
        self.values: dict[str, list[Any]] = {name: [] for name in _COLUMNS}
        self._last_path: str | None = None

    def add(self, index: int, shard: Shard) -> None:
        digest = _digest_of(index, shard.shard_id)
        if not shard.pieces:
            raise ValueError(f"shard {shard.shard_id} has no pieces")
        for k, piece in enumerate(shard.pieces):
            self._add_piece(digest if k == 0 else None, piece)

    def _add_piece(self, digest: int | None, piece: Piece) -> None:
        etag, quoted, version = _split_version(piece.version)
        groups = piece.row_groups
        row = (
            digest,
            None if piece.path == self._last_path else piece.path,
            piece.size,
            piece.rows,
            None if groups is None else [b - a for a, b in zip((0, *groups), groups, strict=False)],
            piece.byte_range,
            None if piece.file_size is None else piece.file_size - piece.size,
            etag,
            quoted,
            version,
        )
        for values, value in zip(self.values.values(), row, strict=True):
            values.append(value)
        self._last_path = piece.path

    def batch(self) -> pa.RecordBatch:
        arrays = {name: pa.array(values, type=_COLUMNS[name]) for name, values in self.values.items()}
        kept = {name: a for name, a in arrays.items() if name in _REQUIRED or a.null_count < len(a)}
        return pa.RecordBatch.from_arrays(list(kept.values()), names=list(kept))


def _check_columns(batch: pa.RecordBatch) -> None:
    """Refuse a table this module did not write: unknown or mistyped columns, broken buffers, or
    a first piece that starts no shard or names no file."""
    names = batch.schema.names
    if len(set(names)) != len(names) or any(_COLUMNS.get(f.name) != f.type for f in batch.schema):
        raise ValueError(f"plan columns {batch.schema} are not {_COLUMNS}")
    missing = [name for name in _REQUIRED if name not in names]
    if missing:
        raise ValueError(f"plan has no {missing} column")
    batch.validate(full=True)
    if batch.num_rows and not (batch.column("shard")[0].is_valid and batch.column("path")[0].is_valid):
        raise ValueError("the plan's first piece starts no shard or names no file")


def _valid(array: pa.Array) -> npt.NDArray[np.bool_]:
    return np.asarray(array.is_valid().to_numpy(zero_copy_only=False), dtype=np.bool_)


def _column(batch: pa.RecordBatch, name: str) -> pa.Array | None:
    index = batch.schema.get_field_index(name)
    return None if index < 0 else batch.column(index)


def _values(batch: pa.RecordBatch, name: str, first: int, last: int) -> list[Any]:
    column = _column(batch, name)
    return [None] * (last - first) if column is None else column.slice(first, last - first).to_pylist()


def _format_id(index: int, digest: int) -> str:
    return f"{index:05d}-{digest:08x}"


def _digest_of(index: int, shard_id: str) -> int:
    """The digest half of a shard id, which must start with the shard's position."""
    digest = shard_id.rpartition("-")[2]
    if not SHARD_ID.fullmatch(shard_id) or _format_id(index, int(digest, 16)) != shard_id:
        raise ValueError(f"shard id {shard_id!r} at position {index} is not {index:05d}-<8 hex digits>")
    return int(digest, 16)


def _split_version(version: str | None) -> tuple[bytes | None, bool | None, str | None]:
    """(etag bytes, quoted, other version): an ETag costs 16 bytes instead of 34."""
    match = None if version is None else _ETAG.fullmatch(version)
    if match is None:
        return None, None, version
    return bytes.fromhex(match[2]), match[1] is not None, None


def _join_version(etag: bytes | None, quoted: bool | None, version: str | None) -> str | None:
    if etag is None:
        return version
    return f'"{etag.hex()}"' if quoted else etag.hex()
