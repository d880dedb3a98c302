"""GCS and Azure Blob beyond the shared conformance suite: many-writer create races, reads and
writes from other processes, version tags, error mapping, whole jobs and a chaos schedule.

Both run on emulators on 127.0.0.1 (tests/cloud_servers.py): fake-gcs-server and Azurite. The
store and ledger conformance suites (tests/test_store.py, tests/test_ledger.py) run on them too,
through ``store_location``. What the emulators do not check is in docs/operations.md.
"""

from __future__ import annotations

import io
import json
import pathlib
import subprocess
import sys
import urllib.parse
from collections import Counter

import pyarrow.parquet as pq
import pytest

from airflow_antbatch import layout
from airflow_antbatch.cli import main as cli_main
from airflow_antbatch.errors import StoreError, UnsupportedStoreError
from airflow_antbatch.finalize import finalize_job
from airflow_antbatch.ledger import Ledger
from airflow_antbatch.planning import plan_job
from airflow_antbatch.spec import JobSpec
from airflow_antbatch.store import AtomicStore
from airflow_antbatch.worker.local import run_local_workers
from tests.chaos.harness import RunResult, run_schedule
from tests.chaos.schedule import LEASE_TTL_S, SIGKILL, Fault, Schedule
from tests.cloud_servers import Emulator, port_is_loopback_only
from tests.conftest import REPO_ROOT, TABULAR, write_transactions
from tests.s3_servers import StoreLocation
from tests.test_store import race_creates

CLOUDS = [pytest.param("gcs", id="gcs"), pytest.param("azure", id="azure")]
RACERS = 24  # separate clients (own connections) racing for one key
RACES = 2
E2E_FILES = 2
E2E_ROWS_PER_SHARD = 50
E2E_SHARDS = 8


@pytest.fixture(params=CLOUDS)
def cloud(request: pytest.FixtureRequest) -> StoreLocation:
    location: StoreLocation = request.getfixturevalue(f"{request.param}_location")
    return location


def _fresh(location: StoreLocation) -> AtomicStore:
    """A store with its own client: no fsspec instance (connections, caches) shared with others."""
    return AtomicStore(location.url, {**location.storage_options, "skip_instance_cache": True})


# -- the primitive ------------------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.parametrize("race", range(RACES))
def test_gcs_and_azure_creates_from_24_clients_have_one_winner(cloud: StoreLocation, race: int) -> None:
    stores = [_fresh(cloud) for _ in range(RACERS)]
    key = f"commits/race-{race}.json"
    winner = race_creates(stores, key)
    assert stores[0].read(key) == f"writer {winner}".encode()
    assert sum(s.counts["create"] for s in stores) == RACERS  # one request each: no retries counted


_OTHER_PROCESS = """
import sys
from airflow_antbatch.store import AtomicStore
store = AtomicStore(sys.argv[1])
print(store.create("commits/00001-b.json", b"from another process"), store.create("commits/00001-b.json", b"again"))
"""


@pytest.mark.slow
def test_gcs_and_azure_reads_see_what_another_process_created_after_a_listing(cloud: StoreLocation) -> None:
    store = AtomicStore(cloud.url, cloud.storage_options)
    store.create("commits/00000-a.json", b"a")
    assert store.list("commits") == ["00000-a.json"]
    done = subprocess.run(
        [sys.executable, "-c", _OTHER_PROCESS, cloud.url], capture_output=True, text=True, cwd=REPO_ROOT, timeout=60
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == ["True", "False"]
    assert store.read("commits/00001-b.json") == b"from another process"
    assert store.create("commits/00001-b.json", b"mine") is False
    assert store.list("commits") == ["00000-a.json", "00001-b.json"]


@pytest.mark.slow
def test_gcs_and_azure_list_versions_change_when_an_object_is_rewritten(cloud: StoreLocation) -> None:
    """The GCS generation / Azure ETag: a heartbeat rewritten with the same bytes still moves."""
    store = AtomicStore(cloud.url, cloud.storage_options)
    store.put("workers/w0.json", b"beat")
    store.create("workers/w1.json", b"still")
    before = store.list_versions("workers")
    store.put("workers/w0.json", b"beat")
    after = store.list_versions("workers")
    assert sorted(after) == ["w0.json", "w1.json"]
    assert after["w0.json"] != before["w0.json"] and after["w1.json"] == before["w1.json"]
    if cloud.backend == "gcs":
        assert after["w0.json"].isdigit()  # the generation, not the MD5 ETag


def _client_error(backend: str) -> Exception:
    if backend == "gcs":
        from gcsfs.retry import HttpError

        return HttpError({"code": 503, "message": "backend unavailable"})
    from azure.core.exceptions import ServiceRequestError

    return ServiceRequestError("connection refused")


@pytest.mark.slow
@pytest.mark.parametrize("op", ["create", "read", "put", "list"])
def test_gcs_and_azure_client_errors_become_store_errors(
    cloud: StoreLocation, monkeypatch: pytest.MonkeyPatch, op: str
) -> None:
    """gcsfs's HttpError and Azure's errors are no OSError; the ledger retries only StoreError."""
    store = _fresh(cloud)
    error = _client_error(cloud.backend)

    def fail(*_args: object, **_kwargs: object) -> None:
        raise error

    for name in ("pipe_file", "cat_file", "find", "ls"):
        monkeypatch.setattr(store.fs, name, fail)
    call = {
        "create": lambda: store.create("a.json", b"1"),
        "read": lambda: store.read("a.json"),
        "put": lambda: store.put("a.json", b"1"),
        "list": lambda: store.list(""),
    }[op]
    with pytest.raises(StoreError) as info:
        call()
    assert info.value.__cause__ is error


# -- a missing client: one line naming the extra ------------------------------------------------


@pytest.mark.parametrize(
    ("url", "module", "extra"),
    [
        ("gs://bucket/ledger", "gcsfs", "gcs"),
        ("gcs://bucket/ledger", "gcsfs", "gcs"),
        ("az://container/ledger", "adlfs", "azure"),
        ("abfs://container/ledger", "adlfs", "azure"),
        ("s3://bucket/ledger", "s3fs", "s3"),
    ],
)
def test_gcs_and_azure_urls_without_their_client_name_the_extra_in_one_line(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], url: str, module: str, extra: str
) -> None:
    from fsspec.registry import _registry  # classes fsspec imported already: forget them for a while

    monkeypatch.setitem(sys.modules, module, None)  # import gcsfs -> ImportError, as when not installed
    for protocol in ("gs", "gcs", "az", "abfs", "abfss", "s3", "s3a"):
        monkeypatch.delitem(_registry, protocol, raising=False)
    with pytest.raises(UnsupportedStoreError) as info:
        AtomicStore(url)
    message = str(info.value)
    assert f'pip install "airflow-antbatch[{extra}]"' in message and url in message and "\n" not in message
    assert info.value.__cause__ is None and info.value.__suppress_context__

    assert cli_main(["status", f"{url}/plan.json"]) != 0
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and f"airflow-antbatch[{extra}]" in err and "Traceback" not in err, err


@pytest.mark.parametrize("url", ["nosuch://bucket/ledger", "oci://bucket/ledger"])
def test_unknown_schemes_and_other_missing_clients_are_one_line_too(
    capsys: pytest.CaptureFixture[str], url: str
) -> None:
    with pytest.raises(UnsupportedStoreError, match="supported: local files, s3://, gs://") as info:
        AtomicStore(url)
    assert url in str(info.value) and "\n" not in str(info.value)
    assert cli_main(["status", f"{url}/plan.json"]) != 0
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "supported:" in err and "Traceback" not in err, err


# -- whole jobs ---------------------------------------------------------------------------------


@pytest.mark.slow
def test_gcs_and_azure_job_with_two_workers_commits_every_row_exactly_once(
    cloud: StoreLocation, tmp_path: pathlib.Path, subprocess_env: dict[str, str]
) -> None:
    """Input, ledger and output all on the store: plan, two ``antbatch worker`` processes, finalize."""
    rows_per_file = E2E_SHARDS // E2E_FILES * E2E_ROWS_PER_SHARD
    table = write_transactions(
        tmp_path / "in", files=E2E_FILES, rows_per_file=rows_per_file, row_group_size=E2E_ROWS_PER_SHARD
    )
    store = AtomicStore(cloud.url, cloud.storage_options)
    for path in sorted((tmp_path / "in").iterdir()):
        store.put(f"in/{path.name}", path.read_bytes())
    spec = JobSpec(
        input_uri=store.uri("in"),
        output_uri=store.uri("out"),
        model=f"{TABULAR}:build_model",
        preprocess=f"{TABULAR}:preprocess",
        postprocess=f"{TABULAR}:postprocess",
        id_column="txn_id",
        batch_size=E2E_ROWS_PER_SHARD,
        max_shard_rows=E2E_ROWS_PER_SHARD,
        lease_ttl_s=8.0,
        storage_options=cloud.storage_options,
    )
    planned = plan_job(spec)
    assert len(planned.plan.shards) == E2E_SHARDS
    assert planned.plan_uri.startswith(cloud.url)

    results = run_local_workers(
        planned.plan_uri,
        ["worker-0", "worker-1"],
        storage_options=cloud.storage_options,
        torch_threads=1,
        preprocess_workers=0,
    )
    assert [r["exit_code"] for r in results] == [0, 0], results
    summaries = [r["summary"] for r in results]
    assert sum(s["shards_committed"] for s in summaries) == E2E_SHARDS, summaries

    ledger = Ledger.open(planned.plan_uri, cloud.storage_options)
    assert len(ledger.store.list(layout.COMMITS_DIR)) == E2E_SHARDS
    manifest = finalize_job(planned.plan_uri, cloud.storage_options)
    assert sorted(f["shard"] for f in manifest["files"]) == sorted(planned.plan.shard_ids)
    assert all(urllib.parse.urlsplit(f["uri"]).scheme == cloud.url.split("://")[0] for f in manifest["files"])
    output = AtomicStore(spec.output_uri, cloud.storage_options)
    ids: Counter[int] = Counter()
    for entry in manifest["files"]:
        data = output.read(entry["path"])
        assert data is not None, entry
        ids.update(pq.read_table(io.BytesIO(data), columns=["txn_id"]).column("txn_id").to_pylist())
    assert ids == Counter(table.column("txn_id").to_pylist())


def _sigkill_schedule(store: str) -> Schedule:
    """Two workers, 8 shards; one worker's pod is SIGKILLed mid-shard and restarted by its slot."""
    return Schedule(
        seed=-2,
        store=store,
        workers=2,
        shards=8,  # a multiple of the harness's 4 input files
        rows_per_shard=20,
        batch_delay_s=0.1,
        lease_ttl_s=LEASE_TTL_S,
        faults=(Fault(SIGKILL, 0.3, 0),),
    )


@pytest.mark.slow
def test_gcs_and_azure_sigkill_schedule_commits_every_row_exactly_once(
    cloud: StoreLocation, tmp_path: pathlib.Path, subprocess_env: dict[str, str]
) -> None:
    result: RunResult = run_schedule(_sigkill_schedule(cloud.backend), cloud, tmp_path, env=subprocess_env)
    record = json.dumps(result.to_dict(), indent=1)
    assert not result.missed and [i.kind for i in result.injected] == [SIGKILL], record
    verdict = result.verdict
    assert (verdict.lost, verdict.duplicated, verdict.problems) == (0, 0, []), record
    assert verdict.wasted_tries <= result.wasted_bound_tries, record


# -- the emulators themselves -------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.parametrize("name", ["fake_gcs", "azurite"])
def test_gcs_and_azure_emulators_listen_on_loopback_only(request: pytest.FixtureRequest, name: str) -> None:
    emulator: Emulator = request.getfixturevalue(name)
    parts = urllib.parse.urlsplit(emulator.endpoint_url)
    assert parts.hostname == "127.0.0.1" and parts.port is not None
    assert port_is_loopback_only(parts.port)
