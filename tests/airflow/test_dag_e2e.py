"""DAGs end to end through ``dag.test()`` on SQLite, with real worker subprocesses.

- the example DAG scores every row exactly once, and a second run of the same logical date
  processes no shard again (judged from the ledger and the worker summaries, not from timing);
- a worker process SIGKILLed mid-shard fails its task, another worker takes the shard over,
  and the run succeeds because every shard is committed;
- shards that fail for good fail the worker task for good and make the sensor fail fast.
"""

from __future__ import annotations

import collections
import datetime as dt
import importlib.util
from typing import TYPE_CHECKING, Any

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from airflow_antbatch import layout
from airflow_antbatch.finalize import read_manifest
from airflow_antbatch.ledger import Ledger
from airflow_antbatch.planning import resolve_plan_uri
from tests.airflow.conftest import DAGS_FOLDER
from tests.conftest import committed_ids, write_transactions

if TYPE_CHECKING:
    import pathlib

pytestmark = [pytest.mark.airflow, pytest.mark.slow]
LOGICAL_DATE = dt.datetime(2026, 11, 25, tzinfo=dt.UTC)
DS = "ds=2026-11-25"


def _load_dag(file_name: str, dag_id: str) -> Any:
    """Import a DAG file from the test DAGs folder afresh (it reads its data root at import)."""
    spec = importlib.util.spec_from_file_location(f"under_test_{dag_id}", DAGS_FOLDER / file_name)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return getattr(module, dag_id)()


def _states(dag_run: Any) -> dict[tuple[str, int], str | None]:
    return {(ti.task_id.rsplit(".", 1)[-1], ti.map_index): ti.state for ti in dag_run.get_task_instances()}


def _worker_summaries(dag_run: Any) -> dict[str, dict[str, Any]]:
    out = {}
    for ti in dag_run.get_task_instances():
        if ti.task_id.endswith(".worker"):
            out[ti.rendered_map_index] = ti.xcom_pull(task_ids=ti.task_id, map_indexes=ti.map_index)
    return out


def _ledger_files(ledger: Ledger) -> dict[str, bytes | None]:
    """Every claim, release and commit record, with its bytes."""
    kinds = (layout.CLAIMS_DIR, layout.RELEASES_DIR, layout.COMMITS_DIR)
    names = [f"{d}/{n}" for d in kinds for n in ledger.store.list(d)]
    return {name: ledger.store.read(name) for name in names}


def test_example_dag_scores_every_row_once_and_a_rerun_redoes_nothing(
    airflow_db: pathlib.Path,
    tmp_path: pathlib.Path,
    monkeypatch: pytest.MonkeyPatch,
    subprocess_env: dict[str, str],
) -> None:
    table = write_transactions(tmp_path / "transactions" / DS, files=2, rows_per_file=3000, row_group_size=1000)
    monkeypatch.setenv("ANTBATCH_DATA_ROOT", str(tmp_path))
    dag = _load_dag("nightly_batch_inference.py", "nightly_batch_inference")
    output = str(tmp_path / "predictions" / DS)

    first = dag.test(logical_date=LOGICAL_DATE)
    assert first.state == "success", _states(first)
    ids = committed_ids(output)
    assert collections.Counter(ids) == collections.Counter(table.column("txn_id").to_pylist())
    manifest = read_manifest(output)
    assert manifest is not None and manifest["rows"] == table.num_rows
    summaries = _worker_summaries(first)
    assert sorted(summaries) == ["worker-0", "worker-1", "worker-2"]  # 6,000 rows / 2,000 per shard
    assert sum(s["shards_committed"] for s in summaries.values()) == 3

    ledger = Ledger.open(resolve_plan_uri(output))
    before = _ledger_files(ledger)
    assert len(ledger.plan.shards) == 3 and sum(n.startswith(f"{layout.COMMITS_DIR}/") for n in before) == 3

    second = dag.test(logical_date=LOGICAL_DATE)
    assert second.state == "success", _states(second)
    # Judged from the ledger, not from timing: no claim, release or commit was written again,
    # and every worker found every shard already committed.
    assert _ledger_files(ledger) == before
    summaries = _worker_summaries(second)
    assert summaries and all(s["shards_committed"] == 0 and s["shards_skipped"] == 3 for s in summaries.values())
    assert committed_ids(output) == ids
    assert read_manifest(output) == manifest


def test_a_killed_worker_fails_its_task_but_the_run_succeeds_once_every_shard_is_committed(
    airflow_db: pathlib.Path,
    tmp_path: pathlib.Path,
    monkeypatch: pytest.MonkeyPatch,
    subprocess_env: dict[str, str],
) -> None:
    table = write_transactions(tmp_path / "in", files=2, rows_per_file=500, row_group_size=250)
    monkeypatch.setenv("ANTBATCH_TEST_DATA_ROOT", str(tmp_path))
    monkeypatch.setenv("ANTBATCH_TEST_KILL_MARKER", str(tmp_path / "killed"))
    dag = _load_dag("antbatch_test_dags.py", "antbatch_killed_worker")

    run = dag.test()
    states = _states(run)
    assert (tmp_path / "killed").exists()
    assert sorted(str(s) for (task, _), s in states.items() if task == "worker") == ["failed", "success"]
    assert states[("wait_for_shards", -1)] == "success" and states[("finalize", -1)] == "success"
    assert run.state == "success"
    ids = committed_ids(str(tmp_path / "out"))
    assert collections.Counter(ids) == collections.Counter(table.column("txn_id").to_pylist())


def test_shards_failing_for_good_fail_the_worker_for_good_and_the_sensor_fast(
    airflow_db: pathlib.Path,
    tmp_path: pathlib.Path,
    monkeypatch: pytest.MonkeyPatch,
    subprocess_env: dict[str, str],
) -> None:
    write_transactions(tmp_path / "in", files=1, rows_per_file=500, row_group_size=250)
    monkeypatch.setenv("ANTBATCH_TEST_DATA_ROOT", str(tmp_path))
    dag = _load_dag("antbatch_test_dags.py", "antbatch_failing_shards")

    run = dag.test()
    states = _states(run)
    assert run.state == "failed"
    assert states[("worker", 0)] == "failed"
    # The sensor ran despite the failed worker (it did not wait out its timeout) and failed.
    assert states[("wait_for_shards", -1)] == "failed"
    assert states[("finalize", -1)] == "upstream_failed"
    status = Ledger.open(resolve_plan_uri(str(tmp_path / "out"))).status()
    assert status.failed == status.planned == 1


def test_a_chain_of_models_runs_from_the_builder(
    airflow_db: pathlib.Path,
    tmp_path: pathlib.Path,
    monkeypatch: pytest.MonkeyPatch,
    subprocess_env: dict[str, str],
) -> None:
    table = write_transactions(tmp_path / "in", files=2, rows_per_file=500, row_group_size=250)
    monkeypatch.setenv("ANTBATCH_TEST_DATA_ROOT", str(tmp_path))
    dag = _load_dag("antbatch_test_dags.py", "antbatch_chain")

    run = dag.test()
    assert run.state == "success", _states(run)
    manifest = read_manifest(str(tmp_path / "out"))
    assert manifest is not None and manifest["rows"] == table.num_rows
    first = pq.read_table(manifest["files"][0]["uri"])
    assert first.column_names == ["txn_id", "score", "embedding"]
    assert first["embedding"].type == pa.list_(pa.float32(), 8)
    ids = committed_ids(str(tmp_path / "out"))
    assert collections.Counter(ids) == collections.Counter(table.column("txn_id").to_pylist())
    summaries = _worker_summaries(run).values()
    assert {"embed", "classify", "rerank"} <= set(next(iter(summaries))["stages"])
