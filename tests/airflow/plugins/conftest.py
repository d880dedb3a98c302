"""A DAG run whose job is mid-run, and Airflow's real API server app with the plugin mounted.

The run is made by ``dag.test()`` (the plan task pushes the plan URI to XCom in the test DB);
the ledger is then moved forward through its own API: 3 of 8 shards committed (2 records
quarantined), 1 leased under a live heartbeat, 4 pending.
"""

from __future__ import annotations

import dataclasses
import os
import secrets
from typing import TYPE_CHECKING

import pytest

from tests.airflow.test_dag_e2e import _load_dag
from tests.progress_jobs import RunningJob, advance_to_mid_run, write_input

if TYPE_CHECKING:
    import pathlib
    from collections.abc import Iterator

    from fastapi import FastAPI

DAG_ID = "antbatch_progress"
# Airflow's generated default is 16 random bytes, which PyJWT warns about for HS512; a
# deployment sets its own. Read when the auth manager first signs a token.
os.environ.setdefault("AIRFLOW__API_AUTH__JWT_SECRET", secrets.token_urlsafe(64))


@dataclasses.dataclass(frozen=True)
class ProgressRun:
    dag_id: str
    run_id: str
    job: RunningJob


@pytest.fixture(scope="session")
def progress_run(airflow_db: pathlib.Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ProgressRun]:
    root = tmp_path_factory.mktemp("progress")
    write_input(root)
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("ANTBATCH_TEST_PROGRESS_ROOT", str(root))
        dag = _load_dag("antbatch_progress_dags.py", DAG_ID)
        run = dag.test(mark_success_pattern=r".*\.wait_for_shards$")
    assert run.state == "success"
    plan_uri = run.get_task_instance("job.plan").xcom_pull(task_ids="job.plan", key="plan_uri")
    yield ProgressRun(DAG_ID, run.run_id, advance_to_mid_run(RunningJob.attach(plan_uri)))


@pytest.fixture(scope="session")
def api_app(airflow_db: pathlib.Path) -> FastAPI:
    """The API server's app as ``airflow api-server`` builds it: plugins, auth manager, middlewares."""
    from airflow.api_fastapi.app import create_app

    return create_app("core")


def token(role: str | None = "admin") -> str:
    """A JWT of the configured (simple) auth manager, as the UI's login puts in the _token cookie."""
    from airflow.api_fastapi.app import get_auth_manager
    from airflow.api_fastapi.auth.managers.simple.user import SimpleAuthManagerUser

    return get_auth_manager().generate_jwt(SimpleAuthManagerUser(username="tester", role=role))
