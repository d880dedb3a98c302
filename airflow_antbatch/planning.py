"""Input listing and sharding: turn an input URI into a plan, once per job attempt.

Shards are cut deterministically from the sorted listing, so the same input always gives the
same shard ids; a rerun of the plan step reuses the stored plan when the input is unchanged.
"""

from __future__ import annotations

import csv
import dataclasses
import datetime as dt
import hashlib
import json
import logging
from typing import TYPE_CHECKING, Any

import fsspec

from airflow_antbatch import layout
from airflow_antbatch.errors import InputError, InputNotFoundError, PlanConflictError, SpecError
from airflow_antbatch.parquet_footers import read_footers
from airflow_antbatch.shards import JobPlan, Piece, Shard, ShardTable
from airflow_antbatch.store import AtomicStore
from airflow_antbatch.text_sample import SAMPLE_FILES, TextSample, sample_text

if TYPE_CHECKING:
    from collections.abc import Callable, Iterable, Iterator

    import pyarrow as pa

    from airflow_antbatch.spec import JobSpec

log = logging.getLogger(__name__)

_EXTENSIONS = {".parquet": "parquet", ".pq": "parquet", ".jsonl": "jsonl", ".ndjson": "jsonl", ".csv": "csv"}
_GLOB_CHARS = frozenset("*?[")
# A byte range of a big text file is never cut smaller than this share of a full shard: the
# shard in hand is closed instead of topped up with a sliver.
_MIN_FILL = 0.125
# Spec fields whose change changes the results: a plan made with other values is another job.
# The models count as the chain ``model_stages`` spells out (see ``result_settings``).
_RESULT_FIELDS = (
    "output_uri",
    "preprocess",
    "postprocess",
    "id_column",
    "keep_columns",
    "max_shard_rows",
    "target_shard_bytes",
)


@dataclasses.dataclass(frozen=True, slots=True)
class InputFile:
    """One listed input file and what identifies its version (etag, or size and mtime)."""

    path: str
    size: int
    version: str
    row_groups: tuple[tuple[int, int], ...] | None = None  # (rows, bytes) per Parquet row group
    schema: pa.Schema | None = None  # Parquet: read from the footer


@dataclasses.dataclass(frozen=True)
class PlanResult:
    plan: JobPlan
    plan_uri: str
    reused: bool


def plan_job(
    spec: JobSpec, *, force: bool = False, storage_options: dict[str, Any] | None = None, min_shards: int = 1
) -> PlanResult:
    """Write the job's plan once; reuse it when the input is unchanged; refuse a changed one.

    ``force`` starts a fresh attempt (new shard ids and output names) even if a plan exists.
    ``min_shards``: as many shards as this where the data allows (see :func:`shard_rows`);
    callers pass ``SHARDS_PER_WORKER`` times their worker count, for dynamic balance.
    ``storage_options`` go over the spec's for this process's own reads and writes, and are
    not written into the plan: an Airflow connection's credentials, which workers never get.
    """
    options = {**spec.storage_options, **(storage_options or {})}
    fmt, files = list_input(spec, options)
    columns = input_columns(fmt, files, options)
    check_passthrough_columns(spec, columns, files[0].path)
    fingerprint = plan_fingerprint(spec, fmt, files)
    text = None if fmt == "parquet" else _sample(files, options, fmt)
    store = AtomicStore(spec.state_root, options)
    attempt, existing = _latest_plan(store)
    if existing is not None and not force:
        if existing.fingerprint == fingerprint:
            where = store.uri(layout.plan_rel(attempt))
            log.info("reusing plan %s: input unchanged, %d shards", where, len(existing))
            return PlanResult(existing, where, reused=True)
        raise PlanConflictError(_describe_conflict(existing, spec, fmt, files, store.uri(layout.plan_rel(attempt))))
    attempt = 0 if existing is None else attempt + 1
    plan = JobPlan(
        spec=spec,
        attempt=attempt,
        fingerprint=fingerprint,
        input_format=fmt,
        shards=cut_shards(
            files, shard_rows(files, spec.max_shard_rows, min_shards), spec.target_shard_bytes, text=text
        ),
        created_at=dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        input_columns=columns,
        columns_from=files[0].path,
    )
    rel = layout.plan_rel(attempt)
    if not store.create(rel, plan.to_bytes()):
        # Another planner won the race for this attempt: use its plan if it is the same job.
        data = store.read(rel)
        assert data is not None
        other = JobPlan.from_bytes(data, source=store.uri(rel))
        if other.fingerprint != fingerprint:
            raise PlanConflictError(f"a concurrent planner wrote a different plan at {store.uri(rel)}")
        return PlanResult(other, store.uri(rel), reused=True)
    log.info("planned %d shards from %d %s files into %s", len(plan), len(files), fmt, store.uri(rel))
    return PlanResult(plan, store.uri(rel), reused=False)


def resolve_plan_uri(uri: str, storage_options: dict[str, Any] | None = None) -> str:
    """The plan behind ``uri``: a plan file, a state root, or an output URI (latest attempt)."""
    uri = uri.rstrip("/")
    if uri.endswith("/" + layout.PLAN_FILE):
        return uri
    for root in (uri, f"{uri}/{layout.STATE_DIR}"):
        store = AtomicStore(root, storage_options)
        attempt, plan = _latest_plan(store)
        if plan is not None:
            return store.uri(layout.plan_rel(attempt))
    raise FileNotFoundError(
        f"no airflow-antbatch plan under {uri} (looked for attempt-*/{layout.PLAN_FILE} and {layout.STATE_DIR}/)"
    )


def _latest_plan(store: AtomicStore) -> tuple[int, JobPlan | None]:
    """Probe attempt-000, attempt-001, ... and return the last plan found."""
    attempt, plan = -1, None
    while True:
        data = store.read(layout.plan_rel(attempt + 1))
        if data is None:
            return attempt, plan
        attempt += 1
        plan = JobPlan.from_bytes(data, source=store.uri(layout.plan_rel(attempt)))


def _describe_conflict(existing: JobPlan, spec: JobSpec, fmt: str, files: list[InputFile], where: str) -> str:
    before, now = result_settings(existing.spec), result_settings(spec)
    changed = [name for name in now if before[name] != now[name]]
    if changed:
        what = f"job settings differ ({', '.join(changed)})"
    else:
        planned = existing.shards.input_paths()
        listed = {f.path for f in files}
        what = (
            f"the input changed since it was planned ({len(listed - planned)} new, "
            f"{len(planned - listed)} gone, or files rewritten in place)"
        )
    return (
        f"a plan already exists at {where} but {what}; a different job must use another output_uri "
        "or state_uri, and a changed input needs force=True (--force) to start a fresh attempt"
    )


def plan_fingerprint(spec: JobSpec, fmt: str, files: Iterable[InputFile]) -> str:
    """A hash of the job's result settings and every file's path, size and version, fed a file
    at a time (a JSON array each, so self-delimiting): a million files make no giant string."""
    digest = hashlib.sha256(json.dumps({"format": fmt, "spec": result_settings(spec)}, sort_keys=True).encode())
    for f in files:
        digest.update(json.dumps([f.path, f.size, f.version]).encode())
    return digest.hexdigest()


def result_settings(spec: JobSpec) -> dict[str, Any]:
    """What decides the output rows: batch sizes, devices, threads and compile settings do not;
    ``model="m"`` and a one-stage chain named ``model`` of ``m`` are the same job."""
    settings = {name: getattr(spec, name) for name in _RESULT_FIELDS}
    settings["keep_columns"] = list(spec.keep_columns)
    settings["model/stages"] = [
        [stage.name, stage.model, stage.adapter, stage.output_column, stage.autocast_dtype]
        for stage in spec.model_stages
    ]
    return settings


# -- listing ---------------------------------------------------------------------------------


def list_input(spec: JobSpec, storage_options: dict[str, Any] | None = None) -> tuple[str, list[InputFile]]:
    """The input's format and its files, sorted, with Parquet row-group sizes read (through
    ``storage_options``, default the spec's)."""
    options = spec.storage_options if storage_options is None else storage_options
    fs, _ = fsspec.core.url_to_fs(spec.input_uris[0], **options)
    infos: dict[str, dict[str, Any]] = {}
    for uri in spec.input_uris:
        infos.update(_list_one(fs, uri, spec.input_format))
    infos = {p: i for p, i in infos.items() if _keep_size(p, i)}
    if not infos:
        raise InputNotFoundError(f"input {list(spec.input_uris)} holds no non-empty data files")
    paths = sorted(infos)
    fmt = spec.input_format or _infer_format(paths)
    footers = iter(read_footers(fs, paths, [int(infos[p]["size"]) for p in paths])) if fmt == "parquet" else None
    files: list[InputFile] = []
    for path in paths:
        info = infos.pop(path)  # a listing entry is a dict of ~10 keys: free each once it is read
        url = fs.unstrip_protocol(path)
        version = object_version(info)
        footer = next(footers) if footers is not None else None
        groups, schema = (footer.row_groups, footer.schema) if footer is not None else (None, None)
        if schema is not None and files and files[0].schema is not None:
            _check_same_schema(files[0].path, files[0].schema, url, schema)
        files.append(InputFile(url, int(info["size"]), version, groups, schema))
    return fmt, files


def input_columns(fmt: str, files: list[InputFile], storage_options: dict[str, Any]) -> tuple[str, ...]:
    """The columns every input file must have: Parquet's are checked here for every file;
    CSV and JSONL files are checked by the reader against the first file's header or line."""
    first = files[0]
    if first.schema is not None:
        return tuple(first.schema.names)
    try:
        with fsspec.open(first.path, "rb", **storage_options) as handle:
            line = handle.readline()
        if fmt == "csv":
            return tuple(next(csv.reader([line.decode("utf-8-sig")])))
        record = json.loads(line)
    except (ValueError, StopIteration, UnicodeDecodeError) as exc:
        raise InputError(f"cannot read the first {fmt} line of input file {first.path}: {exc}") from exc
    if not isinstance(record, dict):
        raise InputError(f"the first line of input file {first.path} is not a JSON object")
    return tuple(record)


def check_passthrough_columns(spec: JobSpec, columns: tuple[str, ...], source: str) -> None:
    """A missing id or keep column fails the plan, once, instead of every shard on every worker."""
    missing = [
        (field, name)
        for field, names in (
            ("id_column", (spec.id_column,) if spec.id_column else ()),
            ("keep_columns", spec.keep_columns),
        )
        for name in names
        if name not in columns
    ]
    if missing:
        what = ", ".join(f"{field} {name!r}" for field, name in missing)
        raise SpecError(
            f"job spec {what}: no such column in input file {source}, which the job is planned from; "
            f"its columns are {list(columns)}"
        )


def _check_same_schema(first: str, expected: pa.Schema, url: str, schema: pa.Schema) -> None:
    if schema.equals(expected):
        return
    want = dict(zip(expected.names, expected.types, strict=True))
    have = dict(zip(schema.names, schema.types, strict=True))
    parts = [f"missing {sorted(want.keys() - have.keys())}"] if want.keys() - have.keys() else []
    parts += [f"unexpected {sorted(have.keys() - want.keys())}"] if have.keys() - want.keys() else []
    parts += [
        f"{name!r} is {have[name]} here, {want[name]} there"
        for name in want
        if name in have and have[name] != want[name]
    ]
    raise InputError(
        f"input file {url} does not match the schema of {first}: {'; '.join(parts) or 'column order differs'}"
    )


def object_version(info: dict[str, Any]) -> str:
    """What changes when an object is rewritten: its ETag, or its mtime where there is none."""
    return str(info.get("ETag") or info.get("etag") or info.get("mtime") or info.get("LastModified") or "")


def find_files(
    fs: fsspec.AbstractFileSystem, uri: str, *, what: str = "input", keep: Callable[[str], bool] | None = None
) -> dict[str, dict[str, Any]]:
    """The files ``uri`` names, with their listing info: a glob's matches, every file under a
    directory whose path below it passes ``keep``, or the one file; ``what`` names it in the error."""
    path = fs._strip_protocol(uri)
    if _GLOB_CHARS & set(path):
        found = fs.glob(path, detail=True)
    elif fs.isdir(path):
        found = fs.find(path, detail=True)
        if keep is not None:
            found = {p: i for p, i in found.items() if keep(p[len(path) :])}
    elif fs.isfile(path):
        found = {path: fs.info(path)}
    else:
        raise InputNotFoundError(f"{what} {uri} does not exist")
    return {p: i for p, i in found.items() if i.get("type", "file") == "file"}


def _list_one(fs: fsspec.AbstractFileSystem, uri: str, fmt: str | None) -> dict[str, dict[str, Any]]:
    found = find_files(fs, uri, keep=lambda rel: _is_data_name(rel, fmt))
    if not found:
        if _GLOB_CHARS & set(uri):
            raise InputNotFoundError(f"input glob {uri} matches no files")
        wanted = f"{fmt} " if fmt else ""
        raise InputNotFoundError(f"input directory {uri} holds no {wanted}data files")
    return found


def _is_data_name(rel: str, fmt: str | None) -> bool:
    """Skip hidden and bookkeeping files (``.tmp``, ``_SUCCESS``, ``_antbatch/``) in a directory."""
    parts = [p for p in rel.split("/") if p]
    if any(p.startswith((".", "_")) for p in parts):
        return False
    ext = _extension(rel)
    return _EXTENSIONS.get(ext) == fmt if fmt else ext in _EXTENSIONS


def _keep_size(path: str, info: dict[str, Any]) -> bool:
    if int(info.get("size") or 0) == 0:
        log.warning("skipping zero-byte input file %s: it holds no rows", path)
        return False
    return True


def _extension(path: str) -> str:
    name = path.rsplit("/", 1)[-1]
    return "." + name.rsplit(".", 1)[-1].lower() if "." in name else ""


def _infer_format(paths: list[str]) -> str:
    formats: dict[str, str] = {}
    for path in paths:
        fmt = _EXTENSIONS.get(_extension(path))
        if fmt is None:
            raise InputError(
                f"cannot tell the format of input file {path}: set input_format to one of "
                f"{sorted(set(_EXTENSIONS.values()))}"
            )
        formats.setdefault(fmt, path)
    if len(formats) > 1:
        examples = ", ".join(f"{f} ({p})" for f, p in sorted(formats.items()))
        raise InputError(f"input mixes formats: {examples}; point input_uri at one format or set input_format")
    return next(iter(formats))


# -- sharding --------------------------------------------------------------------------------

# Shards per worker that planners aim for: a worker that finishes early takes another, so the
# job ends within about a shard's time of the ideal.
SHARDS_PER_WORKER = 4
# A smaller shard costs more in ledger requests and output files than its share of the balance gains.
MIN_SHARD_ROWS = 10_000


def shard_rows(files: list[InputFile], max_rows: int, min_shards: int) -> int:
    """Rows per shard: ``max_rows``, or fewer where that makes fewer than ``min_shards`` shards,
    but never under ``MIN_SHARD_ROWS``. Parquet only, whose footers count the rows."""
    total = sum(rows for f in files for rows, _ in f.row_groups or ())
    if min_shards <= 1 or not total:
        return max_rows
    return min(max_rows, max(MIN_SHARD_ROWS, -(-total // min_shards)))


def cut_shards(
    files: list[InputFile], max_rows: int, target_bytes: int, *, text: TextSample | None = None
) -> ShardTable:
    """Pack files (Parquet row groups, or JSONL and CSV byte ranges) in order into shards under both limits.

    Parquet: a row group larger than a limit on its own becomes a shard by itself. JSONL and
    CSV (``text``: their estimated rows): see ``_cut_text``.
    """
    groups = {f.path: len(f.row_groups) for f in files if f.row_groups is not None}
    packed = (
        _pack(_units(files), max_rows, target_bytes) if text is None else _cut_text(files, text, max_rows, target_bytes)
    )
    return ShardTable.from_shards(
        _make_shard(i, [_whole_or_part(p, groups) for p in pieces]) for i, pieces in enumerate(packed)
    )


def _sample(files: list[InputFile], storage_options: dict[str, Any], fmt: str) -> TextSample:
    fs, _ = fsspec.core.url_to_fs(files[0].path, **storage_options)
    sample = sample_text(fs, fmt, [(f.path, f.size) for f in files])
    log.info(
        "%s rows estimated at %.1f bytes each from the heads of %d of %d files (%d counted whole)%s",
        fmt,
        sample.bytes_per_row,
        min(len(files), SAMPLE_FILES),
        len(files),
        len(sample.counted),
        "" if sample.splittable else "; CSV values span lines, so files are not split",
    )
    return sample


def _cut_text(files: list[InputFile], text: TextSample, max_rows: int, target_bytes: int) -> Iterator[list[Piece]]:
    """Each shard's pieces: whole small files packed together, big ones cut into byte ranges.

    A file within both limits stays whole (the near cache fetches it in one GET). A bigger one
    is cut into ranges at estimated row counts, its first range topping up the shard in hand
    and its last left open for the next files, so that shards hold about ``max_rows``
    estimated rows across file boundaries. A range is never cut smaller than ``_MIN_FILL`` of
    a shard. CSV whose values span lines (``text.splittable``) is never cut.
    """
    current: list[Piece] = []
    rows, size = 0.0, 0
    for f in files:
        file_rows = text.rows(f.path, f.size)
        if not text.splittable or (file_rows <= max_rows and f.size <= target_bytes):
            if current and (rows + file_rows > max_rows or size + f.size > target_bytes):
                yield current
                current, rows, size = [], 0.0, 0
            current.append(Piece(f.path, f.size, file_size=f.size, version=f.version))
            rows, size = rows + file_rows, size + f.size
            continue
        row_bytes = f.size / max(file_rows, 1.0)
        full = min(max_rows * row_bytes, target_bytes)
        start = 0
        while start < f.size:
            room = min((max_rows - rows) * row_bytes, target_bytes - size)
            if current and room < _MIN_FILL * full:
                yield current
                current, rows, size = [], 0.0, 0
                continue
            end = min(f.size, start + max(1, int(room)))
            current.append(Piece(f.path, end - start, byte_range=(start, end), file_size=f.size, version=f.version))
            rows, size = rows + (end - start) / row_bytes, size + end - start
            start = end
    if current:
        yield current


def _pack(units: Iterable[Piece], max_rows: int, target_bytes: int) -> Iterator[list[Piece]]:
    """Each shard's pieces in turn: the cut streams into the plan's columns, never holding every Shard."""
    current: list[Piece] = []
    rows = size = 0
    for unit in units:
        unit_rows = unit.rows or 0
        if current and (rows + unit_rows > max_rows or size + unit.size > target_bytes):
            yield current
            current, rows, size = [], 0, 0
        _append(current, unit)
        rows += unit_rows
        size += unit.size
    if current:
        yield current


def _whole_or_part(piece: Piece, groups: dict[str, int]) -> Piece:
    """Only a piece that is its whole file keeps the file's size and version, the near cache's
    key: a cache that fetched a whole file for one row group would read other shards' rows."""
    partial = piece.byte_range is not None or (
        piece.row_groups is not None and len(piece.row_groups) != groups.get(piece.path)
    )
    return dataclasses.replace(piece, file_size=None, version=None) if partial else piece


def _units(files: list[InputFile]) -> Iterable[Piece]:
    for f in files:
        if f.row_groups is None:
            yield Piece(f.path, f.size, file_size=f.size, version=f.version)
        else:
            for index, (rows, size) in enumerate(f.row_groups):
                yield Piece(f.path, size, rows, (index,), file_size=f.size, version=f.version)


def _append(pieces: list[Piece], unit: Piece) -> None:
    """Add ``unit`` to the shard's pieces, merging consecutive row groups of one file into one piece."""
    last = pieces[-1] if pieces else None
    if last is not None and last.path == unit.path and last.row_groups is not None and unit.row_groups is not None:
        pieces[-1] = dataclasses.replace(
            last,
            size=last.size + unit.size,
            rows=(last.rows or 0) + (unit.rows or 0),
            row_groups=last.row_groups + unit.row_groups,
        )
    else:
        pieces.append(unit)


def _make_shard(index: int, pieces: list[Piece]) -> Shard:
    """The id is the shard's position and a digest of its pieces: stable for the same input."""
    digest = hashlib.sha1(json.dumps([vars(p) for p in pieces]).encode()).hexdigest()
    return Shard(shard_id=f"{index:05d}-{digest[:8]}", pieces=tuple(pieces))
