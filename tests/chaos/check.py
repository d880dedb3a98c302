"""The checker: what the ledger and the output files say after a run, never the exit codes.

Exactly-once is judged on what a downstream reader sees: the files that finalize's manifest
lists. Their ids, as a multiset, must equal the input's; the manifest must agree with the
commit records and list, for each shard, the file of the try that committed it, present and
with the bytes that try committed (sha256 in the commit record and in the manifest): a late
writer (a woken zombie) writes its own try's file and never changes a committed one. Wasted
work is every try the ledger shows (a claim) that did not commit, counted in its shard's rows.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import hashlib
import io
import json
from collections import Counter
from collections.abc import Sequence
from typing import Any

import pyarrow.parquet as pq

from airflow_antbatch import layout
from airflow_antbatch.errors import AntBatchError
from airflow_antbatch.finalize import finalize_job
from airflow_antbatch.layout import MANIFEST_NAME
from airflow_antbatch.ledger import CommitRecord, Ledger
from airflow_antbatch.store import AtomicStore

ID_COLUMN = "txn_id"


@dataclasses.dataclass
class Verdict:
    rows: int  # input rows
    lost: int  # input rows missing from the committed output
    duplicated: int  # committed rows beyond one per input row
    wasted_tries: int  # claims that did not commit
    wasted_rows: int  # their shards' rows
    backups: int  # tries started as speculative backups: each race to the commit wastes one at most
    orphans: int  # files in the output folder after finalize that the manifest does not list
    losing_files: int  # files of tries that did not commit, found before finalize (it removes them)
    problems: list[str] = dataclasses.field(default_factory=list)  # manifest, content or ledger disagreements

    @property
    def exactly_once(self) -> bool:
        return not (self.lost or self.duplicated or self.problems)


def output_files(plan_uri: str, storage_options: dict[str, Any]) -> set[str]:
    """This attempt's output and quarantine files as they are now (before finalize prunes them)."""
    ledger = Ledger.open(plan_uri, storage_options)
    output = AtomicStore(ledger.plan.spec.output_uri, storage_options)
    return _attempt_files(output, ledger.plan.attempt)


def check_job(plan_uri: str, storage_options: dict[str, Any], expected: Counter[int]) -> Verdict:
    """Finalize the job as its last task would, then verify the manifest, the bytes and rows it lists."""
    ledger = Ledger.open(plan_uri, storage_options)
    plan = ledger.plan
    output = AtomicStore(plan.spec.output_uri, storage_options)
    problems: list[str] = []
    records = {r.shard_id: r for r in ledger.commit_records()}
    named = {r.file for r in records.values()} | {r.quarantine_file for r in records.values() if r.quarantine_file}
    losing = _attempt_files(output, plan.attempt) - named
    finalized = True
    try:
        files = finalize_job(plan_uri, storage_options)["files"]
    except AntBatchError as exc:
        finalized = False
        problems.append(f"finalize refused: {exc}")
        files = [{"path": r.file, "shard": r.shard_id, "rows": r.rows, "sha256": r.sha256} for r in records.values()]
    problems += _manifest_problems(files, records, plan.shard_ids, plan.attempt)
    problems += _rewritten(ledger, output, files)
    got: Counter[int] = Counter()
    for entry in files:
        data = output.read(entry["path"])
        if data is None:
            problems.append(f"listed file {entry['path']} does not exist")
            continue
        problems += _content_problems(entry, records.get(entry["shard"]), data)
        ids = pq.read_table(io.BytesIO(data), columns=[ID_COLUMN]).column(ID_COLUMN).to_pylist()
        if len(ids) != entry["rows"]:
            problems.append(f"{entry['path']} holds {len(ids)} rows, its commit says {entry['rows']}")
        got.update(ids)
    shard_rows = {s.shard_id: s.rows or 0 for s in plan.shards}
    committed = {shard: record.epoch for shard, record in records.items()}
    claims = _claims(ledger)
    wasted = [(shard, epoch) for shard, epoch in claims if committed.get(shard) != epoch]
    listed = {entry["path"] for entry in files}
    orphans = _present(output) - listed - named - {MANIFEST_NAME}
    if finalized and orphans & losing:
        problems.append(f"finalize left {len(orphans & losing)} losing tries' files: {sorted(orphans & losing)[:5]}")
    return Verdict(
        rows=sum(expected.values()),
        lost=sum((expected - got).values()),
        duplicated=sum((got - expected).values()),
        wasted_tries=len(wasted),
        wasted_rows=sum(shard_rows[shard] for shard, _ in wasted),
        backups=sum(_is_backup(ledger, shard, epoch) for shard, epoch in claims if epoch),
        orphans=len(orphans),
        losing_files=len(losing),
        problems=problems,
    )


def _present(output: AtomicStore) -> set[str]:
    """Files at the output root and in its quarantine folder (the state folder aside)."""
    names = set(output.list("", recursive=False))
    return names | {f"{layout.QUARANTINE_DIR}/{n}" for n in output.list(layout.QUARANTINE_DIR)}


def _attempt_files(output: AtomicStore, attempt: int) -> set[str]:
    """Output and quarantine files of ``attempt``'s tries."""
    prefix = layout.attempt_output_prefix(attempt)
    return {n for n in _present(output) if n.rsplit("/", 1)[-1].startswith(prefix)}


def _manifest_problems(
    files: list[dict[str, Any]], records: dict[str, CommitRecord], shard_ids: Sequence[str], attempt: int
) -> list[str]:
    """Each planned shard listed once, at its committed try's file, as its commit record says."""
    problems = []
    listed, planned = Counter(entry["shard"] for entry in files), Counter(shard_ids)
    if listed != planned:
        odd = sorted(((listed - planned) + (planned - listed)).elements())
        problems.append(f"manifest shards differ from the plan (extra or missing): {odd[:5]}")
    for entry in files:
        record = records.get(entry["shard"])
        if record is None:
            problems.append(f"manifest entry {entry} has no commit record")
            continue
        if entry["path"] != layout.output_name(attempt, record.shard_id, record.epoch):
            problems.append(
                f"manifest lists {entry['path']} for shard {entry['shard']}: not the file of its committed "
                f"try {record.epoch}"
            )
        if (record.file, record.rows, record.sha256) != (entry["path"], entry["rows"], entry.get("sha256")):
            problems.append(f"manifest entry {entry} does not match the commit record {record}")
    return problems


def _content_problems(entry: dict[str, Any], record: CommitRecord | None, data: bytes) -> list[str]:
    """The listed file's bytes are the ones its try committed: nothing rewrote it since."""
    digest = hashlib.sha256(data).hexdigest()
    if record is None or record.sha256 is None:
        return [f"{entry['path']}: its commit record carries no sha256"]
    if digest != record.sha256:
        return [f"{entry['path']} changed after its commit: sha256 {digest[:12]}, committed {record.sha256[:12]}"]
    if entry.get("sha256") != digest:
        return [f"{entry['path']}: the manifest says sha256 {str(entry.get('sha256'))[:12]}, the file is {digest[:12]}"]
    return []


def _rewritten(ledger: Ledger, output: AtomicStore, files: list[dict[str, Any]]) -> list[str]:
    """Listed files modified after their shard's commit was created: someone wrote them again
    (same bytes included, which a deterministic model gives every try). One listing each side."""
    written = modified_times(output, "", recursive=False)
    committed = {layout.shard_of_listed(n)[0]: t for n, t in modified_times(ledger.store, layout.COMMITS_DIR).items()}
    problems = []
    for entry in files:
        at, commit_at = written.get(entry["path"]), committed.get(entry["shard"])
        if at is not None and commit_at is not None and at > commit_at:
            problems.append(f"{entry['path']} was written at {at:.3f}, after its commit at {commit_at:.3f}")
    return problems


def modified_times(store: AtomicStore, rel: str, *, recursive: bool = True) -> dict[str, float]:
    """Modification times of the files below ``rel`` (mtime on local files, LastModified on S3)."""
    base = store.path(rel)
    store.fs.invalidate_cache(base)
    try:
        found = store.fs.find(base, detail=True) if recursive else store.fs.ls(base, detail=True)
    except FileNotFoundError:
        return {}
    infos = found if isinstance(found, dict) else {info["name"]: info for info in found}
    prefix = base.rstrip("/") + "/"
    out = {}
    for name, info in infos.items():
        when = info.get("mtime") or info.get("LastModified")
        if info.get("type", "file") != "file" or not name.startswith(prefix) or when is None:
            continue
        out[name[len(prefix) :]] = when.timestamp() if isinstance(when, dt.datetime) else float(when)
    return out


def _is_backup(ledger: Ledger, shard_id: str, epoch: int) -> bool:
    """Whether a try was started as a backup of the one before (its claim says so)."""
    data = ledger.store.read(layout.claim_key(shard_id, epoch))
    return data is not None and bool(json.loads(data).get("backup"))


def _claims(ledger: Ledger) -> list[tuple[str, int]]:
    """Every try the ledger shows: (shard, epoch) for each claim record."""
    out = []
    for name in ledger.store.list(layout.CLAIMS_DIR):
        shard, epoch = layout.shard_of_listed(name)
        if epoch is not None:
            out.append((shard, epoch))
    return out
