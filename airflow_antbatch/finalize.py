"""Finalize: once every shard is committed, write the ``_SUCCESS`` manifest of the output.

The manifest lists every output file with its shard and row count, so that downstream readers
take exactly the committed files and nothing a zombie or an older attempt left behind.
"""

from __future__ import annotations

import datetime as dt
import json
from typing import Any

from airflow_antbatch.errors import JobIncompleteError, StoreError
from airflow_antbatch.ledger import Ledger
from airflow_antbatch.store import AtomicStore

MANIFEST_NAME = "_SUCCESS"
MANIFEST_FORMAT = "airflow-antbatch/manifest"


def finalize_job(plan_uri: str, storage_options: dict[str, Any] | None = None) -> dict[str, Any]:
    """Check that the job is complete and write (or rewrite, identically) its manifest."""
    ledger = Ledger.open(plan_uri, storage_options)
    plan = ledger.plan
    records = {r.shard_id: r for r in ledger.commit_records()}
    missing = [s for s in plan.shard_ids if s not in records]
    if missing:
        status = ledger.status()
        sample = "; ".join(f"{s}: {e}" for s, e in status.failures[:3])
        raise JobIncompleteError(
            f"cannot finalize {plan_uri}: {len(missing)} of {len(plan.shards)} shards are not committed "
            f"({status.failed} failed for good, {status.leased} leased, {status.pending} pending)"
            + (f"; failures: {sample}" if sample else "")
        )
    output = AtomicStore(plan.spec.output_uri, dict(plan.spec.storage_options))
    present = set(output.list("", recursive=False))
    files: list[dict[str, Any]] = []
    for shard_id in plan.shard_ids:
        record = records[shard_id]
        if record.file not in present:
            raise StoreError(f"shard {shard_id} is committed but its output {output.uri(record.file)} is missing")
        files.append({"path": record.file, "uri": output.uri(record.file), "shard": shard_id, "rows": record.rows})
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
    previous = read_manifest(plan.spec.output_uri, storage_options)
    if previous is not None and all(previous.get(k) == v for k, v in manifest.items()):
        return previous  # a rerun of a finished job: nothing to rewrite
    manifest["finalized_at"] = dt.datetime.now(dt.UTC).isoformat(timespec="seconds")
    output.put(MANIFEST_NAME, json.dumps(manifest, indent=1).encode())
    return manifest


def read_manifest(output_uri: str, storage_options: dict[str, Any] | None = None) -> dict[str, Any] | None:
    """The output's manifest, or None if the job has not been finalized."""
    data = AtomicStore(output_uri, storage_options).read(MANIFEST_NAME)
    return None if data is None else dict(json.loads(data))
