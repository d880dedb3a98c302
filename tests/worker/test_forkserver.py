"""The preprocess forkserver ends with the worker, without a teardown that holds the worker's pipes."""

from __future__ import annotations

import pathlib
import subprocess
import sys
import threading
import time

import pytest

SCRIPT = """
from airflow_antbatch.worker import forkserver
from airflow_antbatch.worker.preprocess_pool import PreprocessPool

if __name__ == "__main__":
    forkserver.start("tests.fault_hooks:preprocess")
    pool = PreprocessPool("tests.fault_hooks:preprocess", 1)
    pool.wait_ready()
    pool.close()
"""


@pytest.mark.slow
def test_the_server_lets_go_of_the_workers_output_as_the_worker_exits() -> None:
    """The server inherits stdout and stderr; torch's exit handlers alone used to keep them open
    about half a second after the worker had gone, and a caller reading them waited."""
    root = pathlib.Path(__file__).parents[2]
    gaps = []
    for _ in range(2):
        proc = subprocess.Popen(
            [sys.executable, "-c", SCRIPT], cwd=root, stdout=subprocess.PIPE, stderr=subprocess.PIPE
        )
        exited: list[float] = []
        waiter = threading.Thread(target=lambda p=proc, e=exited: (p.wait(), e.append(time.monotonic())))
        waiter.start()
        _, err = proc.communicate(timeout=300)
        closed = time.monotonic()
        waiter.join()
        assert proc.returncode == 0, err.decode()[-3000:]
        gaps.append(closed - exited[0])
    assert min(gaps) < 0.2, gaps  # about 0.5 s with the teardown, on a quiet machine
