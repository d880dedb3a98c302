"""Reruns from the Airflow UI, in local mode, asserted from the ledger (README: "Reruns from the Airflow UI").

A finished night of the example DAG is run once per module; each test then does what a user
does in the UI: clear a task (with its downstream tasks, the UI's default) or the whole run,
after which the scheduler runs the cleared tasks again in the same DAG run. Here that loop is
Airflow's own ``dag.test()`` loop over the existing run (``dag.test()`` itself would delete the
run and start a new one). ``force_rerun`` is a DAG param given when the run is triggered.
"""

from __future__ import annotations

import collections
import dataclasses
import datetime as dt
import json
import time
from typing import TYPE_CHECKING, Any

import pytest

from airflow_antbatch import layout
from airflow_antbatch.finalize import read_manifest
from airflow_antbatch.ledger import Ledger
from airflow_antbatch.planning import resolve_plan_uri
from tests.airflow.test_dag_e2e import _load_dag, _states, _worker_summaries
from tests.conftest import committed_ids, write_transactions

if TYPE_CHECKING:
    import pathlib
    from collections.abc import Iterator

pytestmark = [pytest.mark.airflow, pytest.mark.slow]
GROUP = "score_transactions"
NIGHT = dt.datetime(2026, 11, 25, tzinfo=dt.UTC)
FORCED_NIGHT = dt.datetime(2026, 11, 26, tzinfo=dt.UTC)


@dataclasses.dataclass(frozen=True)
class Night:
    dag: Any
    run_id: str
    output: str
    ids: list[int]
    plan_uri: str


def _run_night(root: pathlib.Path, logical_date: dt.datetime) -> Night:
    """2 shards of 2,000 rows (the example's max_shard_rows), so 2 mapped workers."""
    ds = f"ds={logical_date:%Y-%m-%d}"
    table = write_transactions(root / "transactions" / ds, files=1, rows_per_file=4000, row_group_size=1000)
    dag = _load_dag("nightly_batch_inference.py", "nightly_batch_inference")
    run = dag.test(logical_date=logical_date)
    assert run.state == "success", _states(run)
    output = str(root / "predictions" / ds)
    ids = table.column("txn_id").to_pylist()
    assert collections.Counter(committed_ids(output)) == collections.Counter(ids)
    return Night(dag, run.run_id, output, ids, resolve_plan_uri(output))


@pytest.fixture(scope="module")
def data_root(tmp_path_factory: pytest.TempPathFactory) -> Iterator[pathlib.Path]:
    root = tmp_path_factory.mktemp("nights")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("ANTBATCH_DATA_ROOT", str(root))
        mp.setenv("OMP_NUM_THREADS", "1")
        yield root


@pytest.fixture(scope="module")
def night(airflow_db: pathlib.Path, data_root: pathlib.Path) -> Night:
    return _run_night(data_root, NIGHT)


def _clear_and_resume(dag: Any, run_id: str, task_id: str | None = None) -> Any:
    """The UI's Clear on ``task_id`` and its downstream tasks (None: the whole run), then the
    scheduling loop of ``dag.test()`` over the same run until it finishes."""
    from airflow import settings
    from airflow.models.dagrun import DagRun
    from airflow.sdk.definitions.dag import _run_task
    from airflow.serialization.serialized_objects import DagSerialization
    from airflow.utils.state import DagRunState, TaskInstanceState
    from sqlalchemy import select

    scheduler_dag = DagSerialization.deserialize_dag(DagSerialization.serialize_dag(dag))
    task_ids = None
    if task_id is not None:
        subset = scheduler_dag.partial_subset(task_ids=[task_id], include_downstream=True, include_upstream=False)
        task_ids = list(subset.task_dict)
    assert scheduler_dag.clear(task_ids=task_ids, run_id=run_id) > 0
    session = settings.Session()
    run = session.scalar(select(DagRun).where(DagRun.dag_id == dag.dag_id, DagRun.run_id == run_id))
    run.dag = scheduler_dag
    run.state = DagRunState.RUNNING
    session.commit()
    deadline = time.monotonic() + 240
    while run.state == DagRunState.RUNNING:
        assert time.monotonic() < deadline, _states(run)
        session.expire_all()
        schedulable, _ = run.update_state(session=session)
        for ti in schedulable:
            ti.try_number += 1
            ti.state = TaskInstanceState.SCHEDULED
        session.commit()
        for ti in run.get_task_instances(session=session):
            if ti.state == TaskInstanceState.SCHEDULED:
                _run_task(ti=ti, task=dag.task_dict[ti.task_id], run_triggerer=True)
    return run


def _ledger_bytes(plan_uri: str) -> dict[str, bytes | None]:
    """The plan, every claim, release and commit of the attempt and ``done.json``, with their bytes.

    Heartbeats and idle markers are left out: every worker process that starts writes its own.
    """
    store = Ledger.open(plan_uri).store
    per_process = (f"{layout.WORKERS_DIR}/", f"{layout.IDLE_DIR}/")
    return {name: store.read(name) for name in store.list("") if not name.startswith(per_process)}


def _skipped_everything(run: Any, shards: int) -> bool:
    summaries = _worker_summaries(run)
    return bool(summaries) and all(
        s["shards_committed"] == 0 and s["shards_skipped"] == shards for s in summaries.values()
    )


def test_clearing_a_worker_task_reruns_workers_that_skip_committed_shards(night: Night) -> None:
    before, manifest = _ledger_bytes(night.plan_uri), read_manifest(night.output)
    run = _clear_and_resume(night.dag, night.run_id, f"{GROUP}.worker")
    assert run.state == "success", _states(run)
    assert _skipped_everything(run, shards=2)
    assert _ledger_bytes(night.plan_uri) == before  # no claim, release or commit written again
    assert read_manifest(night.output) == manifest


def test_clearing_the_plan_task_reuses_the_same_plan_when_the_input_is_unchanged(night: Night) -> None:
    before = _ledger_bytes(night.plan_uri)
    run = _clear_and_resume(night.dag, night.run_id, f"{GROUP}.plan")
    assert run.state == "success", _states(run)
    plan_ti = run.get_task_instance(f"{GROUP}.plan")
    assert plan_ti.try_number == 2  # it did run again
    assert plan_ti.xcom_pull(task_ids=f"{GROUP}.plan", key="plan_uri") == night.plan_uri
    assert _ledger_bytes(night.plan_uri) == before  # the plan byte-identical, nothing claimed again
    assert resolve_plan_uri(night.output) == night.plan_uri  # no new attempt
    assert _skipped_everything(run, shards=2)


def test_clearing_the_whole_run_of_a_finished_night_is_a_fast_no_op(night: Night) -> None:
    before, manifest = _ledger_bytes(night.plan_uri), read_manifest(night.output)
    started = time.monotonic()
    run = _clear_and_resume(night.dag, night.run_id)
    elapsed = time.monotonic() - started
    assert run.state == "success", _states(run)
    assert _ledger_bytes(night.plan_uri) == before
    assert read_manifest(night.output) == manifest  # not rewritten: same finalized_at
    assert _skipped_everything(run, shards=2)
    sensor = run.get_task_instance(f"{GROUP}.wait_for_shards")
    assert sensor.next_method is None  # its first check settled it: no deferral
    # Generous: two worker processes start, read done.json and exit (about 5 s each here).
    assert elapsed < 120, elapsed


def test_finalize_emits_the_output_root_as_an_asset_with_the_night_in_the_event(night: Night) -> None:
    from airflow import settings
    from airflow.models.asset import AssetEvent, AssetModel
    from sqlalchemy import select

    session = settings.Session()
    root = night.output.rsplit("/", 1)[0]
    asset = session.scalar(select(AssetModel).where(AssetModel.uri == f"file://{root}"))
    assert asset is not None
    events = session.scalars(
        select(AssetEvent).where(AssetEvent.asset_id == asset.id, AssetEvent.source_run_id == night.run_id)
    ).all()
    assert events and all(e.source_task_id == f"{GROUP}.finalize" for e in events)
    manifest = read_manifest(night.output)
    assert manifest is not None
    assert events[-1].extra["output_uri"] == night.output
    assert events[-1].extra["manifest_uri"] == f"{night.output}/_SUCCESS"
    assert events[-1].extra["rows"] == len(night.ids)
    assert events[-1].extra["finalized_at"] == manifest["finalized_at"]


def test_force_rerun_recomputes_everything_in_a_new_attempt_and_replaces_the_output_at_finalize(
    airflow_db: pathlib.Path, data_root: pathlib.Path
) -> None:
    night = _run_night(data_root, FORCED_NIGHT)
    manifest_bytes = (data_root / night.output / "_SUCCESS").read_bytes()
    old = json.loads(manifest_bytes)
    assert old["attempt"] == 0

    # Triggered again with force_rerun; finalize is held back (marked success without running),
    # to look at the output between the workers and finalize.
    run = night.dag.test(logical_date=FORCED_NIGHT, run_conf={"force_rerun": True}, mark_success_pattern=".*finalize")
    assert run.state == "success", _states(run)
    plan_uri = resolve_plan_uri(night.output)
    assert plan_uri != night.plan_uri and "/attempt-001/" in plan_uri
    summaries = _worker_summaries(run)
    # Everything recomputed: every row scored again and committed in the new attempt.
    assert sum(s["shards_committed"] for s in summaries.values()) == 2
    assert sum(s["rows_committed"] for s in summaries.values()) == len(night.ids)
    assert Ledger.open(plan_uri).status().committed == 2
    # Readers still see the old attempt, whole: the manifest is untouched, its files all there.
    assert (data_root / night.output / "_SUCCESS").read_bytes() == manifest_bytes
    assert collections.Counter(committed_ids(night.output)) == collections.Counter(night.ids)

    run = _clear_and_resume(night.dag, run.run_id, f"{GROUP}.finalize")
    assert run.state == "success", _states(run)
    new = read_manifest(night.output)
    assert new is not None and new["attempt"] == 1 and new["plan"] == plan_uri
    assert all(f["path"].startswith("part-001-") for f in new["files"])
    assert collections.Counter(committed_ids(night.output)) == collections.Counter(night.ids)
