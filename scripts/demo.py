"""``make demo``: the nightly DAG end to end under a real Airflow 3 scheduler, on this machine.

It starts a private Airflow (SQLite, LocalExecutor, loopback only, everything under
``.demo/``), writes one day of sample transactions, runs ``nightly_batch_inference`` for that
day, prints what was scored and by which worker, and stops every Airflow process again. Run it
twice: the second run clears the same day's run, and the workers skip the committed shards.
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import dataclasses
import datetime as dt
import fcntl
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
import uuid
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from collections.abc import Iterator, Sequence
    from types import FrameType

ROOT = Path(__file__).resolve().parent.parent
DEMO_DIR = ROOT / ".demo"
DAG_ID = "nightly_batch_inference"
DEFAULT_DS = "2026-11-25"
ROWS, FILES, ROW_GROUP_ROWS = 30_000, 3, 2_500
# The scheduler and the triggerer skip their log servers: those bind every interface on fixed
# ports, and the API server reads the task logs straight from disk here anyway.
COMPONENTS: dict[str, list[str]] = {
    "api-server": ["api-server"],
    "scheduler": ["scheduler", "--skip-serve-logs"],
    "dag-processor": ["dag-processor"],
    "triggerer": ["triggerer", "--skip-serve-logs"],
}
HEALTH_KEYS = ("metadatabase", "scheduler", "dag_processor", "triggerer")
MARKER_VAR = "ANTBATCH_DEMO_SESSION"
FINISHED = frozenset({"success", "failed"})


class DemoError(Exception):
    """A failure to report in one line, plus the log that explains it."""


@dataclasses.dataclass(frozen=True)
class Layout:
    """Where the demo keeps its state: all under ``.demo/`` (git-ignored), one day of data."""

    root: Path
    ds: str

    @property
    def home(self) -> Path:
        return self.root / "airflow"

    @property
    def data(self) -> Path:
        return self.root / "data"

    @property
    def logs(self) -> Path:
        return self.root / "logs"

    @property
    def input_dir(self) -> Path:
        return self.data / "transactions" / f"ds={self.ds}"

    @property
    def output_dir(self) -> Path:
        return self.data / "predictions" / f"ds={self.ds}"


class Phases:
    """Wall-clock time per phase, so that slow steps show up in the summary."""

    def __init__(self) -> None:
        self.start = time.monotonic()
        self.marks: list[tuple[str, float]] = []
        self._last = self.start

    def mark(self, name: str) -> None:
        now = time.monotonic()
        self.marks.append((name, now - self._last))
        self._last = now

    def total(self) -> float:
        return time.monotonic() - self.start


def say(text: str) -> None:
    """Progress lines go to stdout at once, even when piped (make, tee)."""
    print(text, flush=True)


def rel(path: Path) -> str:
    """Paths relative to the repo: shorter, and what the user can paste."""
    with contextlib.suppress(ValueError):
        return str(path.relative_to(ROOT))
    return str(path)


# -- sample data ---------------------------------------------------------------------------------


def parquet_stats(files: Sequence[Path]) -> tuple[int, int]:
    """(rows, row groups) from the footers only."""
    import pyarrow.parquet as pq

    metas = [pq.read_metadata(f) for f in files]
    return sum(m.num_rows for m in metas), sum(m.num_row_groups for m in metas)


def ensure_input(directory: Path) -> bool:
    """Write the day's transactions once; True if written now.

    Existing files are kept as they are: new mtimes would change the plan's fingerprint, and a
    rerun must see the very same input to reuse the plan and skip the committed shards.
    """
    if len(list(directory.glob("*.parquet"))) == FILES:
        return False
    import pyarrow.parquet as pq

    from airflow_antbatch.examples.tabular import generate_transactions

    directory.mkdir(parents=True, exist_ok=True)
    per_file = ROWS // FILES
    for i in range(FILES):
        table = generate_transactions(per_file, seed=i, first_id=i * per_file)
        tmp = directory.parent / f".part-{i:03d}.parquet.tmp"
        pq.write_table(table, tmp, row_group_size=ROW_GROUP_ROWS)
        tmp.replace(directory / f"part-{i:03d}.parquet")  # no half-written file in the input
    return True


# -- the local Airflow ---------------------------------------------------------------------------


def free_port() -> int:
    """A loopback port free right now, so that a busy 8080 or a second demo does not clash."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def airflow_env(layout: Layout, dags_folder: Path, port: int, marker: str) -> dict[str, str]:
    """The environment of every Airflow process: private home, loopback API, no cron runs.

    Inherited ``AIRFLOW_*`` settings are dropped so that a developer's own Airflow config cannot
    leak in. ``use_job_schedule`` is off: only the demo's run exists, no catch-up run for the
    real yesterday competes for the two CPUs.
    """
    venv_bin = str(Path(sys.executable).parent)
    base_url = f"http://127.0.0.1:{port}"
    env = {k: v for k, v in os.environ.items() if not k.startswith("AIRFLOW_")}
    env.update(
        {
            "PATH": os.pathsep.join([venv_bin, env.get("PATH", "")]),
            "AIRFLOW_HOME": str(layout.home),
            "AIRFLOW__CORE__DAGS_FOLDER": str(dags_folder),
            "AIRFLOW__CORE__EXECUTOR": "LocalExecutor",
            "AIRFLOW__CORE__PARALLELISM": "8",  # LocalExecutor forks them all at start: 32 by default
            "AIRFLOW__CORE__LOAD_EXAMPLES": "False",
            "AIRFLOW__DATABASE__SQL_ALCHEMY_CONN": f"sqlite:///{layout.home / 'airflow.db'}",
            "AIRFLOW__API__HOST": "127.0.0.1",
            "AIRFLOW__API__PORT": str(port),
            "AIRFLOW__API__WORKERS": "1",
            "AIRFLOW__API__BASE_URL": base_url,
            "AIRFLOW__CORE__EXECUTION_API_SERVER_URL": f"{base_url}/execution/",
            "AIRFLOW__SCHEDULER__USE_JOB_SCHEDULE": "False",
            "ANTBATCH_DATA_ROOT": str(layout.data),
            MARKER_VAR: marker,
        }
    )
    return env


@dataclasses.dataclass
class Component:
    name: str
    proc: subprocess.Popen[bytes]
    log: Path


class LocalAirflow:
    """Airflow's components as separate processes, each in its own process group and log file."""

    def __init__(self, layout: Layout, env: dict[str, str]) -> None:
        self.layout = layout
        self.env = env
        self.airflow = str(Path(sys.executable).parent / "airflow")
        self.components: list[Component] = []

    def _spawn(self, name: str, args: list[str]) -> Component:
        log = self.layout.logs / f"{name}.log"
        with log.open("wb") as out:
            proc = subprocess.Popen(
                [self.airflow, *args],
                env=self.env,
                cwd=self.layout.home,
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,  # its own process group: stopped as a whole, never orphaned
            )
        component = Component(name, proc, log)
        self.components.append(component)
        return component

    def migrate(self, timeout_s: float = 120.0) -> None:
        """Create or upgrade the SQLite metadata DB before anything reads it."""
        component = self._spawn("db-migrate", ["db", "migrate"])
        try:
            code = component.proc.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired as exc:
            raise DemoError(f"airflow db migrate took over {timeout_s:.0f}s; see {rel(component.log)}") from exc
        if code != 0:
            raise DemoError(f"airflow db migrate failed (exit {code}); see {rel(component.log)}")

    def start(self) -> None:
        for name, args in COMPONENTS.items():
            self._spawn(name, args)

    def check_alive(self) -> None:
        """Fail fast with the right log instead of waiting for a timeout."""
        for c in self.components:
            if c.name in COMPONENTS and c.proc.poll() is not None:
                raise DemoError(f"airflow {c.name} exited with code {c.proc.returncode}; see {rel(c.log)}")

    def stop(self, grace_s: float = 5.0) -> int:
        """SIGTERM everything this session started, SIGKILL what is left after the grace period.

        Airflow 3.3's task supervisor gives every task process a process group of its own, so
        signalling the components' groups misses running tasks and the ``antbatch worker``
        subprocesses under them: those are found by the session marker in their environment.
        A worker that gets SIGTERM gives its shard back at once instead of leaving a lease to
        expire. The grace is short on purpose: the triggerer always spends 10 s waiting for its
        trigger subprocess (a fixed ``escalation_delay``), even with no trigger at all.
        Returns how many task processes outside the components' groups had to be stopped.
        """
        marker = self.env[MARKER_VAR]
        groups = {c.proc.pid for c in self.components}
        tasks = [pid for pid, pgid in marked_processes(marker).items() if pgid not in groups]
        for pgid in groups:
            _signal_group(pgid, signal.SIGTERM)
        for pid in tasks:
            _signal(pid, signal.SIGTERM)
        deadline = time.monotonic() + grace_s
        while time.monotonic() < deadline and (
            any(_group_alive(c) for c in self.components) or marked_processes(marker)
        ):
            time.sleep(0.2)
        for c in self.components:
            if _group_alive(c):
                _signal_group(c.proc.pid, signal.SIGKILL)
        for pid in marked_processes(marker):
            _signal(pid, signal.SIGKILL)
        for c in self.components:
            with contextlib.suppress(subprocess.TimeoutExpired):
                c.proc.wait(timeout=5)
        return len(tasks)


def _signal(pid: int, signum: int) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.kill(pid, signum)


def _signal_group(pgid: int, signum: int) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pgid, signum)


def _group_alive(component: Component) -> bool:
    """Whether any process of the component's group still runs (its leader reaped if done)."""
    component.proc.poll()
    try:
        os.killpg(component.proc.pid, 0)
    except (ProcessLookupError, PermissionError):
        return False
    return True


def marked_processes(marker: str) -> dict[int, int]:
    """{pid: process group} of the live processes that inherited this session's marker.

    The marker finds every descendant, whatever group or session it moved to (Linux /proc).
    """
    needle = f"{MARKER_VAR}={marker}".encode()
    found = {}
    for entry in Path("/proc").glob("[0-9]*"):
        try:
            if needle not in (entry / "environ").read_bytes().split(b"\0") or int(entry.name) == os.getpid():
                continue
            state, _ppid, pgid = (entry / "stat").read_text().rsplit(")", 1)[1].split()[:3]
        except (OSError, ValueError):
            continue  # gone meanwhile, or not ours to read
        if state != "Z":
            found[int(entry.name)] = int(pgid)
    return found


# -- the REST API --------------------------------------------------------------------------------


class ApiError(DemoError):
    def __init__(self, status: int, method: str, path: str, body: str) -> None:
        super().__init__(f"{method} {path}: HTTP {status}: {body[:300]}")
        self.status = status


class AirflowApi:
    """A few calls of Airflow 3's public REST API (``/api/v2``), with a JWT from ``/auth/token``."""

    def __init__(self, base_url: str) -> None:
        self.base_url = base_url
        self.token: str | None = None

    def call(self, method: str, path: str, body: Any = None, query: dict[str, Any] | None = None) -> Any:
        url = self.base_url + urllib.parse.quote(path) + ("?" + urllib.parse.urlencode(query) if query else "")
        headers = {"Accept": "application/json", "Content-Type": "application/json"}
        if self.token:
            headers["Authorization"] = f"Bearer {self.token}"
        data = None if body is None else json.dumps(body).encode()
        request = urllib.request.Request(url, data=data, headers=headers, method=method)
        try:
            with urllib.request.urlopen(request, timeout=30) as response:
                raw = response.read()
        except urllib.error.HTTPError as exc:
            raise ApiError(exc.code, method, path, exc.read().decode(errors="replace")) from exc
        return json.loads(raw) if raw else None

    def login(self, password_file: Path) -> None:
        """Log in as the admin whose password the API server generated into AIRFLOW_HOME."""
        passwords = json.loads(password_file.read_text())
        username = "admin" if "admin" in passwords else next(iter(passwords))
        doc = self.call("POST", "/auth/token", {"username": username, "password": passwords[username]})
        self.token = doc["access_token"]


def wait_until_healthy(airflow: LocalAirflow, api: AirflowApi, timeout_s: float) -> None:
    """Until the API answers and scheduler, DAG processor and triggerer heartbeat.

    As soon as the API server answers, its execution API is warmed up in the background: its
    first request builds the versioned routes (Cadwyn) and takes ~5 s, which would otherwise
    delay the first task of the run.
    """
    deadline = time.monotonic() + timeout_s
    health: dict[str, Any] = {}
    warm_up: threading.Thread | None = None
    while time.monotonic() < deadline:
        airflow.check_alive()
        with contextlib.suppress(OSError, DemoError, ValueError):
            health = api.call("GET", "/api/v2/monitor/health")
            if warm_up is None:
                warm_up = threading.Thread(target=_warm_up_execution_api, args=(api,), daemon=True)
                warm_up.start()
            if all((health.get(k) or {}).get("status") == "healthy" for k in HEALTH_KEYS):
                return
        time.sleep(0.5)
    raise DemoError(
        f"Airflow not healthy after {timeout_s:.0f}s (last health: {health}); see {rel(airflow.layout.logs)}"
    )


def _warm_up_execution_api(api: AirflowApi) -> None:
    with contextlib.suppress(OSError, DemoError, ValueError):
        api.call("GET", "/execution/health")


def wait_for_dag(airflow: LocalAirflow, api: AirflowApi, since: dt.datetime, timeout_s: float) -> None:
    """Until the DAG processor has parsed the DAG file in this session; import errors fail at once.

    The metadata DB outlives the session, so an existing DAG record proves nothing: it may come
    from an older version of the file. Only a parse after ``since`` counts.
    """
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        airflow.check_alive()
        error = new_import_error(api, since)
        if error:
            raise DemoError(error)
        try:
            dag = api.call("GET", f"/api/v2/dags/{DAG_ID}")
        except ApiError as exc:
            if exc.status != 404:
                raise
        else:
            parsed = _when(dag.get("last_parsed_time"))
            if parsed and parsed >= since and not dag.get("has_import_errors"):
                return
        time.sleep(1.0)
    raise DemoError(
        f"DAG {DAG_ID} not parsed within {timeout_s:.0f}s; see {rel(airflow.layout.logs / 'dag-processor.log')}"
    )


def new_import_error(api: AirflowApi, since: dt.datetime) -> str | None:
    """The first DAG import error recorded in this session, ready to print."""
    for error in api.call("GET", "/api/v2/importErrors").get("import_errors", []):
        if (_when(error.get("timestamp")) or since) >= since:
            return f"a DAG file does not import: {error['filename']}\n{error['stack_trace']}"
    return None


def start_run(api: AirflowApi, ds: str) -> tuple[str, bool]:
    """Trigger the day's run, or clear it if it exists: (run id, is a rerun).

    Airflow 3 keeps (dag_id, logical_date) unique, so a second trigger for the same day is
    refused (409); clearing the existing run reruns every task of it instead.
    """
    logical = f"{ds}T00:00:00Z"
    runs = api.call(
        "GET", f"/api/v2/dags/{DAG_ID}/dagRuns", query={"logical_date_gte": logical, "logical_date_lte": logical}
    )["dag_runs"]
    if runs:
        run_id = str(runs[0]["dag_run_id"])
        api.call("POST", f"/api/v2/dags/{DAG_ID}/dagRuns/{run_id}/clear", {"dry_run": False})
        rerun = True
    else:
        body = {"dag_run_id": f"demo__{ds}", "logical_date": logical, "conf": {}}
        run_id = str(api.call("POST", f"/api/v2/dags/{DAG_ID}/dagRuns", body)["dag_run_id"])
        rerun = False
    api.call("PATCH", f"/api/v2/dags/{DAG_ID}", {"is_paused": False})
    return run_id, rerun


def task_instances(api: AirflowApi, run_id: str) -> list[dict[str, Any]]:
    """The run's task instances, less those an earlier version of the DAG left as ``removed``."""
    doc = api.call("GET", f"/api/v2/dags/{DAG_ID}/dagRuns/{run_id}/taskInstances", query={"limit": 1000})
    return [ti for ti in doc["task_instances"] if ti["state"] != "removed"]


def progress_line(tis: list[dict[str, Any]]) -> str:
    """One line of task states, e.g. ``plan success | worker 3x running | finalize -``."""
    by_task: dict[str, collections.Counter[str]] = collections.defaultdict(collections.Counter)
    for ti in tis:
        by_task[ti["task_id"]][ti["state"] or "-"] += 1
    groups = {task_id.rpartition(".")[0] for task_id in by_task}
    group = groups.pop() if len(groups) == 1 else ""  # one task group: name it once, up front
    parts = []
    for task_id, states in by_task.items():
        text = ", ".join(f"{n}x {s}" if n > 1 else s for s, n in sorted(states.items()))
        parts.append(f"{task_id.removeprefix(group + '.') if group else task_id} {text}")
    return (f"{group}: " if group else "") + " | ".join(parts)


def wait_for_run(airflow: LocalAirflow, api: AirflowApi, run_id: str, since: dt.datetime, timeout_s: float) -> str:
    """Poll the run until it ends, printing task states whenever they change."""
    start = time.monotonic()
    last = ""
    while time.monotonic() - start < timeout_s:
        airflow.check_alive()
        error = new_import_error(api, since)
        if error:  # the file broke mid-run: its tasks would wait forever
            raise DemoError(error)
        state = api.call("GET", f"/api/v2/dags/{DAG_ID}/dagRuns/{run_id}")["state"]
        line = progress_line(task_instances(api, run_id))
        if line != last:
            say(f"  {time.monotonic() - start:5.1f}s  {line}")
            last = line
        if state in FINISHED:
            return str(state)
        time.sleep(1.0)
    raise DemoError(f"run {run_id} not finished after {timeout_s:.0f}s; see {rel(airflow.layout.logs)}")


# -- results -------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class WorkerTask:
    """One mapped worker task instance: its timing from Airflow, its summary from XCom."""

    task_id: str
    map_index: int
    state: str
    start: dt.datetime | None
    end: dt.datetime | None
    summary: dict[str, Any]


def _when(value: str | None) -> dt.datetime | None:
    return dt.datetime.fromisoformat(value) if value else None


def xcom_value(api: AirflowApi, run_id: str, task_id: str, map_index: int) -> dict[str, Any]:
    """The task's return value (the worker summary), {} when it pushed none."""
    path = f"/api/v2/dags/{DAG_ID}/dagRuns/{run_id}/taskInstances/{task_id}/xcomEntries/return_value"
    try:
        value = api.call("GET", path, query={"map_index": map_index})["value"]
    except ApiError as exc:
        if exc.status == 404:
            return {}
        raise
    if isinstance(value, str):
        with contextlib.suppress(ValueError):
            value = json.loads(value)
    return value if isinstance(value, dict) else {}


def worker_tasks(api: AirflowApi, run_id: str, tis: list[dict[str, Any]]) -> list[WorkerTask]:
    """The mapped task instances (the workers fan out per worker, so mapped = worker)."""
    mapped = sorted((ti for ti in tis if ti["map_index"] >= 0), key=lambda ti: (ti["task_id"], ti["map_index"]))
    return [
        WorkerTask(
            task_id=ti["task_id"],
            map_index=ti["map_index"],
            state=ti["state"] or "-",
            start=_when(ti.get("start_date")),
            end=_when(ti.get("end_date")),
            summary=xcom_value(api, run_id, ti["task_id"], ti["map_index"]),
        )
        for ti in mapped
    ]


def overlap_seconds(workers: Sequence[WorkerTask]) -> float | None:
    """How long all workers ran at the same time (None: they did not, or times are missing)."""
    starts = [w.start for w in workers if w.start]
    ends = [w.end for w in workers if w.end]
    if len(workers) < 2 or len(starts) < len(workers) or len(ends) < len(workers):
        return None
    seconds = (min(ends) - max(starts)).total_seconds()
    return seconds if seconds > 0 else None


@dataclasses.dataclass(frozen=True)
class LedgerView:
    planned: int
    committed: int
    failed: int
    by_worker: dict[str, int]


def read_ledger(output_dir: Path) -> LedgerView | None:
    """Shards committed per worker id, from the commit records (the source of truth)."""
    from airflow_antbatch.ledger import Ledger
    from airflow_antbatch.planning import resolve_plan_uri

    try:
        ledger = Ledger.open(resolve_plan_uri(str(output_dir)))
    except FileNotFoundError:
        return None
    status = ledger.status()
    worker_of = {w.token: w.worker_id for w in status.workers}
    counts = dict.fromkeys(worker_of.values(), 0)  # workers that committed nothing show as 0
    for record in ledger.commit_records():
        worker_id = worker_of.get(record.token, record.token.rpartition("--")[0])
        counts[worker_id] = counts.get(worker_id, 0) + 1
    return LedgerView(status.planned, status.committed, status.failed, dict(sorted(counts.items())))


def task_log_tail(home: Path, run_id: str, ti: dict[str, Any], lines: int = 15) -> str:
    """The end of a task's last log file, Airflow 3's JSON lines shown as plain text."""
    folder = home / "logs" / f"dag_id={DAG_ID}" / f"run_id={run_id}" / f"task_id={ti['task_id']}"
    if ti["map_index"] >= 0:
        folder = folder / f"map_index={ti['map_index']}"
    files = sorted(folder.glob("attempt=*.log"), key=lambda p: p.stat().st_mtime)
    if not files:
        return f"    (no log under {rel(folder)})"
    shown = [_log_line(raw) for raw in files[-1].read_text(errors="replace").splitlines()]
    kept = [line for line in shown if line][-lines:]
    return f"  log: {rel(files[-1])}\n" + "\n".join(f"    {line}" for line in kept)


def _log_line(raw: str) -> str:
    """One structured log line as ``level event``, with the exception if it carries one."""
    try:
        doc = json.loads(raw)
    except ValueError:
        return raw
    if not isinstance(doc, dict):
        return raw
    event = str(doc.get("event", ""))
    if event.startswith("::"):  # ::group:: markers for the UI
        return ""
    for error in doc.get("error_detail") or []:
        event += f"\n      {error.get('exc_type')}: {error.get('exc_value')}"
    return f"{str(doc.get('level', ''))[:5]:<5} {event}"


def print_failure(layout: Layout, run_id: str, tis: list[dict[str, Any]], logs_shown: int = 2) -> None:
    """Each failed task, and the log tails of the first few (mapped workers often fail alike)."""
    bad = [ti for ti in tis if ti["state"] in ("failed", "upstream_failed", "up_for_retry")]
    bad.sort(key=lambda ti: ti["state"] == "upstream_failed")
    for i, ti in enumerate(bad):
        index = f"[{ti['map_index']}]" if ti["map_index"] >= 0 else ""
        say(f"- {ti['task_id']}{index}: {ti['state']}")
        if i < logs_shown and ti["state"] != "upstream_failed":
            say(task_log_tail(layout.home, run_id, ti))
    say(f"Airflow component logs: {rel(layout.logs)}/, task logs: {rel(layout.home / 'logs')}/")


def print_summary(layout: Layout, workers: Sequence[WorkerTask], rerun: bool) -> None:
    """Rows in vs rows out, files, who committed what, and whether the workers overlapped."""
    from airflow_antbatch.finalize import read_manifest
    from airflow_antbatch.layout import MANIFEST_NAME

    in_files = sorted(layout.input_dir.glob("*.parquet"))
    in_rows, row_groups = parquet_stats(in_files)
    manifest = read_manifest(str(layout.output_dir)) or {}
    out_rows = int(manifest.get("rows", -1))
    verdict = "matches the input" if out_rows == in_rows else f"MISMATCH: input has {in_rows:,}"
    say(f"input        {rel(layout.input_dir)}/  {in_rows:,} rows, {len(in_files)} files, {row_groups} row groups")
    say(f"predictions  {rel(layout.output_dir)}/  {len(manifest.get('files', []))} Parquet files (one per shard)")
    say(f"manifest     {rel(layout.output_dir / MANIFEST_NAME)}  {out_rows:,} rows ({verdict})")
    ledger = read_ledger(layout.output_dir)
    if ledger is not None:
        say(f"ledger       {ledger.committed}/{ledger.planned} shards committed, {ledger.failed} failed")
        say("             committed by " + ", ".join(f"{w}: {n}" for w, n in ledger.by_worker.items()))
    print_workers(workers, rerun)
    if rerun:
        print_rerun(workers, ledger)


def print_rerun(workers: Sequence[WorkerTask], ledger: LedgerView | None) -> None:
    """What the rerun redid: nothing, if every committed shard was skipped."""
    skipped = [int(w.summary.get("shards_skipped", 0)) for w in workers]
    redone = sum(int(w.summary.get("shards_committed", 0)) for w in workers)
    planned = ledger.planned if ledger else redone
    if redone == 0:
        say(f"rerun        nothing scored again: all {planned} shards were already committed and skipped")
    else:
        say(f"rerun        {redone} of {planned} shards scored in this run, {planned - redone} were already committed")
    say(f"             shards skipped as already committed, per worker: {', '.join(map(str, skipped))}")


def print_workers(workers: Sequence[WorkerTask], rerun: bool) -> None:
    """One line per mapped worker task; their overlapping run times show the fan-out is real."""
    if not workers:
        say("workers      (no mapped task instances found)")
        return
    overlap = overlap_seconds(workers)
    side = f"all {len(workers)} ran side by side for {overlap:.1f}s" if overlap else "did not all overlap"
    say(f"workers      mapped task '{workers[0].task_id}': {side}")
    say("             map  worker        state     start     end       committed  skipped  rows")
    for w in workers:
        s = w.summary  # the worker's return value: what this try did
        say(
            f"             {w.map_index:<4} {str(s.get('worker_id', '?')):<13} {w.state:<9} "
            f"{_clock(w.start):<9} {_clock(w.end):<9} {s.get('shards_committed', '?')!s:>9}  "
            f"{s.get('shards_skipped', '?')!s:>7}  {s.get('rows_committed', '?')!s:>6}"
        )
    say("             (this try's worker summaries from XCom; skipped = found already committed)")
    if not rerun and any(w.summary.get("shards_committed") == 0 for w in workers):
        say("             (workers pull shards from the ledger: one that starts late may find them all taken)")


def _clock(when: dt.datetime | None) -> str:
    return when.astimezone().strftime("%H:%M:%S") if when else "-"


# -- main ----------------------------------------------------------------------------------------


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m scripts.demo", description=__doc__)
    parser.add_argument("--ds", default=DEFAULT_DS, help=f"logical date to score (default {DEFAULT_DS})")
    parser.add_argument("--dags-folder", type=Path, default=ROOT / "dags", help="DAG folder (default: dags/)")
    parser.add_argument("--timeout", type=float, default=300.0, help="seconds to wait for the run")
    args = parser.parse_args(argv)
    dt.date.fromisoformat(args.ds)  # fail on a bad date before starting anything
    args.dags_folder = args.dags_folder.resolve()
    return args


def check_dag_file(folder: Path) -> None:
    """Refuse early, before Airflow starts, when no file in the folder defines the DAG."""
    if not any(DAG_ID in p.read_text(errors="replace") for p in folder.glob("*.py")):
        raise DemoError(f"no DAG file in {rel(folder)}/ defines '{DAG_ID}'")


@contextlib.contextmanager
def sigterm_as_interrupt() -> Iterator[None]:
    """A SIGTERM to the demo unwinds like Ctrl-C, so that Airflow is stopped on the way out."""

    def handler(_signum: int, _frame: FrameType | None) -> None:
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGTERM, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


@dataclasses.dataclass
class Outcome:
    run_id: str = ""
    rerun: bool = False
    state: str = ""
    tis: list[dict[str, Any]] = dataclasses.field(default_factory=list)
    workers: list[WorkerTask] = dataclasses.field(default_factory=list)


def run_in_airflow(airflow: LocalAirflow, api: AirflowApi, layout: Layout, timeout_s: float, phases: Phases) -> Outcome:
    """Migrate, start, trigger (or clear) the day's run, wait, and collect what the API knows."""
    outcome = Outcome()
    since = dt.datetime.now(dt.UTC)
    airflow.migrate()
    phases.mark("airflow db migrate")
    airflow.start()
    wait_until_healthy(airflow, api, timeout_s=120)
    api.login(layout.home / "simple_auth_manager_passwords.json.generated")
    wait_for_dag(airflow, api, since, timeout_s=90)
    phases.mark("components healthy, DAG parsed")
    say(f"Airflow is up at {api.base_url} (logs: {rel(layout.logs)}/)")
    outcome.run_id, outcome.rerun = start_run(api, layout.ds)
    say(f"{'cleared' if outcome.rerun else 'triggered'} run {outcome.run_id} of {DAG_ID} for ds={layout.ds}")
    outcome.state = wait_for_run(airflow, api, outcome.run_id, since, timeout_s)
    phases.mark("DAG run")
    outcome.tis = task_instances(api, outcome.run_id)
    outcome.workers = worker_tasks(api, outcome.run_id, outcome.tis)
    return outcome


def airflow_session(layout: Layout, dags_folder: Path, timeout_s: float, phases: Phases) -> Outcome | None:
    """Run the day in a private Airflow and always stop it again; None if that failed."""
    port = free_port()
    airflow = LocalAirflow(layout, airflow_env(layout, dags_folder, port, uuid.uuid4().hex))
    api = AirflowApi(f"http://127.0.0.1:{port}")
    outcome = None
    try:
        with sigterm_as_interrupt():
            outcome = run_in_airflow(airflow, api, layout, timeout_s, phases)
    except KeyboardInterrupt:
        say("interrupted: stopping Airflow")
    except DemoError as exc:
        say(f"demo failed: {exc}")
    except Exception:
        say(f"demo failed; Airflow logs: {rel(layout.logs)}/")
        raise
    finally:
        with signals_ignored(signal.SIGINT, signal.SIGTERM):  # a second Ctrl-C must not strand Airflow
            tasks = airflow.stop()
        phases.mark("stop Airflow")
        note = f", and {tasks} running task processes" if tasks else ""
        left = len(marked_processes(airflow.env[MARKER_VAR]))
        say(f"Airflow stopped ({len(airflow.components)} process groups{note}); processes left: {left}")
    if outcome is None:
        say(f"Airflow logs: {rel(layout.logs)}/")
    return outcome


@contextlib.contextmanager
def signals_ignored(*signums: int) -> Iterator[None]:
    previous = {s: signal.signal(s, signal.SIG_IGN) for s in signums}
    try:
        yield
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)


def report(layout: Layout, outcome: Outcome, phases: Phases) -> int:
    """The summary of a finished run, or the failed tasks' log tails; the exit code."""
    kind = "rerun" if outcome.rerun else "first run"
    say("")
    say(f"== {DAG_ID} ds={layout.ds}, run {outcome.run_id} ({kind}): {outcome.state} ==")
    if outcome.state != "success":
        print_failure(layout, outcome.run_id, outcome.tis)
        return 1
    print_summary(layout, outcome.workers, outcome.rerun)
    timings = ", ".join(f"{name} {seconds:.1f}s" for name, seconds in phases.marks)
    say(f"time         {phases.total():.1f}s in all: {timings}")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """One demo at a time per checkout: two would share one SQLite DB and one output."""
    args = parse_args(argv)
    layout = Layout(DEMO_DIR, args.ds)
    phases = Phases()
    try:
        check_dag_file(args.dags_folder)
    except DemoError as exc:
        say(f"demo: {exc}")
        return 1
    for folder in (layout.home, layout.logs, layout.data):
        folder.mkdir(parents=True, exist_ok=True)
    with (layout.root / "demo.lock").open("w") as lock:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            say("demo: another demo is running in this checkout (it holds .demo/demo.lock)")
            return 1
        written = ensure_input(layout.input_dir)
        say(f"sample data  {rel(layout.input_dir)}/ ({'generated' if written else 'already there, kept'})")
        phases.mark("sample data")
        outcome = airflow_session(layout, args.dags_folder, args.timeout, phases)
    return 1 if outcome is None else report(layout, outcome, phases)


if __name__ == "__main__":
    sys.exit(main())
