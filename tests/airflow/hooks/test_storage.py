"""Airflow connections as the Airflow side's only way to the stores (airflow_antbatch/hooks/storage.py).

Connections are defined as Airflow deployments do, through ``AIRFLOW_CONN_*`` variables (JSON
form). S3 resolves through the installed amazon provider's ``get_fs`` against SeaweedFS;
Azure, whose provider is not installed here, through the connection's own fields against
Azurite. The end-to-end job runs plan, worker pods, sensor, trigger, finalize and the UI page
with no AWS credentials in the Airflow process's environment: the pods get theirs from a
Kubernetes secret, and their specs never hold the connection's secret.
"""

from __future__ import annotations

import asyncio
import collections
import importlib
import json
import uuid
from typing import TYPE_CHECKING, Any

import pyarrow.parquet as pq
import pytest
import s3fs

from airflow_antbatch import layout
from airflow_antbatch.errors import StoreError
from airflow_antbatch.hooks.storage import (
    connection_options,
    job_connection,
    join_conn_id,
    options_from_fields,
    split_conn_id,
    storage_options,
)
from airflow_antbatch.ledger import Ledger
from airflow_antbatch.store import AtomicStore
from tests.airflow.conftest import TABULAR, FakeTaskInstance
from tests.airflow.test_dag_e2e import _load_dag
from tests.cloud_servers import _CLOUD_VARS_TO_CLEAR, AZURITE_ACCOUNT, AZURITE_KEY, BUCKET
from tests.conftest import write_transactions
from tests.s3_servers import _AWS_VARS_TO_CLEAR, ACCESS_KEY, REGION, SECRET_KEY

if TYPE_CHECKING:
    import pathlib
    from collections.abc import Iterator

    import pyarrow as pa

    from tests.cloud_servers import Emulator
    from tests.kube_cluster import KubeCluster
    from tests.s3_servers import S3Server

pytestmark = pytest.mark.airflow
CONN = "antbatch_lake"


def _define(monkeypatch: pytest.MonkeyPatch, conn_id: str, **fields: Any) -> None:
    monkeypatch.setenv(f"AIRFLOW_CONN_{conn_id.upper()}", json.dumps(fields))


@pytest.fixture
def lake(seaweedfs_s3: S3Server, monkeypatch: pytest.MonkeyPatch) -> Iterator[S3Server]:
    """SeaweedFS reachable only through connection ``antbatch_lake``: no AWS credentials in the environment."""
    for name in (*seaweedfs_s3.env, *_AWS_VARS_TO_CLEAR):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")  # nor an instance metadata service
    extra = {"endpoint_url": seaweedfs_s3.endpoint_url, "region_name": REGION}
    _define(monkeypatch, CONN, conn_type="aws", login=ACCESS_KEY, password=SECRET_KEY, extra=extra)
    # fsspec keeps a filesystem per set of options for the life of the process: one that found no
    # credentials here must not serve later tests, whose credentials are in the environment.
    s3fs.S3FileSystem.clear_instance_cache()
    yield seaweedfs_s3
    s3fs.S3FileSystem.clear_instance_cache()


@pytest.mark.parametrize(
    ("uri", "plain", "conn_id"),
    [
        ("s3://lake@bucket/in/x.parquet", "s3://bucket/in/x.parquet", "lake"),
        ("gs://lake@bucket", "gs://bucket", "lake"),
        ("s3://bucket/in/", "s3://bucket/in/", None),
        ("/data/in", "/data/in", None),
        # Azure's own full URLs put the container before '@': not a connection.
        ("abfs://box@account.dfs.core.windows.net/in", "abfs://box@account.dfs.core.windows.net/in", None),
    ],
)
def test_a_uri_names_its_connection_as_object_storage_path_does(uri: str, plain: str, conn_id: str | None) -> None:
    from airflow.sdk import ObjectStoragePath

    assert split_conn_id(uri) == (plain, conn_id)
    if conn_id is not None:
        assert ObjectStoragePath(uri).conn_id == conn_id
        assert join_conn_id(plain, conn_id) == uri


def test_a_job_has_one_connection_and_credentials_never_sit_in_a_uri() -> None:
    conn_id, plain = job_connection(None, {"input_uri": "s3://lake@b/in/", "output_uri": "s3://b/out/", "x": None})
    assert (conn_id, plain) == ("lake", {"input_uri": "s3://b/in/", "output_uri": "s3://b/out/", "x": None})
    with pytest.raises(ValueError, match=r"output_uri 's3://other@b/out/' names connection 'other' but the job's"):
        job_connection("lake", {"output_uri": "s3://other@b/out/"})
    with pytest.raises(ValueError, match="credentials belong in the connection"):
        split_conn_id("s3://AKIA:hunter2@bucket/in/")


@pytest.mark.parametrize(
    ("scheme", "login", "password", "extra", "expected"),
    [
        (
            "s3",
            "AKIA",
            "s3cret",
            {"endpoint_url": "http://minio:9000", "region_name": "eu-west-1", "aws_session_token": "tok"},
            {
                "key": "AKIA",
                "secret": "s3cret",
                "token": "tok",
                "endpoint_url": "http://minio:9000",
                "client_kwargs": {"region_name": "eu-west-1"},
            },
        ),
        (
            "gs",
            None,
            None,
            {"keyfile_dict": '{"type": "service_account"}', "project": "p", "storage_options": {"timeout": 5}},
            {"token": {"type": "service_account"}, "project": "p", "timeout": 5},
        ),
        ("gs", None, None, {"key_path": "/keys/sa.json"}, {"token": "/keys/sa.json"}),
        ("az", "acct", "a2V5", {"sas_token": None}, {"account_name": "acct", "account_key": "a2V5"}),
        (
            "memory",
            "ignored",
            "ignored",
            {"storage_options": {"skip_instance_cache": True}},
            {"skip_instance_cache": True},
        ),
    ],
)
def test_a_connections_own_fields_become_fsspec_options(
    scheme: str, login: str | None, password: str | None, extra: dict[str, Any], expected: dict[str, Any]
) -> None:
    assert options_from_fields(scheme, login, password, extra) == expected


def test_s3_resolves_through_the_amazon_providers_hook_and_only_the_connection_reaches_the_bucket(
    lake: S3Server,
) -> None:
    url = f"s3://{lake.bucket}/{uuid.uuid4().hex}"
    options = connection_options(CONN, url)
    assert options["endpoint_url"] == lake.endpoint_url
    assert asyncio.run(options["session"].get_credentials()).secret_key == SECRET_KEY  # the provider's session
    store = AtomicStore(url, storage_options(CONN, url, lake.storage_options))
    assert store.create("a.json", b"{}") and store.read("a.json") == b"{}"
    with pytest.raises(StoreError, match="Unable to locate credentials"):  # the environment alone has no way in
        AtomicStore(url, dict(lake.storage_options)).read("a.json")
    # Resolved once per OPTIONS_TTL_S: the same session, so fsspec serves the same client again
    # instead of keeping one more for the life of the process (the API server, the triggerer).
    again = storage_options(CONN, url, lake.storage_options)
    assert again["session"] is options["session"] and AtomicStore(url, again).fs is store.fs


def test_azure_without_its_provider_resolves_from_the_connections_fields(
    azurite: Emulator, monkeypatch: pytest.MonkeyPatch
) -> None:
    for name in (*_CLOUD_VARS_TO_CLEAR, *azurite.env):
        monkeypatch.delenv(name, raising=False)
    connection = f"{azurite.env['AZURE_STORAGE_CONNECTION_STRING']}"
    assert AZURITE_KEY in connection and AZURITE_ACCOUNT in connection
    _define(monkeypatch, "antbatch_blob", conn_type="wasb", extra={"connection_string": connection})
    url = f"az://antbatch_blob@{BUCKET}/{uuid.uuid4().hex}"
    plain, conn_id = split_conn_id(url)
    store = AtomicStore(plain, storage_options(conn_id, plain))
    assert store.create("a.json", b"1") and not store.create("a.json", b"2") and store.read("a.json") == b"1"


def test_the_provider_info_names_the_module() -> None:
    from airflow_antbatch.get_provider_info import get_provider_info

    [entry] = get_provider_info()["hooks"]
    [module] = entry["python-modules"]
    assert importlib.import_module(module).storage_options is storage_options


def test_an_undefined_connection_is_an_error_that_names_it() -> None:
    with pytest.raises(Exception, match="antbatch_nowhere"):
        storage_options("antbatch_nowhere", "s3://bucket/x")


def _upload_input(lake: S3Server, root: pathlib.Path, rows: int) -> tuple[str, pa.Table]:
    """Parquet input in a fresh s3://bucket/<uuid>, written with the connection's options."""
    table = write_transactions(root / "in", files=2, rows_per_file=rows // 2, row_group_size=rows // 4)
    prefix = f"s3://{lake.bucket}/{uuid.uuid4().hex}"
    store = AtomicStore(f"{prefix}/in", storage_options(CONN, prefix, lake.storage_options))
    for path in sorted((root / "in").iterdir()):
        store.put(path.name, path.read_bytes())
    return prefix, table


def test_the_plan_reads_through_the_connection_and_gives_workers_no_secret(
    lake: S3Server, tmp_path: pathlib.Path
) -> None:
    from airflow_antbatch.operators.plan import PlanBatchInferenceOperator
    from airflow_antbatch.worker.local import worker_command

    prefix, _ = _upload_input(lake, tmp_path, rows=400)
    ti = FakeTaskInstance()
    plan = PlanBatchInferenceOperator(
        task_id="plan",
        input_uri=join_conn_id(f"{prefix}/in/", CONN),  # the URI form: s3://antbatch_lake@bucket/...
        output_uri=join_conn_id(f"{prefix}/out/", CONN),
        model=f"{TABULAR}:build_model",
        id_column="txn_id",
        max_shard_rows=100,
        storage_options=lake.storage_options,
    )
    workers = plan.execute(ti.context())
    pushed, conn_id = split_conn_id(str(ti.xcom["plan_uri"]))
    assert conn_id == CONN and pushed == workers[0]["plan_uri"] == f"{prefix}/out/_antbatch/{layout.plan_rel(0)}"
    options = storage_options(CONN, prefix, lake.storage_options)
    assert Ledger.open(pushed, options).plan.spec.input_uri == f"{prefix}/in/"
    plan_file = AtomicStore(prefix, options).read(f"out/_antbatch/{layout.plan_rel(0)}")
    assert plan_file is not None
    command = " ".join(worker_command(**workers[0], storage_options=lake.storage_options))
    for text in (plan_file.decode(errors="replace"), command):
        assert SECRET_KEY not in text and ACCESS_KEY not in text and f"{CONN}@" not in text


def test_the_merge_reads_and_writes_through_the_connection(lake: S3Server) -> None:
    from airflow_antbatch.operators.merge import SmallFileMergeOperator

    prefix = f"s3://{lake.bucket}/{uuid.uuid4().hex}"
    objects = AtomicStore(f"{prefix}/objs", storage_options(CONN, prefix, lake.storage_options))
    for i in range(5):
        objects.put(f"{i}.bin", bytes([i]) * 100)
    ti = FakeTaskInstance()
    result = SmallFileMergeOperator(
        task_id="merge",
        sources=join_conn_id(f"{prefix}/objs/", CONN),
        output_uri=join_conn_id(f"{prefix}/packs", CONN),
        storage_options=lake.storage_options,
    ).execute(ti.context())
    assert (result["objects"], result["unreadable"]) == (5, [])
    assert split_conn_id(str(ti.xcom["input_uri"])) == (result["output_uri"], CONN)  # for the plan task


@pytest.fixture
def cluster(tmp_path: pathlib.Path, subprocess_env: dict[str, str]) -> Iterator[KubeCluster]:
    from tests.kube_cluster import run_kube_cluster

    (tmp_path / "cluster").mkdir()
    with run_kube_cluster(tmp_path / "cluster", entrypoints={"antbatch-worker:test": ["antbatch"]}) as cluster:
        yield cluster
    assert not cluster.kubelet.errors, cluster.kubelet.errors


@pytest.mark.slow
@pytest.mark.filterwarnings("ignore:Exception ignored in. <socket.socket:pytest.PytestUnraisableExceptionWarning")
def test_a_dag_whose_airflow_tasks_reach_s3_only_through_the_connection(
    airflow_db: pathlib.Path,
    lake: S3Server,
    cluster: KubeCluster,
    tmp_path: pathlib.Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from kubernetes.client import V1ObjectMeta, V1Secret

    prefix, table = _upload_input(lake, tmp_path, rows=400)
    cluster.client.create_namespaced_secret(
        cluster.namespace,
        V1Secret(
            metadata=V1ObjectMeta(name="lake-s3-credentials"),
            string_data={"AWS_ACCESS_KEY_ID": ACCESS_KEY, "AWS_SECRET_ACCESS_KEY": SECRET_KEY},
        ),
    )
    monkeypatch.setenv("ANTBATCH_TEST_S3_ROOT", prefix)
    monkeypatch.setenv("ANTBATCH_TEST_S3_ENDPOINT", lake.endpoint_url)
    monkeypatch.setenv("ANTBATCH_TEST_KUBECONFIG", str(cluster.kubeconfig))

    run = _load_dag("antbatch_connection_dags.py", "antbatch_connection").test()
    assert run.state == "success", {ti.task_id: ti.state for ti in run.get_task_instances()}
    options = storage_options(CONN, prefix, lake.storage_options)
    summary = run.get_task_instance("batch_inference.finalize").xcom_pull(task_ids="batch_inference.finalize")
    output = AtomicStore(summary["output_uri"], options)
    ids = [
        i
        for f in json.loads(output.read("_SUCCESS") or b"{}")["files"]
        for i in pq.read_table(output.fs.open(output.path(f["path"]))).column("txn_id").to_pylist()
    ]
    assert collections.Counter(ids) == collections.Counter(table.column("txn_id").to_pylist())

    # The pods had the Kubernetes secret's name, never the connection's values.
    pods = [p for p in cluster.created_pods() if p["metadata"]["labels"].get("task_id") == "batch_inference.worker"]
    assert pods and all(r.base().exit_code == 0 for r in cluster.kubelet.runs)
    for pod in pods:
        text = json.dumps(pod)
        assert SECRET_KEY not in text and ACCESS_KEY not in text and CONN not in text
        assert "lake-s3-credentials" in text

    # The sensor's trigger, deferred, reads the finished ledger in the "triggerer" through the
    # connection it names: its persisted kwargs hold the connection's name, not a secret.
    plan_uri = run.get_task_instance("batch_inference.plan").xcom_pull(task_ids="batch_inference.plan", key="plan_uri")
    assert split_conn_id(plan_uri)[1] == CONN
    _trigger_settles(plan_uri)
    _the_page_reads_the_run_through_the_connection(run, plan_uri, table.num_rows)


def _trigger_settles(plan_uri: str) -> None:
    from airflow_antbatch.triggers.ledger import ShardLedgerTrigger

    trigger = ShardLedgerTrigger(plan_uri=plan_uri, poll_interval=0.1)
    assert SECRET_KEY not in json.dumps(trigger.serialize())

    async def first_event() -> Any:
        async for event in trigger.run():
            return event.payload

    event = asyncio.run(first_event())
    assert event["status"] == "success", event


def _the_page_reads_the_run_through_the_connection(run: Any, plan_uri: str, rows: int) -> None:
    """The UI's routes: a run's job and manifest (plan URI from XCom), and a job by a plan URI naming the connection."""
    from airflow.api_fastapi.app import create_app
    from fastapi.testclient import TestClient

    from tests.airflow.plugins.conftest import token

    with TestClient(create_app("core")) as client:
        headers = {"Authorization": f"Bearer {token()}"}  # signed by the app's auth manager
        job = client.get(f"/antbatch/api/dags/{run.dag_id}/runs/{run.run_id}/job", headers=headers)
        manifest = client.get(f"/antbatch/api/dags/{run.dag_id}/runs/{run.run_id}/manifest", headers=headers)
        by_uri = client.get("/antbatch/api/job", params={"plan_uri": plan_uri}, headers=headers)
        nowhere = client.get("/antbatch/api/job", params={"plan_uri": "s3://antbatch_nowhere@b/p"}, headers=headers)
    assert job.status_code == manifest.status_code == by_uri.status_code == 200, (job.text, manifest.text, by_uri.text)
    assert job.json()["succeeded"] is True and job.json()["rows_committed"] == rows
    assert manifest.json()["rows"] == rows and by_uri.json()["committed"] == job.json()["committed"]
    assert nowhere.status_code == 502 and "antbatch_nowhere" in nowhere.json()["detail"]
