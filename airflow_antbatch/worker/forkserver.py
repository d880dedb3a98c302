"""Where preprocess processes come from: a forkserver that has imported torch and the hook once.

Started early, it imports them on another core while this process plans and loads the model.
Nothing waits for it: starting a child blocks until the server has imported its modules, so
the pool starts its first children from a thread of its own, and the worker preprocesses the
first batches itself until one is ready (``preprocess_stage``). The second torch import is
then paid beside scoring, not before it. This module imports nothing heavy, so that starting
the server is the first thing a worker does.
"""

from __future__ import annotations

import atexit
import multiprocessing
import multiprocessing.forkserver
import os
import sys
from typing import Any

# The preprocess processes' own module: the server imports it (and torch with it) once.
POOL_MODULE = "airflow_antbatch.worker.preprocess_pool"


def context(preprocess_ref: str) -> Any:
    """forkserver where there is one: children fork from a clean server that has imported the
    user's module once, so replacing a dead child costs milliseconds, and no child inherits
    this process's threads or torch state. Elsewhere (macOS before 3.14 has one; Windows not),
    spawn."""
    if "forkserver" not in multiprocessing.get_all_start_methods():
        return multiprocessing.get_context("spawn")
    ctx = multiprocessing.get_context("forkserver")
    ctx.set_forkserver_preload([POOL_MODULE, preprocess_ref.partition(":")[0]])
    return ctx


def start(preprocess_ref: str) -> None:
    """Start the server now; it imports in the background (the call does not wait for it).

    A server already running keeps the modules it preloaded: one per process, as
    multiprocessing has it, which is one job's hook in a worker.
    """
    if context(preprocess_ref).get_start_method() == "forkserver":
        multiprocessing.forkserver.ensure_running()


def preloaded() -> None:
    """Called as ``POOL_MODULE`` is imported; in the server, as it preloads, makes its exit skip the
    interpreter's teardown.

    The server ends when the worker does, and torch's exit handlers alone then take about half
    a second, while the server still holds the worker's stdout and stderr: whoever reads them (a
    shell pipe, ``subprocess.run``) waited that long after the worker had gone. Exit handlers run
    last registered first, so this one, registered after torch's, ends the process before them.
    The server writes nothing, and its children end with ``os._exit`` as multiprocessing has them.
    """
    frame = sys._getframe(1)
    while frame is not None:
        if frame.f_code is multiprocessing.forkserver.main.__code__:
            atexit.register(os._exit, 0)
            return
        frame = frame.f_back  # type: ignore[assignment]
