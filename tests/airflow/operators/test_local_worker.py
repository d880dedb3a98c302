"""LocalBatchWorkerOperator: runs the worker CLI, maps its exit codes, leaves no process behind."""

from __future__ import annotations

import logging
import os
import sys
import threading
import time
from typing import TYPE_CHECKING, Any

import psutil  # type: ignore[import-untyped]
import pytest
from airflow.sdk.exceptions import AirflowException, AirflowFailException

from airflow_antbatch import exit_codes
from airflow_antbatch.ledger import Ledger
from airflow_antbatch.operators.local_worker import LocalBatchWorkerOperator, _level_of
from airflow_antbatch.operators.plan import PlanBatchInferenceOperator
from tests.airflow.conftest import TABULAR, FakeTaskInstance, FinishedJob
from tests.conftest import write_transactions

if TYPE_CHECKING:
    import pathlib


def _worker(**kwargs: Any) -> LocalBatchWorkerOperator:
    return LocalBatchWorkerOperator(task_id="worker", plan_uri="mem://plan.json", worker_id="worker-0", **kwargs)


def test_a_finished_worker_returns_its_summary(finished_job: FinishedJob) -> None:
    summary = finished_job.worker_summary
    assert summary["outcome"] == "finished"
    assert summary["shards_committed"] == 4 and summary["rows_committed"] == finished_job.rows


@pytest.mark.parametrize(
    ("code", "error", "message"),
    [
        (exit_codes.PREEMPTED, AirflowException, "preempted .SIGTERM., shards released; retry continues"),
        (exit_codes.ERROR, AirflowException, "exited with code 1"),
        (-9, AirflowException, "killed by SIGKILL"),
    ],
)
def test_exit_codes_become_clear_task_failures(code: int, error: type[Exception], message: str) -> None:
    with pytest.raises(error, match=message) as info:
        _worker()._raise_for(code, {})
    assert not isinstance(info.value, AirflowFailException)  # these are worth a retry


def test_shards_failed_for_good_fail_the_task_without_retries() -> None:
    with pytest.raises(AirflowFailException, match=r"2 shards failed for good .* \['s1', 's2'\]"):
        _worker()._raise_for(exit_codes.SHARDS_FAILED, {"failed_for_good": ["s1", "s2"]})


def test_the_cpu_budget_defaults_to_a_share_of_the_cpus(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(os, "sched_getaffinity", lambda _pid: set(range(8)), raising=False)
    assert _worker(workers_on_host=3).default_cpu_budget() == 2
    assert _worker(workers_on_host=16).default_cpu_budget() == 1
    assert LocalBatchWorkerOperator.launcher_defaults(max_workers=3) == {"workers_on_host": 3}


@pytest.mark.parametrize(
    ("kwargs", "flags"),
    [
        ({"workers_on_host": 4}, ["--cpu-budget", "2", "--drain-s", "5.0"]),  # kill_grace_s 20, less 15
        (
            {"cpu_budget": 3, "preprocess_workers": 0, "torch_threads": 1, "kill_grace_s": 60.0},
            ["--cpu-budget", "3", "--preprocess-workers", "0", "--torch-threads", "1", "--drain-s", "45.0"],
        ),
    ],
)
def test_the_worker_command_carries_the_sizing_options(
    kwargs: dict[str, float], flags: list[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(os, "sched_getaffinity", lambda _pid: set(range(8)), raising=False)
    commands: list[list[str]] = []
    op = _worker(**kwargs)
    monkeypatch.setattr(op, "_run", lambda cmd: commands.append(cmd) or exit_codes.OK)
    op.execute(FakeTaskInstance().context())
    [cmd] = commands
    assert cmd[cmd.index("--worker-id") + 2 : cmd.index("--summary-file")] == flags


def _alive(proc: psutil.Process) -> bool:
    try:
        return bool(proc.is_running() and proc.status() != psutil.STATUS_ZOMBIE)
    except psutil.NoSuchProcess:
        return False


_STUBBORN = """
import signal, subprocess, sys, time
signal.signal(signal.SIGTERM, signal.SIG_IGN)
child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
print("ready", child.pid, flush=True)
time.sleep(60)
"""


def test_on_kill_escalates_to_sigkill_and_leaves_no_orphan() -> None:
    op = _worker(kill_grace_s=0.5)
    codes: list[int] = []
    runner = threading.Thread(target=lambda: codes.append(op._run([sys.executable, "-c", _STUBBORN])))
    runner.start()
    deadline = time.monotonic() + 30
    while (op._proc is None or not psutil.Process(op._proc.pid).children()) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert op._proc is not None
    family = [psutil.Process(op._proc.pid), *psutil.Process(op._proc.pid).children(recursive=True)]
    assert len(family) == 2
    op.on_kill()
    runner.join(timeout=30)
    assert codes == [-9]
    assert not any(_alive(p) for p in family)


@pytest.mark.slow
@pytest.mark.parametrize(
    ("kill_grace_s", "committed"),
    [(15.0, False), (60.0, True)],
    ids=["releases", "drains"],  # no drain budget left after the margin; 45 s to finish the shard
)
def test_on_kill_sigterms_the_worker_which_releases_its_shard(
    tmp_path: pathlib.Path,
    monkeypatch: pytest.MonkeyPatch,
    subprocess_env: dict[str, str],
    kill_grace_s: float,
    committed: bool,
) -> None:
    """The worker exits as preempted either way: its shard given back, or finished first (NOTE
    [drain] in worker/drain.py)."""
    write_transactions(tmp_path / "in", files=1, rows_per_file=2000, row_group_size=1000)
    monkeypatch.setenv("ANTBATCH_TEST_BATCH_DELAY", "0.5")
    monkeypatch.setenv("ANTBATCH_TEST_MARKER_DIR", str(tmp_path / "scoring"))
    (tmp_path / "scoring").mkdir()
    ti = FakeTaskInstance()
    [kwargs] = PlanBatchInferenceOperator(
        task_id="plan",
        input_uri=str(tmp_path / "in"),
        output_uri=str(tmp_path / "out"),
        model="tests.slow_model:build_slow_model",
        preprocess=f"{TABULAR}:preprocess",
        max_shard_rows=2000,
        max_workers=1,
    ).execute(ti.context())
    op = LocalBatchWorkerOperator(
        task_id="worker",
        plan_uri=kwargs["plan_uri"],
        worker_id=kwargs["worker_id"],
        torch_threads=1,
        kill_grace_s=kill_grace_s,
    )
    errors: list[BaseException] = []

    def run() -> None:
        try:
            op.execute(FakeTaskInstance().context())
        except BaseException as exc:
            errors.append(exc)

    runner = threading.Thread(target=run)
    runner.start()
    deadline = time.monotonic() + 60
    while not any((tmp_path / "scoring").iterdir()) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert op._proc is not None
    worker = psutil.Process(op._proc.pid)
    op.on_kill()
    runner.join(timeout=60)
    assert not _alive(worker)
    assert len(errors) == 1 and "preempted" in str(errors[0]) and not isinstance(errors[0], AirflowFailException)
    status = Ledger.open(str(ti.xcom["plan_uri"])).status()
    # Committed, or released and ready for a retry: never left leased.
    assert (status.committed, status.leased, status.pending) == (committed, 0, not committed)


@pytest.mark.parametrize(
    ("line", "level"),
    [
        ("2026-11-26 21:06:50,747 ERROR airflow_antbatch.worker.loop: shard failed", logging.ERROR),
        ("2026-11-26 21:06:50,747 WARNING airflow_antbatch.cli: signal 15", logging.WARNING),
        ("2026-11-26 21:06:50,747 INFO airflow_antbatch.worker.run: starting", logging.INFO),
        ("Traceback (most recent call last):", logging.INFO),
    ],
)
def test_worker_log_lines_keep_their_level(line: str, level: int) -> None:
    assert _level_of(line) == level
