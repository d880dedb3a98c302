"""Small-file merge: many small objects packed into a few large Parquet "packs".

Every read from an object store pays its first-byte latency (tens of milliseconds on S3), so
a job that reads a million small objects one by one spends its time waiting. Merging reads
them once, many at a time (async fsspec, bounded concurrency), into packs that workers then
read as ordinary Parquet: one row per object with ``path``, ``data`` (bytes), ``size`` and
``version`` (the object's ETag or mtime), so a preprocess hook gets each object's bytes and
name.

Reading goes through ``object_reader``: obstore's async fsspec filesystem on S3 where it
applies (its Rust client spends a tenth of s3fs's CPU per object, which is what bounds a merge),
s3fs otherwise.

Layout under the merge output (packs are data files; bookkeeping hides under ``_merge/``,
which the job planner skips)::

    pack-00000.parquet ...          the packs
    _merge/plan.parquet             which object goes in which pack (written once)
    _merge/packs/pack-00000.json    a pack's record: objects, bytes, unreadable objects
    _merge/manifest.json            every pack with its counts, and every unreadable object

The assignment of objects to packs is deterministic (sorted paths, cut by size) and is
written once, with create-if-absent, before any pack. A pack's record is written after the
pack itself, so a rerun skips every pack that has its record, and a crash mid-merge loses no
written pack: the rerun writes the rest from the same plan.
"""

from __future__ import annotations

import asyncio
import dataclasses
import hashlib
import io
import json
import logging
import statistics
import time
from concurrent.futures import Future, ThreadPoolExecutor
from typing import TYPE_CHECKING, Any

import fsspec
import fsspec.asyn
import pyarrow as pa
import pyarrow.parquet as pq

from airflow_antbatch.errors import InputNotFoundError, MergeError
from airflow_antbatch.object_reader import Reader, reader_filesystem
from airflow_antbatch.planning import find_files, object_version
from airflow_antbatch.store import AtomicStore

if TYPE_CHECKING:
    from collections.abc import Iterable, Sequence

log = logging.getLogger(__name__)

DEFAULT_PACK_BYTES = 128 * 2**20
DEFAULT_CONCURRENCY = 64
DEFAULT_MAX_UNREADABLE = 100
ROW_GROUP_BYTES = 16 * 2**20  # so the job planner can cut a pack into several shards
PLAN_REL = "_merge/plan.parquet"
MANIFEST_REL = "_merge/manifest.json"
PACK_SCHEMA = pa.schema([("path", pa.string()), ("data", pa.binary()), ("size", pa.int64()), ("version", pa.string())])
_PLAN_SCHEMA = pa.schema([("pack", pa.int32()), ("path", pa.string()), ("size", pa.int64()), ("version", pa.string())])


@dataclasses.dataclass(frozen=True)
class SmallObject:
    """One object as listed: its URL, size and version (ETag, or mtime where there is none)."""

    path: str
    size: int
    version: str


@dataclasses.dataclass
class MergeResult:
    """What one merge run did; ``unreadable`` holds every skipped object of the whole merge."""

    output_uri: str
    packs: int
    packs_written: int
    packs_skipped: int  # already written by an earlier run
    objects: int
    bytes: int
    unreadable: list[tuple[str, str]]
    seconds: float
    merged: bool = True  # False: the objects were large enough to read as they are
    reader: str = ""  # the filesystem that read the objects: obstore, s3, file, ...
    read_seconds: float = 0.0  # of ``seconds``, waiting for objects (listing, plan and uploads aside)

    @property
    def objects_per_s(self) -> float:
        return self.objects / self.seconds if self.seconds > 0 else 0.0

    @property
    def read_objects_per_s(self) -> float:
        """The rate of the reads alone: what the store's latency and the concurrency bound."""
        return self.objects / self.read_seconds if self.read_seconds > 0 else 0.0

    def to_dict(self) -> dict[str, Any]:
        rates = {"objects_per_s": round(self.objects_per_s, 1), "read_objects_per_s": round(self.read_objects_per_s, 1)}
        return {**dataclasses.asdict(self), **rates}


def pack_name(index: int) -> str:
    return f"pack-{index:05d}.parquet"


def _record_rel(index: int) -> str:
    return f"_merge/packs/pack-{index:05d}.json"


# -- listing and assignment -------------------------------------------------------------------


def list_objects(
    fs: fsspec.AbstractFileSystem, sources: Sequence[str], *, exclude: str | None = None
) -> list[SmallObject]:
    """The objects under ``sources`` (prefixes, globs or single objects), sorted by path.

    ``exclude`` (the merge output) is left out, so that a merge written inside its own source
    prefix does not pack its packs on the next run.
    """
    infos: dict[str, dict[str, Any]] = {}
    for uri in sources:
        infos.update(find_files(fs, uri, what="merge source"))
    skip = fs._strip_protocol(exclude).rstrip("/") + "/" if exclude else None
    objects = [
        SmallObject(fs.unstrip_protocol(p), int(i.get("size") or 0), object_version(i))
        for p, i in sorted(infos.items())
        if skip is None or not p.startswith(skip)
    ]
    if not objects:
        raise InputNotFoundError(f"merge sources {list(sources)} hold no objects")
    return objects


def read_list_file(uri: str, storage_options: dict[str, Any] | None = None) -> list[str]:
    """Object URLs from a text file, one per line; blank lines and ``#`` comments are skipped."""
    try:
        with fsspec.open(uri, "rt", encoding="utf-8", **(storage_options or {})) as handle:
            lines = [line.strip() for line in handle]
    except FileNotFoundError as exc:
        raise InputNotFoundError(f"merge list file {uri} does not exist") from exc
    return [line for line in lines if line and not line.startswith("#")]


def assign_packs(objects: Iterable[SmallObject], target_bytes: int) -> list[list[SmallObject]]:
    """Cut the objects, in order, into packs of at most ``target_bytes`` (an object larger than
    that gets a pack of its own): the same listing always gives the same packs."""
    if target_bytes < 1:
        raise MergeError(f"target_pack_bytes must be >= 1, got {target_bytes}")
    packs: list[list[SmallObject]] = []
    current: list[SmallObject] = []
    size = 0
    for obj in objects:
        if current and size + obj.size > target_bytes:
            packs.append(current)
            current, size = [], 0
        current.append(obj)
        size += obj.size
    if current:
        packs.append(current)
    return packs


def _fingerprint(objects: Iterable[SmallObject], target_bytes: int) -> str:
    digest = hashlib.sha256(f"{target_bytes}\n".encode())
    for obj in objects:
        digest.update(f"{obj.path}\t{obj.size}\t{obj.version}\n".encode())
    return digest.hexdigest()


# -- the merge plan ---------------------------------------------------------------------------


def _plan_bytes(packs: list[list[SmallObject]], fingerprint: str) -> bytes:
    columns: dict[str, list[Any]] = {name: [] for name in _PLAN_SCHEMA.names}
    for index, pack in enumerate(packs):
        for obj in pack:
            for name, value in zip(_PLAN_SCHEMA.names, (index, obj.path, obj.size, obj.version), strict=True):
                columns[name].append(value)
    schema = _PLAN_SCHEMA.with_metadata({"antbatch.merge.fingerprint": fingerprint})
    sink = io.BytesIO()
    pq.write_table(pa.table(columns, schema=schema), sink)
    return sink.getvalue()


def _plan_from_bytes(data: bytes, where: str) -> tuple[str, list[list[SmallObject]]]:
    try:
        table = pq.read_table(io.BytesIO(data))
        fingerprint = (table.schema.metadata or {})[b"antbatch.merge.fingerprint"].decode()
    except (pa.ArrowException, KeyError) as exc:
        raise MergeError(f"{where} is not a merge plan written by airflow-antbatch: {exc}") from exc
    packs: list[list[SmallObject]] = []
    for pack, path, size, version in zip(*(table.column(n).to_pylist() for n in _PLAN_SCHEMA.names), strict=True):
        while len(packs) <= pack:
            packs.append([])
        packs[pack].append(SmallObject(path, size, version))
    return fingerprint, packs


def _load_or_write_plan(
    store: AtomicStore, objects: list[SmallObject], target_bytes: int
) -> tuple[list[list[SmallObject]], bool]:
    """The plan on record, or this listing's, written now (then True: no pack can be written
    yet); a listing that differs from the one on record is refused."""
    fingerprint = _fingerprint(objects, target_bytes)
    packs = assign_packs(objects, target_bytes)
    if store.create(PLAN_REL, _plan_bytes(packs, fingerprint)):
        return packs, True
    data = store.read(PLAN_REL)
    if data is None:
        raise MergeError(f"merge plan {store.uri(PLAN_REL)} vanished while it was being read")
    recorded, packs = _plan_from_bytes(data, store.uri(PLAN_REL))
    if recorded != fingerprint:
        before = {o.path: o for pack in packs for o in pack}
        now = {o.path: o for o in objects}
        changed = sum(1 for p in before.keys() & now.keys() if before[p] != now[p])
        raise MergeError(
            f"the merge in {store.url} was planned for other objects or another pack size "
            f"({len(now.keys() - before.keys())} added, {len(before.keys() - now.keys())} removed, {changed} changed "
            "since); merge into a new output prefix"
        )
    return packs, False


# -- reading ----------------------------------------------------------------------------------


def fetch_objects(fs: fsspec.AbstractFileSystem, paths: Sequence[str], concurrency: int) -> list[bytes | Exception]:
    """Every object's bytes, or the exception reading it raised, at most ``concurrency`` in flight.

    Async filesystems (s3fs, http) run ``_cat_file`` coroutines on their own loop; others
    (local files) use as many threads.
    """
    stripped = [fs._strip_protocol(p) for p in paths]
    if getattr(fs, "async_impl", False):
        result: list[bytes | Exception] = fsspec.asyn.sync(fs.loop, _cat_many, fs, stripped, concurrency)
        return result

    def one(path: str) -> bytes | Exception:
        try:
            return bytes(fs.cat_file(path))
        except Exception as exc:
            return exc

    with ThreadPoolExecutor(max_workers=concurrency) as pool:
        return list(pool.map(one, stripped))


async def _cat_many(fs: fsspec.asyn.AsyncFileSystem, paths: list[str], concurrency: int) -> list[bytes | Exception]:
    limit = asyncio.Semaphore(concurrency)

    async def one(path: str) -> bytes | Exception:
        async with limit:
            try:
                return bytes(await fs._cat_file(path))
            except Exception as exc:
                return exc

    return list(await asyncio.gather(*(one(p) for p in paths)))


def _why_unreadable(obj: SmallObject, got: bytes | Exception) -> str | None:
    if isinstance(got, FileNotFoundError):
        return "vanished since it was listed"
    if isinstance(got, Exception):
        return f"read failed: {got!r}"
    if len(got) != obj.size:
        return f"changed since it was listed: {len(got)} bytes, listed with {obj.size}"
    return None


def build_pack(objects: list[SmallObject], contents: list[bytes | Exception]) -> tuple[bytes, dict[str, Any]]:
    """A pack's Parquet bytes and its record; objects that could not be read are left out."""
    kept: list[tuple[SmallObject, bytes]] = []
    unreadable: list[tuple[str, str]] = []
    for obj, got in zip(objects, contents, strict=True):
        reason = _why_unreadable(obj, got)
        if reason is None:
            assert isinstance(got, bytes)
            kept.append((obj, got))
        else:
            unreadable.append((obj.path, reason))
    table = pa.Table.from_arrays(
        [
            pa.array([o.path for o, _ in kept], pa.string()),
            pa.array([d for _, d in kept], pa.binary()),
            pa.array([len(d) for _, d in kept], pa.int64()),
            pa.array([o.version for o, _ in kept], pa.string()),
        ],
        schema=PACK_SCHEMA,
    )
    total = sum(len(d) for _, d in kept)
    rows_per_group = max(1, ROW_GROUP_BYTES * len(kept) // total) if total else 1
    sink = io.BytesIO()
    # Objects' bytes are neither repeated nor ordered: a dictionary or min/max statistics over
    # them only costs time (a dictionary attempt over a 128 MiB column is most of a pack's CPU).
    names = ["path", "size", "version"]
    pq.write_table(table, sink, row_group_size=rows_per_group, use_dictionary=names, write_statistics=names)
    record = {"objects": len(kept), "bytes": total, "unreadable": unreadable}
    return sink.getvalue(), record


# -- the merge --------------------------------------------------------------------------------


def merge_small_files(
    sources: Sequence[str],
    output_uri: str,
    *,
    list_file: str | None = None,
    target_pack_bytes: int = DEFAULT_PACK_BYTES,
    concurrency: int = DEFAULT_CONCURRENCY,
    max_unreadable: int = DEFAULT_MAX_UNREADABLE,
    storage_options: dict[str, Any] | None = None,
    small_object_bytes: int | None = None,
    reader: Reader = "auto",
) -> MergeResult:
    """Pack the objects under ``sources`` (and those named in ``list_file``) into ``output_uri``.

    Idempotent: a rerun writes only the packs a previous run did not finish. Objects that
    vanish or change between listing and reading are skipped and recorded with the reason;
    more than ``max_unreadable`` of them fail the merge (packs written so far stay). With
    ``small_object_bytes``, nothing is packed when the median object is at least that large
    (``MergeResult.merged`` is False): such objects are read as fast one by one. ``reader``
    picks what reads the objects (``object_reader.reader_filesystem``): ``auto`` takes obstore
    on S3 where it applies, ``s3fs`` keeps to fsspec's own.
    """
    if concurrency < 1:
        raise MergeError(f"concurrency must be >= 1, got {concurrency}")
    started = time.monotonic()
    options = dict(storage_options or {})
    names = list(sources) + (read_list_file(list_file, options) if list_file else [])
    if not names:
        raise MergeError("nothing to merge: give source prefixes, globs or objects, or a list file")
    fs, _ = fsspec.core.url_to_fs(names[0], **options)
    store = AtomicStore(output_uri, options)
    listed = list_objects(fs, names, exclude=output_uri)
    median = statistics.median_low(o.size for o in listed)
    if small_object_bytes is not None and median >= small_object_bytes:
        log.info("not merging: the median object is %d bytes (>= %d)", median, small_object_bytes)
        return MergeResult(output_uri, 0, 0, 0, len(listed), sum(o.size for o in listed), [], 0.0, merged=False)
    packs, fresh = _load_or_write_plan(store, listed, target_pack_bytes)
    read_fs, reader_name = reader_filesystem(names[0], options, concurrency, reader=reader, probe=listed[0].path)
    log.info("reading %d objects with %s, %d at a time", len(listed), reader_name, concurrency)
    records: list[dict[str, Any]] = []
    written = 0
    read_s = 0.0
    # One pack uploads while the next one's objects are read: at most two packs in memory.
    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="antbatch-merge-upload") as uploader:
        upload: Future[None] | None = None
        for index, objects in enumerate(packs):
            record = None if fresh else _read_record(store, index)
            if record is None:
                reading = time.monotonic()
                contents = fetch_objects(read_fs, [o.path for o in objects], concurrency)
                read_s += time.monotonic() - reading
                data, record = build_pack(objects, contents)
                record = {"pack": pack_name(index), **record}
                if upload is not None:
                    upload.result()
                upload = uploader.submit(_store_pack, store, index, data, record)
                written += 1
            records.append(record)
            unreadable = sum(len(r["unreadable"]) for r in records)
            if unreadable > max_unreadable:
                sample = "; ".join(f"{p}: {why}" for r in records for p, why in r["unreadable"])[:500]
                raise MergeError(
                    f"{unreadable} objects could not be read (max_unreadable={max_unreadable}) merging into "
                    f"{output_uri}; {index + 1} of {len(packs)} packs are written and kept; e.g. {sample}"
                )
        if upload is not None:
            upload.result()
    result = MergeResult(
        output_uri=output_uri,
        packs=len(packs),
        packs_written=written,
        packs_skipped=len(packs) - written,
        objects=sum(r["objects"] for r in records),
        bytes=sum(r["bytes"] for r in records),
        unreadable=[(p, why) for r in records for p, why in r["unreadable"]],
        seconds=time.monotonic() - started,
        reader=reader_name,
        read_seconds=read_s,
    )
    store.put(MANIFEST_REL, json.dumps(_manifest(result, records), indent=1).encode())
    log.info(
        "merged %d objects (%d bytes) into %d packs in %s (%d written now, %d skipped); %d unreadable; "
        "%.0f objects/s, %.0f objects/s while reading",
        result.objects,
        result.bytes,
        result.packs,
        output_uri,
        result.packs_written,
        result.packs_skipped,
        len(result.unreadable),
        result.objects_per_s,
        result.read_objects_per_s,
    )
    return result


def _store_pack(store: AtomicStore, index: int, data: bytes, record: dict[str, Any]) -> None:
    """The pack first, its record second: a record means the pack is complete."""
    # A pack someone else finished first holds the same objects: keep theirs, record ours.
    store.create(pack_name(index), data)
    store.create(_record_rel(index), json.dumps(record).encode())


def _read_record(store: AtomicStore, index: int) -> dict[str, Any] | None:
    data = store.read(_record_rel(index))
    if data is None:
        return None
    try:
        record: dict[str, Any] = json.loads(data)
        record["unreadable"] = [tuple(u) for u in record["unreadable"]]
        int(record["objects"]) + int(record["bytes"])
    except (ValueError, KeyError, TypeError) as exc:
        raise MergeError(f"{store.uri(_record_rel(index))} is not a pack record written by airflow-antbatch") from exc
    return record


def _manifest(result: MergeResult, records: list[dict[str, Any]]) -> dict[str, Any]:
    return {
        "format": "antbatch-merge-manifest",
        "version": 1,
        "packs": [{"name": r["pack"], "objects": r["objects"], "bytes": r["bytes"]} for r in records],
        "objects": result.objects,
        "bytes": result.bytes,
        "unreadable": [{"path": p, "reason": why} for p, why in result.unreadable],
    }
