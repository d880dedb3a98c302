"""The checker: what the ledger and the output files say after a run, never the exit codes.

Exactly-once is judged on what a downstream reader sees: the files that finalize's manifest
lists. Their ids, as a multiset, must equal the input's; the manifest must agree with the
commit records, and list only the shards' fixed output names, each present. Wasted work is
every try the ledger shows (a claim) that did not commit, counted in its shard's rows.
"""

from __future__ import annotations

import dataclasses
import io
from collections import Counter
from collections.abc import Callable
from typing import Any

import pyarrow.parquet as pq

from airflow_antbatch.errors import AntBatchError
from airflow_antbatch.finalize import MANIFEST_NAME, finalize_job
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
    orphans: int  # files in the output folder that the manifest does not list (a reader skips them)
    problems: list[str] = dataclasses.field(default_factory=list)  # manifest or ledger disagreements

    @property
    def exactly_once(self) -> bool:
        return not (self.lost or self.duplicated or self.problems)


def check_job(plan_uri: str, storage_options: dict[str, Any], expected: Counter[int]) -> Verdict:
    """Finalize the job as its last task would, then verify the manifest and the rows it lists."""
    ledger = Ledger.open(plan_uri, storage_options)
    plan = ledger.plan
    output = AtomicStore(plan.spec.output_uri, storage_options)
    problems: list[str] = []
    records = {r.shard_id: r for r in ledger.commit_records()}
    try:
        files = finalize_job(plan_uri, storage_options)["files"]
    except AntBatchError as exc:
        problems.append(f"finalize refused: {exc}")
        files = [{"path": r.file, "shard": r.shard_id, "rows": r.rows} for r in records.values()]
    problems += _manifest_problems(files, records, plan.shard_ids, plan.output_name)
    got: Counter[int] = Counter()
    for entry in files:
        data = output.read(entry["path"])
        if data is None:
            problems.append(f"listed file {entry['path']} does not exist")
            continue
        ids = pq.read_table(io.BytesIO(data), columns=[ID_COLUMN]).column(ID_COLUMN).to_pylist()
        if len(ids) != entry["rows"]:
            problems.append(f"{entry['path']} holds {len(ids)} rows, its commit says {entry['rows']}")
        got.update(ids)
    shard_rows = {s.shard_id: s.rows or 0 for s in plan.shards}
    committed = {shard: record.epoch for shard, record in records.items()}
    wasted = [(shard, epoch) for shard, epoch in _claims(ledger) if committed.get(shard) != epoch]
    listed = {entry["path"] for entry in files}
    present = {name.rsplit("/", 1)[-1] for name in output.fs.ls(output.root, detail=False)}
    return Verdict(
        rows=sum(expected.values()),
        lost=sum((expected - got).values()),
        duplicated=sum((got - expected).values()),
        wasted_tries=len(wasted),
        wasted_rows=sum(shard_rows[shard] for shard, _ in wasted),
        orphans=len(present - listed - {MANIFEST_NAME, "_antbatch"}),
        problems=problems,
    )


def _manifest_problems(
    files: list[dict[str, Any]],
    records: dict[str, CommitRecord],
    shard_ids: tuple[str, ...],
    output_name: Callable[[str], str],
) -> list[str]:
    """Each planned shard listed once, at its fixed output name, as its commit record says."""
    problems = []
    listed, planned = Counter(entry["shard"] for entry in files), Counter(shard_ids)
    if listed != planned:
        odd = sorted(((listed - planned) + (planned - listed)).elements())
        problems.append(f"manifest shards differ from the plan (extra or missing): {odd[:5]}")
    for entry in files:
        record = records.get(entry["shard"])
        if entry["path"] != output_name(entry["shard"]) or entry["path"].startswith("."):
            problems.append(f"manifest lists {entry['path']} for shard {entry['shard']}: not its fixed output name")
        if record is None or (record.file, record.rows) != (entry["path"], entry["rows"]):
            problems.append(f"manifest entry {entry} does not match the commit record {record}")
    return problems


def _claims(ledger: Ledger) -> list[tuple[str, int]]:
    """Every try the ledger shows: (shard, epoch) for each ``claims/<shard>/<epoch>.json``."""
    out = []
    for name in ledger.store.list("claims"):
        shard, _, epoch = name.removesuffix(".json").partition("/")
        out.append((shard, int(epoch)))
    return out
