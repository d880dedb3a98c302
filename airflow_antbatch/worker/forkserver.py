"""Where preprocess processes come from: a forkserver that has imported torch and the hook once.

Started early, it imports them on another core while this process plans and loads the model.
Nothing waits for it: starting a child blocks until the server has imported its modules, so
the pool starts its first children from a thread of its own, and the worker preprocesses the
first batches itself until one is ready (``preprocess_stage``). The second torch import is
then paid beside scoring, not before it. This module imports nothing heavy, so that starting
the server is the first thing a worker does.

A caller that has imported the hook already and runs no other Python thread (a script or
notebook calling ``run_worker`` in-process, the benchmark's worker) gets a server forked from
itself instead (``_fork_server``): no second import, and a first child ready in about 0.2 s
instead of 1.4 s on 2 cores. ``antbatch run`` and pod workers start the server before they
import the hook, so theirs is spawned, and its import overlaps their own.
"""

from __future__ import annotations

import atexit
import gc
import importlib
import inspect
import multiprocessing
import multiprocessing.forkserver
import os
import signal
import socket
import sys
import threading
from multiprocessing import connection, resource_tracker
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
    # The pool's module last: as it is imported, the server has imported everything (``preloaded``).
    ctx.set_forkserver_preload([preprocess_ref.partition(":")[0], POOL_MODULE])
    return ctx


def start(preprocess_ref: str) -> None:
    """Start the server now; it imports in the background (the call does not wait for it).

    A server already running keeps the modules it preloaded: one per process, as
    multiprocessing has it, which is one job's hook in a worker.
    """
    if context(preprocess_ref).get_start_method() != "forkserver":
        return
    if not _fork_server(preprocess_ref):
        multiprocessing.forkserver.ensure_running()


def _fork_server(preprocess_ref: str) -> bool:
    """Start the server as a fork of this process where that is safe, so that it needs no import.

    A caller that has imported the hook already (a script or notebook running the worker
    in-process) would otherwise pay a second torch import in the server, on a core the job
    needs: on 2 cores, about 1.3 s of a 3 s job. Forking is safe here only with no other Python
    thread (one could hold a lock the server needs) and on the multiprocessing versions whose
    server entry point this mirrors; elsewhere the caller spawns a server as before.
    """
    module = preprocess_ref.partition(":")[0]
    server: Any = multiprocessing.forkserver._forkserver  # its private fields, as its own ensure_running sets them
    if module not in sys.modules or threading.active_count() != 1 or not _server_entry_known(server):
        return False
    importlib.import_module(POOL_MODULE)  # the children's own module, as the spawned server preloads it
    with server._lock:
        resource_tracker.ensure_running()
        if server._forkserver_pid is not None:
            return False  # one was started: ensure_running keeps it, or replaces it if it died
        with socket.socket(socket.AF_UNIX) as listener:
            address = connection.arbitrary_address("AF_UNIX")  # type: ignore[attr-defined]
            listener.bind(address)
            os.chmod(address, 0o600)
            listener.listen()
            alive_r, alive_w = os.pipe()
            pid = os.fork()
            if pid == 0:  # the server: nothing of the worker's but its modules and stdio
                _serve(listener.fileno(), alive_r)
            os.close(alive_r)
        server._forkserver_address = address
        server._forkserver_alive_fd = alive_w
        server._forkserver_pid = pid
    return True


def _server_entry_known(server: Any) -> bool:
    """Whether this Python's forkserver has the attributes and entry point ``_fork_server`` uses."""
    wanted = ["listener_fd", "alive_r", "preload", "main_path", "sys_path"]
    params = list(inspect.signature(multiprocessing.forkserver.main).parameters)
    fields = ("_lock", "_forkserver_pid", "_forkserver_address", "_forkserver_alive_fd")
    return params == wanted and all(hasattr(server, f) for f in fields)


def _serve(listener_fd: int, alive_r: int) -> None:
    """The forked server's life: multiprocessing's server loop, then exit without teardown."""
    try:
        keep = sorted({0, 1, 2, listener_fd, alive_r})
        for low, high in zip(keep, [*keep[1:], os.sysconf("SC_OPEN_MAX")], strict=True):
            os.closerange(low + 1, high)  # the worker's pipes and sockets are not the server's to hold
        signal.signal(signal.SIGTERM, signal.SIG_DFL)  # the worker's handlers are not the server's
        signal.signal(signal.SIGINT, signal.SIG_DFL)
        gc.freeze()  # see ``preloaded``
        multiprocessing.forkserver.main(listener_fd, alive_r, [])
    finally:
        os._exit(0)


def preloaded() -> None:
    """Called as ``POOL_MODULE`` is imported; in the server, as it preloads (last), freezes what it
    has imported and makes its exit skip the interpreter's teardown.

    Frozen, the objects the server imported (torch's, the hook's) are left out of the children's
    garbage collections. Otherwise a child's first full collection writes to the header of every
    one of them, so the kernel copies each page it shares with the server: the bench's hook,
    which builds its vocabulary on its first batch, took 0.30-0.38 s on that batch in a fresh
    child, and 0.21-0.24 s once frozen (8 children each). It also keeps those pages shared.

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
            gc.freeze()
            return
        frame = frame.f_back  # type: ignore[assignment]
