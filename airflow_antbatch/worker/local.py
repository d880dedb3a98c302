"""The embedded local launcher: N ``antbatch worker`` subprocesses on this machine.

It runs the very command a pod runs, so the local mode exercises the same code path as the
Kubernetes one. SIGTERM and SIGINT sent to the launcher are forwarded to every worker.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import tempfile
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from collections.abc import Sequence
    from types import FrameType


def available_cpus() -> int:
    """CPUs this process may use (its affinity mask, as a pod's cpuset or a taskset sets it)."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def worker_arguments(
    plan_uri: str,
    worker_id: str,
    *,
    storage_options: dict[str, Any] | None = None,
    cpu_budget: int | None = None,
    preprocess_workers: int | None = None,
    torch_threads: int | None = None,
    summary_file: str | None = None,
    slot: str | None = None,
    drain_s: float | None = None,
) -> list[str]:
    """The ``antbatch`` arguments that run one worker, for subprocesses and pods alike.

    Options left as None are left out, so the worker picks its own default.
    """
    args: list[str] = []
    if storage_options:  # a top-level option: it must come before the subcommand
        args += ["--storage-options", json.dumps(storage_options)]
    args += ["worker", "--spec", plan_uri, "--worker-id", worker_id]
    for flag, value in (
        ("--cpu-budget", cpu_budget),
        ("--preprocess-workers", preprocess_workers),  # 0 is a setting: preprocess in a thread
        ("--torch-threads", torch_threads),
        ("--drain-s", drain_s),  # what it may finish on SIGTERM (NOTE [drain] in worker/drain.py)
    ):
        if value is not None:
            args += [flag, str(value)]
    if summary_file:
        args += ["--summary-file", summary_file]
    if slot:  # "I/N": the share of the plan this worker claims first
        args += ["--slot", slot]
    return args


def worker_command(plan_uri: str, worker_id: str, **options: Any) -> list[str]:
    """``antbatch worker`` run by this Python: :func:`worker_arguments` after the interpreter."""
    return [sys.executable, "-m", "airflow_antbatch", *worker_arguments(plan_uri, worker_id, **options)]


def run_local_workers(
    plan_uri: str,
    worker_ids: Sequence[str],
    *,
    storage_options: dict[str, Any] | None = None,
    cpu_budget: int | None = None,
    preprocess_workers: int | None = None,
    torch_threads: int | None = None,
) -> list[dict[str, Any]]:
    """Run the workers side by side and wait; each result has the exit code and the summary.

    ``cpu_budget`` is per worker: workers sharing this machine should each get their share.
    """
    with tempfile.TemporaryDirectory(prefix="antbatch-") as tmp:
        procs = []
        for index, worker_id in enumerate(worker_ids):
            summary_file = os.path.join(tmp, f"{worker_id}.json")
            cmd = worker_command(
                plan_uri,
                worker_id,
                storage_options=storage_options,
                cpu_budget=cpu_budget,
                preprocess_workers=preprocess_workers,
                torch_threads=torch_threads,
                summary_file=summary_file,
                slot=f"{index}/{len(worker_ids)}",
            )
            procs.append((worker_id, summary_file, subprocess.Popen(cmd)))

        def forward(signum: int, _frame: FrameType | None) -> None:
            for _, _, proc in procs:
                if proc.poll() is None:
                    proc.send_signal(signum)

        previous = {s: signal.signal(s, forward) for s in (signal.SIGTERM, signal.SIGINT)}
        try:
            results = []
            for worker_id, summary_file, proc in procs:
                code = proc.wait()
                summary = None
                if os.path.exists(summary_file):
                    with open(summary_file) as handle:
                        summary = json.load(handle)
                results.append({"worker_id": worker_id, "exit_code": code, "summary": summary})
            return results
        finally:
            for signum, handler in previous.items():
                signal.signal(signum, handler)
