"""The plan's data model: pieces of input files, shards of pieces, and the job plan.

Kept apart from planning (which lists and cuts) and the ledger (which tracks progress), since
the worker, the ledger, the planner and the Airflow side all read these shapes.
"""

from __future__ import annotations

import dataclasses
import json
import re
from typing import Any

from airflow_antbatch.errors import LedgerCorruptError, SpecError
from airflow_antbatch.spec import JobSpec

PLAN_FORMAT = "airflow-antbatch/plan"
SHARD_ID = re.compile(r"[0-9]{5,}-[0-9a-f]{8}")


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

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"path": self.path, "size": self.size, "rows": self.rows}
        if self.row_groups is not None:
            out["row_groups"] = list(self.row_groups)
        if self.byte_range is not None:
            out["byte_range"] = list(self.byte_range)
        if self.file_size is not None:
            out["file_size"] = self.file_size
        if self.version is not None:
            out["version"] = self.version
        return out

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Piece:
        groups = data.get("row_groups")
        byte_range = data.get("byte_range")
        return cls(
            path=data["path"],
            size=int(data["size"]),
            rows=data.get("rows"),
            row_groups=tuple(groups) if groups is not None else None,
            byte_range=(int(byte_range[0]), int(byte_range[1])) if byte_range is not None else None,
            file_size=int(data["file_size"]) if data.get("file_size") is not None else None,
            version=data.get("version"),
        )


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

    def to_dict(self) -> dict[str, Any]:
        return {"id": self.shard_id, "pieces": [p.to_dict() for p in self.pieces]}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Shard:
        shard_id = data["id"]
        # Shard ids name output files: one the planner did not make could point outside the output.
        if not isinstance(shard_id, str) or not SHARD_ID.fullmatch(shard_id):
            raise ValueError(f"shard id {shard_id!r} is not one the planner makes")
        return cls(shard_id=shard_id, pieces=tuple(Piece.from_dict(p) for p in data["pieces"]))


@dataclasses.dataclass(frozen=True)
class JobPlan:
    """A job spec, its shards, and the fingerprint of the input they were cut from."""

    spec: JobSpec
    attempt: int
    fingerprint: str
    input_format: str
    shards: tuple[Shard, ...]
    created_at: str
    # The columns every input file must have, as read from ``columns_from`` when planning.
    input_columns: tuple[str, ...] | None = None
    columns_from: str | None = None

    @property
    def shard_ids(self) -> tuple[str, ...]:
        return tuple(s.shard_id for s in self.shards)

    @property
    def planned_rows(self) -> int | None:
        counts = [s.rows for s in self.shards]
        return None if any(c is None for c in counts) else sum(c for c in counts if c is not None)

    def output_name(self, shard_id: str) -> str:
        """The shard's output file, relative to the output root: the same for every try."""
        return f"part-{self.attempt:03d}-{shard_id}.parquet"

    def quarantine_name(self, shard_id: str) -> str:
        """Where the shard's bad records go; ``_``-prefixed so dataset readers skip it."""
        return f"_quarantine/{self.output_name(shard_id)}"

    def to_json(self) -> bytes:
        doc = {
            "format": PLAN_FORMAT,
            "attempt": self.attempt,
            "fingerprint": self.fingerprint,
            "input_format": self.input_format,
            "created_at": self.created_at,
            "spec": self.spec.to_dict(),
            "shards": [s.to_dict() for s in self.shards],
        }
        if self.input_columns is not None:
            doc["input_columns"] = list(self.input_columns)
            doc["columns_from"] = self.columns_from
        return json.dumps(doc, sort_keys=True).encode()

    @classmethod
    def from_json(cls, data: bytes, *, source: str) -> JobPlan:
        try:
            doc = json.loads(data)
            if not isinstance(doc, dict) or doc.get("format") != PLAN_FORMAT:
                raise LedgerCorruptError(f"{source} is not an airflow-antbatch plan (no format {PLAN_FORMAT!r})")
            return cls(
                spec=JobSpec.from_dict(doc["spec"]),
                attempt=int(doc["attempt"]),
                fingerprint=str(doc["fingerprint"]),
                input_format=str(doc["input_format"]),
                shards=tuple(Shard.from_dict(s) for s in doc["shards"]),
                created_at=str(doc["created_at"]),
                input_columns=tuple(doc["input_columns"]) if doc.get("input_columns") is not None else None,
                columns_from=doc.get("columns_from"),
            )
        except SpecError as exc:
            raise LedgerCorruptError(f"{source}: {exc}") from exc
        except (ValueError, KeyError, TypeError) as exc:
            raise LedgerCorruptError(f"{source} is malformed: {exc!r}") from exc
