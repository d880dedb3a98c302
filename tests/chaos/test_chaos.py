"""The quick chaos set for ``make test``: a few seeded schedules on local files and on SeaweedFS.

``make chaos`` runs many more (tests/chaos/run.py). Each schedule runs real ``antbatch worker``
processes under its faults and is judged by the checker from the ledger and the output files.
The store outage needs a SeaweedFS of its own that can be restarted (~20 s more), so it runs in
``make chaos`` only.
"""

from __future__ import annotations

import dataclasses
import hashlib
import io
import json
import pathlib
import time
from collections import Counter

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from airflow_antbatch import layout
from airflow_antbatch.ledger import CommitRecord, Ledger
from airflow_antbatch.planning import plan_job
from airflow_antbatch.spec import JobSpec
from airflow_antbatch.store import AtomicStore
from airflow_antbatch.worker.run import run_worker
from tests.chaos.check import _content_problems, check_job
from tests.chaos.harness import RunResult, run_schedule
from tests.chaos.schedule import (
    DIE_BEFORE_COMMIT,
    LOCAL_KINDS,
    SIGSTOP,
    STORE_KINDS,
    STORE_OUTAGE,
    make_schedule,
    zombie_schedule,
)
from tests.conftest import TABULAR, write_transactions
from tests.s3_servers import StoreLocation

# With small=True these two schedules hold every local fault kind between them: seed 4 dies
# between an output put and its commit, is stopped past the lease TTL and SIGTERMed (its workers
# drain for 2 s first: NOTE [drain]); seed 33 loses a preprocess child, is SIGKILLed and stopped
# past the TTL.
QUICK_LOCAL_SEEDS = [4, 33]
QUICK_SEAWEEDFS_SEED = 4  # a kill between the output PUT and the commit, on S3


def _assert_exactly_once(result: RunResult) -> None:
    verdict = result.verdict
    record = json.dumps(result.to_dict(), indent=1)
    assert not result.missed, record
    assert (verdict.lost, verdict.duplicated, verdict.problems) == (0, 0, []), record
    assert verdict.wasted_tries <= result.wasted_bound_tries, record


@pytest.mark.slow
@pytest.mark.parametrize("seed", QUICK_LOCAL_SEEDS)
def test_local_schedule_commits_every_row_exactly_once(
    seed: int, tmp_path: pathlib.Path, subprocess_env: dict[str, str]
) -> None:
    schedule = make_schedule(seed, "local", small=True)
    result = run_schedule(schedule, StoreLocation("local", str(tmp_path / "store"), {}), tmp_path, env=subprocess_env)
    _assert_exactly_once(result)
    assert SIGSTOP in {f.kind for f in schedule.faults}


@pytest.mark.slow
def test_a_woken_zombie_writes_its_own_file_and_never_the_committed_one(
    tmp_path: pathlib.Path, subprocess_env: dict[str, str]
) -> None:
    """Stopped past its lease, the zombie goes on with the tries others took over: each writes the
    zombie's own try's file, which no commit names, or is dropped unwritten once the zombie sees
    the other try's commit (NOTE [races] in worker/loop.py); the committed files keep the bytes
    and the time of their commit (the checker), and finalize removes the zombie's."""
    location = StoreLocation("local", str(tmp_path / "store"), {})
    result = run_schedule(zombie_schedule(), location, tmp_path, env=subprocess_env)
    _assert_exactly_once(result)
    record = json.dumps(result.to_dict(), indent=1)
    overtaken = [z for z in result.zombie_tries if z.committed_file is not None and not z.released]
    assert overtaken, record
    assert all(z.file != z.committed_file for z in overtaken), record
    written = [z for z in overtaken if z.written]
    assert result.verdict.losing_files >= len(written) and result.verdict.orphans == 0, record
    [stop] = result.injected
    assert f"woken zombie: {len(overtaken)} tries overtaken, {len(written)} wrote their own file" in stop.detail
    assert stop.detail.endswith("committed files untouched"), stop.detail


def test_the_quick_local_schedules_hold_every_local_fault_kind() -> None:
    kinds = {f.kind for seed in QUICK_LOCAL_SEEDS for f in make_schedule(seed, "local", small=True).faults}
    assert kinds == set(LOCAL_KINDS)


@pytest.mark.slow
def test_seaweedfs_schedule_commits_every_row_exactly_once(
    seaweedfs_location: StoreLocation, tmp_path: pathlib.Path, subprocess_env: dict[str, str]
) -> None:
    schedule = make_schedule(QUICK_SEAWEEDFS_SEED, "seaweedfs", small=True)
    assert STORE_OUTAGE not in {f.kind for f in schedule.faults}  # the session's server cannot restart
    result = run_schedule(schedule, seaweedfs_location, tmp_path, env=subprocess_env)
    _assert_exactly_once(result)
    died = next(i for i in result.injected if i.kind == DIE_BEFORE_COMMIT)
    assert "output durable: True" in died.detail


def test_schedules_are_reproducible_and_every_kind_recurs() -> None:
    assert make_schedule(7, "seaweedfs") == make_schedule(7, "seaweedfs")
    for store, kinds in STORE_KINDS.items():
        seen = {f.kind for seed in range(len(kinds)) for f in make_schedule(seed, store).faults}
        assert seen == set(kinds), store
    assert STORE_OUTAGE not in LOCAL_KINDS


def test_checker_finds_lost_duplicated_wasted_and_rewritten(tmp_path: pathlib.Path) -> None:
    """The checker is only worth its silence if it speaks up: tamper with a finished job."""
    table = write_transactions(tmp_path / "in", files=1, rows_per_file=40, row_group_size=10)
    spec = JobSpec(
        input_uri=str(tmp_path / "in"),
        output_uri=str(tmp_path / "out"),
        model=f"{TABULAR}:build_model",
        preprocess=f"{TABULAR}:preprocess",
        id_column="txn_id",
        max_shard_rows=10,
    )
    plan_uri = plan_job(spec).plan_uri
    run_worker(plan_uri, "w0", preprocess_workers=0, torch_threads=1)
    expected = Counter(table.column("txn_id").to_pylist())
    clean = check_job(plan_uri, {}, expected)
    assert dataclasses.astuple(clean) == (40, 0, 0, 0, 0, 0, 0, 0, [])

    # One more input row than was committed: lost.
    assert check_job(plan_uri, {}, expected + Counter({10**9: 1})).lost == 1
    # A try that never committed (a backup that lost its race): wasted, counted in its shard's
    # rows and as a backup; the file it wrote is a losing try's, which finalize removes.
    ledger = Ledger.open(plan_uri)
    shard = ledger.plan.shard_ids[0]
    output = AtomicStore(spec.output_uri)
    [record] = [r for r in ledger.commit_records() if r.shard_id == shard]
    assert ledger.store.create(layout.claim_key(shard, 1), b'{"backup": true}')
    loser = layout.output_name(ledger.plan.attempt, shard, 1)
    output.put(loser, output.read(record.file) or b"")
    # Finalized before the loser was written: finalizing again removes it all the same.
    wasted = check_job(plan_uri, {}, expected)
    assert (wasted.wasted_tries, wasted.wasted_rows, wasted.losing_files, wasted.orphans) == (1, 10, 1, 0)
    assert wasted.backups == 1
    assert wasted.exactly_once and output.read(loser) is None
    # The committed file written again with the same bytes (a zombie would write the same rows):
    # the content matches, but it was written after its commit.
    time.sleep(0.01)
    output.put(record.file, output.read(record.file) or b"")
    assert [p for p in check_job(plan_uri, {}, expected).problems if "after its commit" in p]
    # Rewritten with its rows twice: duplicated, and its bytes and rows disagree with its commit.
    rows = pq.read_table(io.BytesIO(output.read(record.file) or b""))
    buffer = io.BytesIO()
    pq.write_table(pa.concat_tables([rows, rows]), buffer)
    output.put(record.file, buffer.getvalue())
    doubled = check_job(plan_uri, {}, expected)
    assert doubled.duplicated == 10
    assert f"{record.file} holds 20 rows, its commit says 10" in doubled.problems
    assert any(p.startswith(f"{record.file} changed after its commit: sha256") for p in doubled.problems)
    # A committed file gone: finalize refuses, and its rows are lost.
    output.delete(record.file)
    gone = check_job(plan_uri, {}, expected)
    assert gone.lost == 10
    assert any("finalize refused" in p and "is missing" in p for p in gone.problems), gone.problems


def test_checker_compares_the_manifest_hash_with_the_bytes() -> None:
    data = b"committed bytes"
    digest = hashlib.sha256(data).hexdigest()
    record = CommitRecord("s0", 0, "w0--x", "part-000-s0-e000.parquet", 1, sha256=digest)
    entry = {"path": record.file, "shard": "s0", "rows": 1, "sha256": digest}
    assert _content_problems(entry, record, data) == []
    assert _content_problems({**entry, "sha256": "0" * 64}, record, data) == [
        f"{record.file}: the manifest says sha256 000000000000, the file is {digest[:12]}"
    ]
    assert _content_problems(entry, dataclasses.replace(record, sha256=None), data) == [
        f"{record.file}: its commit record carries no sha256"
    ]
