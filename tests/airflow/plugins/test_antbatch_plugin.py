"""The UI plugin: loaded by Airflow's plugins manager, its endpoints behind Airflow's auth, against a real ledger.

Requests go through the API server's own app (``create_app("core")``), so the plugin is
mounted, and the auth manager and middlewares are in place, exactly as under ``airflow
api-server``.
"""

from __future__ import annotations

import importlib.metadata
import json
import pathlib
import warnings
from typing import TYPE_CHECKING, Any
from urllib.parse import quote

import pytest

from airflow_antbatch.finalize import finalize_job
from airflow_antbatch.layout import POOL_FILE
from tests.airflow.plugins.conftest import token
from tests.airflow.test_dag_e2e import _load_dag
from tests.conftest import REPO_ROOT
from tests.progress_jobs import QUARANTINE_REASON, ROWS_PER_SHARD, SHARDS, RunningJob

if TYPE_CHECKING:
    from fastapi import FastAPI

    from tests.airflow.plugins.conftest import ProgressRun

pytestmark = pytest.mark.airflow

with warnings.catch_warnings():
    # starlette asks for httpx2 when httpx (an Airflow dependency) is what is installed
    warnings.filterwarnings("ignore", "Using `httpx` with `starlette.testclient` is deprecated")
    from fastapi.testclient import TestClient


@pytest.fixture
def client(api_app: FastAPI) -> TestClient:
    return TestClient(api_app, base_url="http://127.0.0.1")


def _run_url(run: ProgressRun, what: str = "job") -> str:
    return f"/antbatch/api/dags/{run.dag_id}/runs/{quote(run.run_id, safe='')}/{what}"


def _get(client: TestClient, url: str, role: str | None = "admin", **params: str) -> Any:
    return client.get(url, params=params, headers={"Authorization": f"Bearer {token(role)}"})


def test_the_plugin_loads_through_airflows_plugins_manager() -> None:
    from airflow import plugins_manager

    plugins, errors = plugins_manager._get_plugins()
    [plugin] = [p for p in plugins if p.name == "antbatch"]
    assert "airflow-antbatch" in str(plugin.source)
    # A second copy of the distribution's metadata (the egg-info an sdist build leaves in the
    # repository root, on sys.path under pytest) is skipped by name; nothing fails to import.
    assert all("already registered" in error for error in errors.values()), errors
    apps, _ = plugins_manager.get_fastapi_plugins()
    assert any(app["url_prefix"] == "/antbatch" for app in apps)
    views, _ = plugins_manager._get_ui_plugins()
    hrefs = {v["destination"]: v["href"] for v in views if v["name"] == "AntBatch progress"}
    assert hrefs == {
        "task_instance": "/antbatch/job?dag_id={DAG_ID}&run_id={RUN_ID}&task_id={TASK_ID}&map_index={MAP_INDEX}",
        "dag_run": "/antbatch/job?dag_id={DAG_ID}&run_id={RUN_ID}",
    }


def test_the_provider_info_names_the_plugin_and_the_link() -> None:
    from airflow.providers_manager import ProvidersManager

    from airflow_antbatch.plugins.links import AntBatchJobLink
    from airflow_antbatch.plugins.plugin import AntBatchPlugin

    manager = ProvidersManager()  # type: ignore[no-untyped-call]
    manager.initialize_providers_plugins()  # what Airflow does with [core] lazy_discover_providers off
    [info] = [p for p in manager.plugins if p.name == "antbatch"]
    assert info.plugin_class == f"{AntBatchPlugin.__module__}.{AntBatchPlugin.__name__}"
    assert f"{AntBatchJobLink.__module__}.{AntBatchJobLink.__name__}" in manager.extra_links_class_names


def test_the_plugins_folder_file_defers_to_the_installed_entry_point(monkeypatch: pytest.MonkeyPatch) -> None:
    from airflow._shared.plugins_manager import _load_plugins_from_plugin_directory

    folder = str(REPO_ROOT / "plugins")
    assert _load_plugins_from_plugin_directory(plugins_folder=folder) == ([], {})  # no duplicate registration
    monkeypatch.setattr(importlib.metadata, "entry_points", lambda **_: [])  # a deployment without the entry point
    plugins, errors = _load_plugins_from_plugin_directory(plugins_folder=folder)
    assert [p.name for p in plugins] == ["antbatch"] and not errors


@pytest.mark.parametrize("path", ["/antbatch/job", "/antbatch/api/job?plan_uri=x", "/antbatch/api/manifest?plan_uri=x"])
def test_anonymous_and_bad_tokens_are_refused(client: TestClient, progress_run: ProgressRun, path: str) -> None:
    for url in (path, _run_url(progress_run), _run_url(progress_run, "manifest")):
        assert client.get(url).status_code == 401
        assert client.get(url, headers={"Authorization": "Bearer not-a-jwt"}).status_code == 403


def test_a_user_without_read_access_is_forbidden(client: TestClient, progress_run: ProgressRun) -> None:
    assert _get(client, _run_url(progress_run), role=None).status_code == 403
    assert _get(client, "/antbatch/api/job", role=None, plan_uri=progress_run.job.plan_uri).status_code == 403


def test_a_runs_job_mid_run(client: TestClient, progress_run: ProgressRun) -> None:
    job = progress_run.job
    job.heartbeat()
    resp = _get(client, _run_url(progress_run), task_id="job.wait_for_shards")
    assert resp.status_code == 200, resp.text
    doc = resp.json()
    assert (doc["dag_id"], doc["run_id"], doc["plan_uri"]) == (progress_run.dag_id, progress_run.run_id, job.plan_uri)
    assert (doc["planned"], doc["committed"], doc["leased"], doc["pending"], doc["failed"]) == (SHARDS, 3, 1, 4, 0)
    assert doc["rows_committed"] == 3 * ROWS_PER_SHARD - 2 and doc["finished"] is False
    [quarantine] = doc["quarantine_files"]
    assert quarantine["rows"] == doc["quarantined_rows"] == 2 and quarantine["reasons"] == {QUARANTINE_REASON: 2}
    [worker] = doc["workers"]
    assert worker["worker_id"] == "worker-0" and worker["stale"] is False and doc["stale_workers"] == []
    assert worker["current_shard"] == job.ledger.plan.shards[3].shard_id
    assert doc["timeline"] and doc["manifest_uri"].endswith("/out/_SUCCESS")
    # the same job by plan URI, and by the output URI it resolves from
    by_uri = _get(client, "/antbatch/api/job", plan_uri=str(pathlib.Path(job.plan_uri).parent.parent.parent)).json()
    assert by_uri["plan_uri"] == job.plan_uri and by_uri["committed"] == 3
    # not finalized yet: the manifest link answers 404 with the reason
    missing = _get(client, _run_url(progress_run, "manifest"))
    assert missing.status_code == 404 and "has not been finalized" in missing.json()["detail"]


def test_the_manifest_once_the_job_is_finalized(client: TestClient, tmp_path: pathlib.Path) -> None:
    job = RunningJob.plan(tmp_path)
    for i in range(SHARDS):
        job.commit(i, quarantined=1 if i == 0 else 0)
    finalize_job(job.plan_uri)
    manifest = _get(client, "/antbatch/api/manifest", plan_uri=job.plan_uri).json()
    assert manifest["shards"] == SHARDS and manifest["quarantined_rows"] == 1
    done = _get(client, "/antbatch/api/job", plan_uri=job.plan_uri).json()
    assert done["succeeded"] is True and done["eta_s"] == 0.0


def test_a_pool_job_shows_its_pods_and_last_decisions(client: TestClient, tmp_path: pathlib.Path) -> None:
    """What the elastic pool's loop publishes beside the plan (triggers/pool.py), minus its own memory."""
    job = RunningJob.plan(tmp_path)
    assert _get(client, "/antbatch/api/job", plan_uri=job.plan_uri).json()["pool"] is None
    status = {
        "state": "running",
        "min_workers": 0,
        "max_workers": 8,
        "wanted": 4,
        "running": 2,
        "pending": 2,
        "unschedulable": 1,
        "pods_created": 5,
        "history": [[1_800_000_000.0, 2, "backlog of 7 shard(s): ramp 0 -> 2 pod(s)"], [1_800_000_010.0, 4, "ramp"]],
        "controller": {"streaks": {}},
    }
    job.ledger.store.put(POOL_FILE, json.dumps(status).encode())
    pool = _get(client, "/antbatch/api/job", plan_uri=job.plan_uri).json()["pool"]
    assert (pool["wanted"], pool["running"], pool["pending"], pool["unschedulable"]) == (4, 2, 2, 1)
    assert pool["decisions"][0] == {
        "at": 1_800_000_000.0,
        "wanted": 2,
        "reason": "backlog of 7 shard(s): ramp 0 -> 2 pod(s)",
    }
    assert "controller" not in pool and "history" not in pool


def test_unknown_runs_and_plans_are_404_in_one_line(client: TestClient, progress_run: ProgressRun) -> None:
    resp = _get(client, f"/antbatch/api/dags/{progress_run.dag_id}/runs/no-such-run/job")
    assert resp.status_code == 404 and resp.json()["detail"].startswith("no antbatch plan in run 'no-such-run'")
    resp = _get(client, "/antbatch/api/job", plan_uri="/nonexistent/out")
    assert resp.status_code == 404 and "no airflow-antbatch plan under /nonexistent/out" in resp.json()["detail"]


def test_the_page_is_served_to_a_logged_in_user(client: TestClient) -> None:
    client.cookies.set("_token", token())  # what the UI's login sets
    resp = client.get("/antbatch/job")
    assert resp.status_code == 200 and resp.headers["content-type"].startswith("text/html")
    assert 'id="quarantined"' in resp.text and "<script" in resp.text and "http" not in resp.text.split("<script")[0]


def test_the_extra_link_opens_the_page_of_the_task() -> None:
    from airflow.sdk.types import TaskInstanceKey  # noqa: F401  # the type get_link receives

    from airflow_antbatch.operators.local_worker import LocalBatchWorkerOperator
    from airflow_antbatch.plugins.links import AntBatchJobLink
    from airflow_antbatch.sensors.ledger import ShardLedgerSensor

    class Key:
        dag_id, run_id, task_id, map_index = "nightly", "manual__2026-11-27T02:00:00+00:00", "batch.worker", 3

    link = AntBatchJobLink().get_link(ShardLedgerSensor(task_id="s", plan_uri="x"), ti_key=Key())  # type: ignore[arg-type]
    assert link == (
        "/antbatch/job?dag_id=nightly&run_id=manual__2026-11-27T02%3A00%3A00%2B00%3A00&task_id=batch.worker&map_index=3"
    )
    for operator in (ShardLedgerSensor, LocalBatchWorkerOperator):
        assert [type(x) for x in operator.operator_extra_links] == [AntBatchJobLink]


def test_a_finished_sensor_task_stores_its_link_for_the_ui(
    airflow_db: pathlib.Path, tmp_path: pathlib.Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Airflow 3 computes the link on the worker when the task ends and keeps it in XCom."""
    job = RunningJob.plan(tmp_path)
    for i in range(SHARDS):
        job.commit(i)
    monkeypatch.setenv("ANTBATCH_TEST_PLAN_URI", job.plan_uri)
    run = _load_dag("antbatch_sensor_dags.py", "antbatch_deferred_sensor").test()
    [ti] = run.get_task_instances()
    assert ti.state == "success"
    link = ti.xcom_pull(task_ids=ti.task_id, key="_link_AntBatchJobLink")
    assert link == f"/antbatch/job?dag_id=antbatch_deferred_sensor&run_id={quote(run.run_id, safe='')}" + (
        "&task_id=wait_for_shards&map_index=-1"
    )
