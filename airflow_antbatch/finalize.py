"""Finalize: once every shard is committed, write the ``_SUCCESS`` manifest of the output.

The manifest lists every output file with its shard, row count and content hash, so that
downstream readers take exactly the committed files and nothing a zombie or an older attempt
left behind. Once it is written, the files of this attempt's losing tries (a zombie's, a try
that died between its write and its commit) are removed: no commit names them.
"""

from __future__ import annotations

import datetime as dt
import json
import logging
from typing import Any

from airflow_antbatch import layout
from airflow_antbatch.errors import JobIncompleteError, StoreError
from airflow_antbatch.failure_report import failure_sample, shard_failures
from airflow_antbatch.layout import MANIFEST_NAME
from airflow_antbatch.ledger import CommitRecord, Ledger
from airflow_antbatch.store import AtomicStore

log = logging.getLogger(__name__)

MANIFEST_FORMAT = "airflow-antbatch/manifest"


def finalize_job(plan_uri: str, storage_options: dict[str, Any] | None = None) -> dict[str, Any]:
    """Check that the job is complete and write (or rewrite, identically) its manifest.

    ``storage_options`` reach the ledger, and go over the spec's for the output (an Airflow
    connection's credentials, which the spec never holds).
    """
    ledger = Ledger.open(plan_uri, storage_options)
    plan = ledger.plan
    records = {r.shard_id: r for r in ledger.commit_records()}
    missing = [s for s in plan.shard_ids if s not in records]
    if missing:
        status = ledger.status()
        sample = failure_sample(shard_failures(status, max_attempts=plan.spec.max_shard_attempts))
        raise JobIncompleteError(
            f"cannot finalize {plan_uri}: {len(missing)} of {len(plan.shards)} shards are not committed "
            f"({status.failed} failed for good, {status.leased} leased, {status.pending} pending)"
            + (f"; failures: {sample}" if sample else "")
        )
    options = {**plan.spec.storage_options, **(storage_options or {})}
    output = AtomicStore(plan.spec.output_uri, options)
    present = set(output.list("", recursive=False))
    files: list[dict[str, Any]] = []
    for shard_id in plan.shard_ids:
        record = records[shard_id]
        if record.file not in present:
            raise StoreError(f"shard {shard_id} is committed but its output {output.uri(record.file)} is missing")
        files.append(
            {
                "path": record.file,
                "uri": output.uri(record.file),
                "shard": shard_id,
                "rows": record.rows,
                "sha256": record.sha256,
            }
        )
    manifest: dict[str, Any] = {
        "format": MANIFEST_FORMAT,
        "plan": plan_uri,
        "output": output.url,
        "attempt": plan.attempt,
        "shards": len(files),
        "rows": sum(records[s].rows for s in plan.shard_ids),
        "files": files,
        "quarantined_rows": sum(records[s].quarantined for s in plan.shard_ids),
        "quarantine_files": [
            output.uri(records[s].quarantine_file or "") for s in plan.shard_ids if records[s].quarantine_file
        ],
    }
    previous = read_manifest(plan.spec.output_uri, options)
    if previous is None or any(previous.get(k) != v for k, v in manifest.items()):
        manifest["finalized_at"] = dt.datetime.now(dt.UTC).isoformat(timespec="seconds")
        output.put(MANIFEST_NAME, json.dumps(manifest, indent=1).encode())
        previous = manifest
    # Also on a rerun of a finished job: a zombie may have written its try's file since.
    remove_losing_tries(output, plan.attempt, list(records.values()), present)
    return previous


def remove_losing_tries(output: AtomicStore, attempt: int, records: list[CommitRecord], present: set[str]) -> None:
    """Delete this attempt's output and quarantine files that no commit names."""
    kept = {r.file for r in records} | {r.quarantine_file for r in records if r.quarantine_file}
    prefix = layout.attempt_output_prefix(attempt)
    quarantined = {f"{layout.QUARANTINE_DIR}/{name}" for name in output.list(layout.QUARANTINE_DIR)}
    losers = sorted(
        name for name in present | quarantined if name.rsplit("/", 1)[-1].startswith(prefix) and name not in kept
    )
    for name in losers:
        output.delete(name)
    if losers:
        log.info("removed %d output files of losing tries: %s", len(losers), ", ".join(losers[:5]))


def read_manifest(output_uri: str, storage_options: dict[str, Any] | None = None) -> dict[str, Any] | None:
    """The output's manifest, or None if the job has not been finalized."""
    data = AtomicStore(output_uri, storage_options).read(MANIFEST_NAME)
    return None if data is None else dict(json.loads(data))
