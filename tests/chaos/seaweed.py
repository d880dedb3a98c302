"""A SeaweedFS server that can be stopped and started again on the same ports and data.

The store-outage fault needs the object store itself to go away and come back with what it
held: the same ``weed server`` command line (ports, data directory) is simply run again.
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
from tests.s3_servers import (
    ACCESS_KEY,
    SEAWEEDFS_START_TIMEOUT_S,
    SEAWEEDFS_STOP_TIMEOUT_S,
    SECRET_KEY,
    S3Server,
    _log_tail,
    _server,
    _stop_group,
    _wait_for_bucket,
    _weed_binary,
    _weed_command,
)


class RestartableSeaweedFS:
    """One ``weed server`` on loopback whose process can be stopped and restarted."""

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
        self.server: S3Server = _server("seaweedfs", f"http://127.0.0.1:{port}")
        self._proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        """Start the server and create the bucket."""
        _wait_for_bucket(self._spawn(), self.server, self._log)

    def restart(self, timeout_s: float = SEAWEEDFS_START_TIMEOUT_S) -> float:
        """Start the stopped server again; returns the seconds until it served a write and a read."""
        started = time.monotonic()
        proc = self._spawn()
        last_error: Exception | None = None
        while time.monotonic() - started < timeout_s:
            if proc.poll() is not None:
                raise RuntimeError(f"weed server exited with {proc.returncode} on restart:\n{_log_tail(self._log)}")
            try:
                _round_trip(self.server)
                return time.monotonic() - started
            except Exception as exc:  # refused, filer not ready yet, ...: keep polling
                last_error = exc
                time.sleep(0.25)
        raise RuntimeError(f"SeaweedFS did not come back in {timeout_s:.0f} s (last error: {last_error!r})")

    def _spawn(self) -> subprocess.Popen[bytes]:
        with self._log.open("ab") as log_file:
            self._proc = subprocess.Popen(self._cmd, stdout=log_file, stderr=subprocess.STDOUT, start_new_session=True)
        return self._proc

    def stop(self) -> None:
        """Stop every process of the server; what it stored stays in its data directory."""
        if self._proc is not None:
            _stop_group(self._proc, SEAWEEDFS_STOP_TIMEOUT_S)
            self._proc = None
        for sock in self._grpc_sockets:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(sock)


def _round_trip(server: S3Server) -> None:
    """One write and one read in the bucket, as the workers do them: the server is really back."""
    store = AtomicStore(f"s3://{server.bucket}", {**server.storage_options, "skip_instance_cache": True})
    store.put("chaos-probe", b"")
    if store.read("chaos-probe") is None:
        raise FileNotFoundError("the probe just written is not there yet")


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
