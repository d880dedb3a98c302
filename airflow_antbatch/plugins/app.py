"""The progress page's FastAPI app, mounted by Airflow's API server under ``/antbatch``.

Every route depends on Airflow's own authentication (``get_user``: the UI's ``_token`` cookie or a
bearer JWT) and asks the auth manager for read access, because the API server mounts plugin apps
without any: an anonymous request gets 401, a forbidden one 403. The routes only read: the plan
URI of a DAG run from the plan task's XCom, and the job's ledger and manifest from the store.

Routes::

    GET /job                                       the page (it polls one of the two below)
    GET /api/dags/{dag_id}/runs/{run_id}/job       a run's job; ?task_id= picks one of several
    GET /api/job?plan_uri=...                      any job by plan URI (needs read access to all DAGs)
    GET /api/dags/{dag_id}/runs/{run_id}/manifest  the output's _SUCCESS manifest
    GET /api/manifest?plan_uri=...

A job run through an Airflow connection is read through it: the plan task pushes its plan URI
naming the connection (``s3://conn_id@bucket/...``), and a ``plan_uri`` query may name one the
same way (:mod:`airflow_antbatch.hooks.storage`). Options that every store needs (an S3
endpoint, a profile) come from ``ANTBATCH_STORAGE_OPTIONS`` in the API server's environment, as
the CLI takes them, and go over the connection's; without a connection, credentials come from
the API server's environment.
"""

from __future__ import annotations

import json
import os
import threading
from collections import OrderedDict
from importlib import resources
from typing import TYPE_CHECKING, Annotated, Any

from fastapi import Depends, FastAPI, HTTPException, Query
from fastapi.responses import HTMLResponse
from sqlalchemy import select

from airflow_antbatch.errors import AntBatchError
from airflow_antbatch.finalize import read_manifest
from airflow_antbatch.hooks.storage import join_conn_id, reach, split_conn_id
from airflow_antbatch.layout import PLAN_URI_KEY, POOL_FILE
from airflow_antbatch.planning import resolve_plan_uri
from airflow_antbatch.plugins.links import PAGE_ROUTE
from airflow_antbatch.progress import JobProgress
from airflow_antbatch.version_compat import (  # the API server's names, imported on first use
    AirflowException,
    DagAccessEntity,
    SessionDep,  # noqa: TC001  # FastAPI resolves it at run time
    XComModel,
    requires_access_dag,
    requires_authenticated,
)

if TYPE_CHECKING:
    from collections.abc import Callable

MAX_QUARANTINE_FILES = 50  # quarantine files whose reasons the page lists
_CACHED_JOBS = 32  # JobProgress objects kept between polls (each remembers its commit records)

# A run's job: the user may read the DAG's runs and its XComs (the plan URI is one).
_read_run = [
    Depends(requires_access_dag("GET", DagAccessEntity.RUN)),
    Depends(requires_access_dag("GET", DagAccessEntity.XCOM)),
]
# No DAG named: the auth manager is asked about DAGs in general (for FAB, "can read all DAGs").
_read_any_job = [Depends(requires_access_dag("GET", DagAccessEntity.RUN))]


class _Jobs:
    """Open jobs by plan URI, least recently polled dropped first; one lock per job."""

    def __init__(self, size: int) -> None:
        self._size = size
        self._jobs: OrderedDict[str, tuple[threading.Lock, JobProgress]] = OrderedDict()
        self._lock = threading.Lock()

    def view(self, plan_uri: str) -> dict[str, Any]:
        with self._lock:
            entry = self._jobs.pop(plan_uri, None)
            if entry is None:
                entry = (threading.Lock(), JobProgress(*reach(plan_uri, base=storage_options())))
            self._jobs[plan_uri] = entry
            while len(self._jobs) > self._size:
                self._jobs.popitem(last=False)
        lock, progress = entry
        with lock:
            snap = progress.snapshot()
            reasons = progress.quarantine_reasons(snap.quarantine_files, limit=MAX_QUARANTINE_FILES)
            pool = progress.ledger.store.read(POOL_FILE)  # one GET: the elastic pool's, if it has one
        doc = snap.to_dict()
        for item in doc["quarantine_files"]:
            item["reasons"] = reasons.get(item["shard_id"])
        doc["stale_workers"] = snap.stale_workers()
        doc["pool"] = pool_view(pool)
        return doc


def pool_view(data: bytes | None) -> dict[str, Any] | None:
    """The pool status file as the page shows it: pods wanted, running, pending and the last
    decisions (the controller's own memory stays out)."""
    if not data:
        return None
    doc: dict[str, Any] = json.loads(data)
    doc.pop("controller", None)
    doc["decisions"] = [{"at": at, "wanted": wanted, "reason": reason} for at, wanted, reason in doc.pop("history", [])]
    return doc


def storage_options() -> dict[str, Any]:
    """fsspec options for the ledgers this server reads, from ``ANTBATCH_STORAGE_OPTIONS`` (JSON)."""
    raw = os.environ.get("ANTBATCH_STORAGE_OPTIONS")
    try:
        value = json.loads(raw) if raw else {}
    except json.JSONDecodeError as exc:
        raise HTTPException(500, f"ANTBATCH_STORAGE_OPTIONS in the API server's env is not JSON: {exc}") from exc
    if not isinstance(value, dict):
        raise HTTPException(500, "ANTBATCH_STORAGE_OPTIONS in the API server's environment must be a JSON object")
    return value


def plan_uri_of_run(session: Any, dag_id: str, run_id: str, task_id: str | None) -> str:
    """The plan URI the run's plan task pushed; with several jobs in the run, the one of ``task_id``'s group."""
    rows = session.execute(
        select(XComModel.task_id, XComModel.value).where(
            XComModel.dag_id == dag_id, XComModel.run_id == run_id, XComModel.key == PLAN_URI_KEY
        )
    ).all()
    found = {row.task_id: XComModel.deserialize_value(row) for row in rows}
    if len(found) > 1 and task_id is not None:
        group = task_id.rpartition(".")[0]
        found = {t: v for t, v in found.items() if t.rpartition(".")[0] == group}
    if not found:
        raise HTTPException(404, f"no antbatch plan in run {run_id!r} of DAG {dag_id!r} (has its plan task run?)")
    if len(found) > 1:
        raise HTTPException(409, f"run {run_id!r} has several antbatch jobs ({', '.join(sorted(found))}): give task_id")
    return str(next(iter(found.values())))


def _answer(read: Callable[[], dict[str, Any]]) -> dict[str, Any]:
    """Ledger errors as one-line HTTP errors: a missing plan is a 404, anything else names the file
    (or the connection: one that is not defined, a URI naming one wrongly)."""
    try:
        return read()
    except FileNotFoundError as exc:
        raise HTTPException(404, str(exc)) from exc
    except (AntBatchError, AirflowException, ValueError) as exc:
        raise HTTPException(502, str(exc)) from exc


def _latest(plan_uri: str) -> str:
    """The plan behind a ``plan_uri`` query (see :func:`resolve_plan_uri`), naming the same connection."""
    uri, options = reach(plan_uri, base=storage_options())
    return join_conn_id(resolve_plan_uri(uri, options), split_conn_id(plan_uri)[1])


def _manifest(plan_uri: str) -> dict[str, Any]:
    uri, options = reach(plan_uri, base=storage_options())
    output_uri = JobProgress(uri, options).output.url
    manifest = read_manifest(output_uri, options)
    if manifest is None:
        raise HTTPException(404, f"no manifest at {output_uri}/_SUCCESS yet: the job has not been finalized")
    return manifest


def create_app() -> FastAPI:
    app = FastAPI(title="airflow-antbatch progress", docs_url=None, redoc_url=None, openapi_url=None)
    jobs = _Jobs(_CACHED_JOBS)

    @app.get(PAGE_ROUTE, response_class=HTMLResponse, dependencies=[Depends(requires_authenticated())])
    def page() -> str:
        return resources.files(__package__).joinpath("page.html").read_text(encoding="utf-8")

    @app.get("/api/dags/{dag_id}/runs/{run_id}/job", dependencies=_read_run)
    def run_job(dag_id: str, run_id: str, session: SessionDep, task_id: str | None = None) -> dict[str, Any]:
        plan_uri = plan_uri_of_run(session, dag_id, run_id, task_id)
        return {"dag_id": dag_id, "run_id": run_id, **_answer(lambda: jobs.view(plan_uri))}

    @app.get("/api/job", dependencies=_read_any_job)
    def job(plan_uri: Annotated[str, Query(min_length=1)]) -> dict[str, Any]:
        return _answer(lambda: jobs.view(_latest(plan_uri)))

    @app.get("/api/dags/{dag_id}/runs/{run_id}/manifest", dependencies=_read_run)
    def run_manifest(dag_id: str, run_id: str, session: SessionDep, task_id: str | None = None) -> dict[str, Any]:
        plan_uri = plan_uri_of_run(session, dag_id, run_id, task_id)
        return _answer(lambda: _manifest(plan_uri))

    @app.get("/api/manifest", dependencies=_read_any_job)
    def manifest(plan_uri: Annotated[str, Query(min_length=1)]) -> dict[str, Any]:
        return _answer(lambda: _manifest(_latest(plan_uri)))

    return app
