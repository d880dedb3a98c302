"""A new user's JSONL DAG through ``dag.test()``: 5,323 rows in 7 files, ``max_shard_rows=700``
and ``max_workers=3`` make 8 shards of about 700 rows and 3 mapped workers (issue 15, point 6;
it used to be one shard and one worker)."""

from __future__ import annotations

import collections
import json
from typing import TYPE_CHECKING

import pytest

from airflow_antbatch.examples.tabular import generate_transactions
from airflow_antbatch.finalize import read_manifest
from airflow_antbatch.ledger import Ledger
from airflow_antbatch.planning import resolve_plan_uri
from tests.airflow.test_dag_e2e import _load_dag, _states, _worker_summaries
from tests.conftest import committed_ids

if TYPE_CHECKING:
    import pathlib

pytestmark = [pytest.mark.airflow, pytest.mark.slow]
FILE_ROWS = (1203, 412, 988, 640, 1101, 279, 700)  # 5,323 rows in 7 files, as the user had


def test_a_jsonl_dag_follows_max_shard_rows_and_fans_out_to_max_workers(
    airflow_db: pathlib.Path,
    tmp_path: pathlib.Path,
    monkeypatch: pytest.MonkeyPatch,
    subprocess_env: dict[str, str],
) -> None:
    rows = generate_transactions(sum(FILE_ROWS)).to_pylist()
    (tmp_path / "in").mkdir()
    start = 0
    for i, count in enumerate(FILE_ROWS):
        lines = (json.dumps(row) + "\n" for row in rows[start : start + count])
        (tmp_path / "in" / f"events-{i}.jsonl").write_text("".join(lines))
        start += count
    monkeypatch.setenv("ANTBATCH_TEST_DATA_ROOT", str(tmp_path))
    dag = _load_dag("antbatch_jsonl_dags.py", "antbatch_jsonl_user_case")

    run = dag.test()
    assert run.state == "success", _states(run)
    output = str(tmp_path / "out")
    assert collections.Counter(committed_ids(output)) == collections.Counter(range(5323))  # each row once
    shards = len(Ledger.open(resolve_plan_uri(output)).plan.shards)
    assert shards == 8  # ceil(5,323 / 700): shards span file boundaries
    manifest = read_manifest(output)
    assert manifest is not None
    assert all(200 <= entry["rows"] <= 770 for entry in manifest["files"]), manifest["files"]
    # The plan fans out to max_workers mapped workers. dag.test() runs mapped tasks one after
    # another, so the first takes every shard here; under a scheduler they run side by side.
    summaries = _worker_summaries(run)
    assert sorted(summaries) == ["worker-0", "worker-1", "worker-2"]
    assert sum(s["shards_committed"] for s in summaries.values()) == shards
