"""The preprocess forkserver ends with the worker, without a teardown that holds the worker's pipes."""

from __future__ import annotations

import json
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


START_SCRIPT = """
import json, os, sys, tempfile, threading, time

import tests.fault_hooks  # the caller has imported the hook: a server forked from it needs no import
from airflow_antbatch.worker import forkserver
from airflow_antbatch.worker.preprocess_pool import PreprocessPool
from tests.worker.test_preprocess_pool import _batch

if __name__ == "__main__":
    if sys.argv[1] == "threaded":
        stop = threading.Event()
        threading.Thread(target=stop.wait, daemon=True).start()
    kept = tempfile.TemporaryFile()
    held = kept.fileno()  # the worker's own descriptor: not the server's to hold
    started = time.monotonic()
    forkserver.start("tests.fault_hooks:preprocess")
    pool = PreprocessPool("tests.fault_hooks:frozen_objects", 1)
    pool.wait_ready()
    ready_s = time.monotonic() - started
    import multiprocessing.forkserver
    server = multiprocessing.forkserver._forkserver._forkserver_pid
    with open(f"/proc/{server}/cmdline", "rb") as theirs, open("/proc/self/cmdline", "rb") as mine:
        spawned = theirs.read() != mine.read()  # a spawned server runs its own command line
    server_files = {os.readlink(f"/proc/{server}/fd/{fd}") for fd in os.listdir(f"/proc/{server}/fd")}
    pool.submit(0, _batch(["shop"] * 10))
    outcomes = []
    while not outcomes:
        outcomes.extend(pool.poll(0.5))
    pool.close()
    print(json.dumps({
        "spawned": spawned,
        "ready_s": ready_s,
        "holds_worker_file": os.readlink(f"/proc/self/fd/{held}") in server_files,
        "rows": sum(o.batch.num_rows for o in outcomes),
        "frozen": int(outcomes[0].output[0]),
    }))
"""


@pytest.mark.slow
@pytest.mark.parametrize("caller", ["single-threaded", "threaded"])
def test_a_caller_that_imported_the_hook_forks_the_server_only_without_other_threads(caller: str) -> None:
    """Forked, the server costs no second torch import; with another Python thread alive (which
    could hold a lock the fork would copy held) the caller spawns one, as before. Either way
    the server holds none of the worker's descriptors, the children preprocess, and what the
    server imported is frozen out of the children's garbage collections."""
    root = pathlib.Path(__file__).parents[2]
    done = subprocess.run(
        [sys.executable, "-c", START_SCRIPT, caller], cwd=root, capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert result["spawned"] is (caller == "threaded")
    assert not result["holds_worker_file"]
    assert result["rows"] == 10
    assert result["frozen"] > 10_000, result  # torch's objects, the hook's: about 100,000 here
    if caller == "single-threaded":
        assert result["ready_s"] < 1.0, result  # a spawned server imports torch first: about 1.4 s here
