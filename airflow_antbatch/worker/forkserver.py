"""Where preprocess processes come from: a forkserver that has imported torch and the hook once.

Started early, it imports them on another core while this process plans and loads the model.
Nothing waits for it: starting a child blocks until the server has imported its modules, so
the pool starts its first children from a thread of its own, and the worker preprocesses the
first batches itself until one is ready (``preprocess_stage``). The second torch import is
then paid beside scoring, not before it. This module imports nothing heavy, so that starting
the server is the first thing a worker does.
"""

from __future__ import annotations

import multiprocessing
import multiprocessing.forkserver
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
