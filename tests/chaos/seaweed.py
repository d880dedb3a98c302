"""A SeaweedFS server that can be stopped and started again on the same ports and data.

The store-outage fault needs the object store itself to go away and come back with what it
held: the same ``weed server`` command line (ports, data directory) is simply run again.
Clients reach it through a :class:`~tests.chaos.gate.PortGate` that stays closed until the
restarted server serves every sentinel object written before the stop (see gate.py for why).
"""

from __future__ import annotations

import contextlib
import json
import os
import pathlib
import shutil
import subprocess
import tempfile
import time
from collections.abc import Iterator

from airflow_antbatch.store import AtomicStore
from tests.chaos.gate import PortGate
from tests.s3_servers import (
    ACCESS_KEY,
    SEAWEEDFS_START_TIMEOUT_S,
    SEAWEEDFS_STOP_TIMEOUT_S,
    SECRET_KEY,
    S3Server,
    _free_ports,
    _log_tail,
    _server,
    _stop_group,
    _wait_for_bucket,
    _weed_binary,
    _weed_command,
)

# Objects written before each stop and read back after the restart before clients may reach
# it again: enough to land in every volume the server writes to.
SENTINELS = 64


class RestartableSeaweedFS:
    """One ``weed server`` on loopback, behind a gate, whose process can be stopped and restarted."""

    def __init__(self, workdir: pathlib.Path) -> None:
        s3_config = workdir / "s3.json"
        identity = {
            "name": "antbatch-chaos",
            "credentials": [{"accessKey": ACCESS_KEY, "secretKey": SECRET_KEY}],
            "actions": ["Admin", "Read", "Write", "List"],
        }
        s3_config.write_text(json.dumps({"identities": [identity]}))
        self._cmd, port, self._grpc_sockets = _weed_command(_weed_binary(), workdir, s3_config, 16)
        self._log = workdir / "weed.log"
        self._direct = _server("seaweedfs", f"http://127.0.0.1:{port}")  # the server itself, for the checks
        (public,) = _free_ports(1)
        self._gate = PortGate(public, ("127.0.0.1", port))
        self.server: S3Server = _server("seaweedfs", f"http://127.0.0.1:{public}")  # what clients use
        self._proc: subprocess.Popen[bytes] | None = None
        self._stops = 0

    def start(self) -> None:
        """Start the server, create the bucket and let clients in."""
        _wait_for_bucket(self._spawn(), self._direct, self._log)
        self._gate.open()

    def stop(self) -> None:
        """Shut clients out and stop every process of the server; what it stored stays on disk."""
        self._gate.close()
        if self._proc is not None:
            self._stops += 1
            with contextlib.suppress(Exception):  # a server already failing is stopped all the same
                _write_sentinels(self._direct, self._stops)
            _stop_group(self._proc, SEAWEEDFS_STOP_TIMEOUT_S)
            self._proc = None
        for sock in self._grpc_sockets:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(sock)

    def restart(self, timeout_s: float = SEAWEEDFS_START_TIMEOUT_S) -> float:
        """Start the stopped server again and open the gate once it serves what it held; returns
        the seconds that took."""
        started = time.monotonic()
        proc = self._spawn()
        last_error: Exception | None = None
        while time.monotonic() - started < timeout_s:
            if proc.poll() is not None:
                raise RuntimeError(f"weed server exited with {proc.returncode} on restart:\n{_log_tail(self._log)}")
            try:
                _check_sentinels(self._direct, self._stops)
                self._gate.open()
                return time.monotonic() - started
            except Exception as exc:  # refused, filer not ready, older objects not served yet, ...
                last_error = exc
                time.sleep(0.25)
        raise RuntimeError(f"SeaweedFS did not come back in {timeout_s:.0f} s (last error: {last_error!r})")

    def _spawn(self) -> subprocess.Popen[bytes]:
        with self._log.open("ab") as log_file:
            self._proc = subprocess.Popen(self._cmd, stdout=log_file, stderr=subprocess.STDOUT, start_new_session=True)
        return self._proc


def _sentinel_store(server: S3Server) -> AtomicStore:
    return AtomicStore(f"s3://{server.bucket}/_chaos", {**server.storage_options, "skip_instance_cache": True})


def _write_sentinels(server: S3Server, stop: int) -> None:
    store = _sentinel_store(server)
    for i in range(SENTINELS):
        store.create(f"stop-{stop}/{i:03d}", f"{stop}:{i}".encode())


def _check_sentinels(server: S3Server, stop: int) -> None:
    """Every sentinel of the last stop reads back, and create-if-absent over one is refused."""
    store = _sentinel_store(server)
    for i in range(SENTINELS):
        rel = f"stop-{stop}/{i:03d}"
        if store.read(rel) != f"{stop}:{i}".encode():
            raise FileNotFoundError(f"{store.uri(rel)}, written before the stop, is not served yet")
    if store.create(f"stop-{stop}/000", b"again"):
        raise RuntimeError("create-if-absent over an object written before the stop succeeded")


@contextlib.contextmanager
def restartable_seaweedfs() -> Iterator[RestartableSeaweedFS]:
    """A started :class:`RestartableSeaweedFS`, stopped and removed on exit."""
    workdir = pathlib.Path(tempfile.mkdtemp(prefix="antbatch-chaos-weed-"))
    weed = RestartableSeaweedFS(workdir)
    try:
        weed.start()
        yield weed
    finally:
        weed.stop()
        shutil.rmtree(workdir, ignore_errors=True)
