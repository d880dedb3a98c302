"""The ``local`` launcher: one mapped task runs one ``antbatch worker`` subprocess.

It runs the very command a Kubernetes pod runs, on the Airflow worker itself: the embedded
mode for laptops, the demo and the tests.

The child stays in the task's process group, so when Airflow's supervisor signals the group
(task killed, marked failed, timed out) the worker gets the signal too; ``on_kill`` and every
exit path of ``execute`` also stop it (SIGTERM, a grace period, then SIGKILL of it and anything
it started), so no worker outlives its task.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import signal
import subprocess
import tempfile
from typing import TYPE_CHECKING, Any

import psutil  # type: ignore[import-untyped]  # an Airflow dependency; no stubs installed

from airflow_antbatch.operators.worker_exit import raise_for_exit
from airflow_antbatch.plugins.links import AntBatchJobLink
from airflow_antbatch.version_compat import BaseOperator

if TYPE_CHECKING:
    from collections.abc import Sequence

    from airflow_antbatch.version_compat import Context


class LocalBatchWorkerOperator(BaseOperator):
    """Runs one elastic worker until no shard is left for it; returns the worker's summary.

    The summary (shards and rows committed, shards skipped, throughput) is the XCom return
    value, for the UI and downstream tasks; the ledger stays the source of truth.

    :param plan_uri: the plan written by the plan task (mapped from its output).
    :param worker_id: stable id of this worker slot, e.g. ``worker-0`` (mapped likewise).
    :param slot: ``"I/N"``, the share of the plan this worker claims first (mapped likewise);
        None starts from a point hashed from the worker id.
    :param storage_options: fsspec options for the ledger's store (no credentials).
    :param cpu_budget: cores this worker may use for preprocess processes and model threads;
        default ``max(1, CPUs // workers_on_host)``, counted on the machine that runs the task.
    :param preprocess_workers: a fixed preprocess pool size (0: in a thread); default elastic, or
        a thread when the budget is one core (a process there would only take turns with the
        model thread, after a torch import of its own).
    :param torch_threads: model intra-op threads; default derived from the CPU budget.
    :param workers_on_host: how many local workers may run side by side on one machine.
    :param kill_grace_s: how long a stopped worker gets before SIGKILL: it finishes the shards in
        hand that commit within this less 15 s, and releases the others.
    """

    template_fields: Sequence[str] = ("plan_uri", "worker_id", "slot")
    ui_color = "#fef3e8"
    operator_extra_links = (AntBatchJobLink(),)  # the job's progress page in the Airflow UI

    def __init__(
        self,
        *,
        plan_uri: str,
        worker_id: str,
        slot: str | None = None,
        storage_options: dict[str, Any] | None = None,
        cpu_budget: int | None = None,
        preprocess_workers: int | None = None,
        torch_threads: int | None = None,
        workers_on_host: int = 1,
        kill_grace_s: float = 20.0,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        self.plan_uri = plan_uri
        self.worker_id = worker_id
        self.slot = slot
        self.storage_options = storage_options
        self.cpu_budget = cpu_budget
        self.preprocess_workers = preprocess_workers
        self.torch_threads = torch_threads
        self.workers_on_host = workers_on_host
        self.kill_grace_s = kill_grace_s
        self._proc: subprocess.Popen[str] | None = None

    @classmethod
    def launcher_defaults(cls, *, max_workers: int) -> dict[str, Any]:
        """Builder hook: all of a job's local workers may share one machine's CPUs."""
        return {"workers_on_host": max_workers}

    def execute(self, context: Context) -> dict[str, Any]:
        from airflow_antbatch.worker.drain import drain_budget
        from airflow_antbatch.worker.local import worker_command

        with tempfile.TemporaryDirectory(prefix="antbatch-") as tmp:
            summary_file = os.path.join(tmp, "summary.json")
            cmd = worker_command(
                self.plan_uri,
                self.worker_id,
                slot=self.slot,
                storage_options=self.storage_options,
                cpu_budget=self.cpu_budget or self.default_cpu_budget(),
                preprocess_workers=self.preprocess_workers,
                torch_threads=self.torch_threads,
                summary_file=summary_file,
                drain_s=drain_budget(self.kill_grace_s),
            )
            self.log.info("Running %s", " ".join(cmd))
            code = self._run(cmd)
            summary = _read_summary(summary_file)
        self._raise_for(code, summary)
        return summary

    def default_cpu_budget(self) -> int:
        # OpenMP threads and preprocess processes of several workers competing for the same
        # cores make inference many times slower: give each worker its share of this machine.
        from airflow_antbatch.worker.local import available_cpus

        return max(1, available_cpus() // max(1, self.workers_on_host))

    def _run(self, cmd: list[str]) -> int:
        proc = subprocess.Popen(
            cmd,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            encoding="utf-8",
            errors="replace",
            bufsize=1,
        )
        self._proc = proc
        try:
            assert proc.stdout is not None
            for line in proc.stdout:
                self.log.log(_level_of(line), "%s", line.rstrip("\n"))
            return proc.wait()
        finally:
            # Whatever ends this loop (an exception, a task timeout), the worker goes with it.
            self._stop(proc)
            if proc.stdout is not None:
                proc.stdout.close()

    def _raise_for(self, code: int, summary: dict[str, Any]) -> None:
        raise_for_exit(self.log, self.worker_id, code, summary)

    def on_kill(self) -> None:
        """SIGTERM the worker (it releases its shard), then SIGKILL after the grace period."""
        if self._proc is not None:
            self._stop(self._proc)

    def _stop(self, proc: subprocess.Popen[str]) -> None:
        if proc.poll() is not None:
            return
        self.log.warning("Stopping %s (pid %d): SIGTERM, SIGKILL in %.0fs", self.worker_id, proc.pid, self.kill_grace_s)
        family = _descendants(proc.pid)
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=self.kill_grace_s)
        except subprocess.TimeoutExpired:
            family += _descendants(proc.pid)
            proc.kill()
            # Timed, never a blocking wait: on_kill may run in a signal handler that interrupted
            # a wait in execute, and Popen's wait lock is not reentrant.
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(timeout=10)
        for child in family:  # whatever the worker started and left behind
            with contextlib.suppress(psutil.Error):
                child.kill()  # psutil checks that the pid was not reused
        psutil.wait_procs(family, timeout=5)


def _level_of(line: str) -> int:
    """The worker's own log level (``asctime LEVEL name: message``), so errors stand out in the UI."""
    head = line[:40]
    for name in ("CRITICAL", "ERROR", "WARNING"):
        if f" {name} " in head:
            return int(getattr(logging, name))
    return logging.INFO


def _read_summary(path: str) -> dict[str, Any]:
    if not os.path.exists(path):
        return {}
    with open(path) as handle:
        data = json.load(handle)
    return data if isinstance(data, dict) else {}


def _descendants(pid: int) -> list[psutil.Process]:
    """Processes the worker started (e.g. preprocess pools), to kill along with it."""
    try:
        return list(psutil.Process(pid).children(recursive=True))
    except psutil.Error:
        return []
