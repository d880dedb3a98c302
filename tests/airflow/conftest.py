"""An isolated Airflow 3 home (SQLite) for the Airflow-side tests.

Airflow reads its configuration when it is first imported, so the environment is set here, at
conftest import time, before any test module imports ``airflow``. The DAGs folder is a
temporary directory of symlinks to the repository's ``dags/`` and to
``tests/airflow/dag_files/``: ``dag.test()`` only runs DAGs found in the configured folder.
"""

from __future__ import annotations

import atexit
import dataclasses
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

import pytest

from tests.conftest import REPO_ROOT

if TYPE_CHECKING:
    from collections.abc import Iterator

    from airflow.sdk import Context

if "airflow.configuration" in sys.modules:  # pragma: no cover - a misconfigured run
    raise RuntimeError("airflow was imported before tests/airflow/conftest.py could configure AIRFLOW_HOME")

AIRFLOW_HOME = Path(tempfile.mkdtemp(prefix="antbatch-airflow-"))
atexit.register(shutil.rmtree, AIRFLOW_HOME, ignore_errors=True)
DAGS_FOLDER = AIRFLOW_HOME / "dags"
DAGS_FOLDER.mkdir()
for _dag_file in [*sorted((REPO_ROOT / "dags").glob("*.py")), *sorted(Path(__file__).parent.glob("dag_files/*.py"))]:
    (DAGS_FOLDER / _dag_file.name).symlink_to(_dag_file)

os.environ.update(
    {
        "AIRFLOW_HOME": str(AIRFLOW_HOME),
        "AIRFLOW__CORE__DAGS_FOLDER": str(DAGS_FOLDER),
        "AIRFLOW__CORE__LOAD_EXAMPLES": "False",
        "AIRFLOW__DATABASE__SQL_ALCHEMY_CONN": f"sqlite:///{AIRFLOW_HOME}/airflow.db",
    }
)

# Warnings Airflow raises on its own code paths, which pytest's filterwarnings=error would turn
# into test failures. Each is matched by message and category, for these tests only.
AIRFLOW_WARNINGS = [
    # dag.test() starts an in-process execution API whose import of starlette.testclient
    # warns when httpx (an Airflow dependency) is installed rather than httpx2.
    "ignore:Using `httpx` with `starlette.testclient` is deprecated:starlette.exceptions.StarletteDeprecationWarning",
    # DagRun.serialized_dag joins on dag_id alone, so SQLAlchemy warns whenever a DAG has more
    # than one serialized version, as every DAG does once it changes. Here it happens when a DAG
    # file is parsed with another data root (each test has its own), e.g. by the API server
    # app of the plugin tests and then by dag.test().
    "ignore:Multiple rows returned with uselist=False for lazily-loaded attribute 'DagRun.serialized_dag'"
    ":sqlalchemy.exc.SAWarning",
]


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    here = Path(__file__).parent
    for item in items:
        if here in Path(item.path).parents:
            for spec in AIRFLOW_WARNINGS:
                item.add_marker(pytest.mark.filterwarnings(spec))


@pytest.fixture(scope="session")
def airflow_db() -> Iterator[Path]:
    """``airflow db migrate`` once per session (a few seconds on SQLite), in a subprocess."""
    result = subprocess.run(
        [sys.executable, "-m", "airflow", "db", "migrate"], capture_output=True, text=True, env=dict(os.environ)
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    yield AIRFLOW_HOME


@pytest.fixture
def fake_ti() -> FakeTaskInstance:
    return FakeTaskInstance()


class FakeTaskInstance:
    """Enough of a task instance for operators run outside a DAG run (``xcom_push`` only)."""

    def __init__(self) -> None:
        self.xcom: dict[str, Any] = {}

    def xcom_push(self, key: str, value: Any) -> None:
        self.xcom[key] = value

    def context(self) -> Context:
        return cast("Context", {"ti": self})


TABULAR = "airflow_antbatch.examples.tabular"


@dataclasses.dataclass(frozen=True)
class FinishedJob:
    plan_uri: str
    output_uri: str
    rows: int
    worker_summary: dict[str, Any]


@pytest.fixture(scope="session")
def finished_job(tmp_path_factory: pytest.TempPathFactory) -> FinishedJob:
    """A small job planned and run to the end by the operators, outside any DAG (one worker process)."""
    from airflow_antbatch.operators.local_worker import LocalBatchWorkerOperator
    from airflow_antbatch.operators.plan import PlanBatchInferenceOperator
    from tests.conftest import write_transactions

    root = tmp_path_factory.mktemp("finished_job")
    table = write_transactions(root / "in", files=2, rows_per_file=400, row_group_size=200)
    ti = FakeTaskInstance()
    kwargs: list[dict[str, Any]] = PlanBatchInferenceOperator(
        task_id="plan",
        input_uri=str(root / "in"),
        output_uri=str(root / "out"),
        model=f"{TABULAR}:build_model",
        preprocess=f"{TABULAR}:preprocess",
        id_column="txn_id",
        max_shard_rows=200,
    ).execute(ti.context())
    # storage_options reach the worker process (a local store takes fsspec's auto_mkdir).
    summary = LocalBatchWorkerOperator(
        task_id="worker", torch_threads=1, storage_options={"auto_mkdir": True}, **kwargs[0]
    ).execute(ti.context())
    return FinishedJob(str(ti.xcom["plan_uri"]), str(root / "out"), table.num_rows, summary)
