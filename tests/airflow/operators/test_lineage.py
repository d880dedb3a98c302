"""OpenLineage from the plan and finalize tasks (airflow_antbatch/operators/lineage.py).

The end-to-end test runs a DAG through ``dag.test()`` with apache-airflow-providers-openlineage's
own listener registered and its client's file transport: the events asserted are the ones the
provider built from our operators' facets and would send to a lineage backend.
"""

from __future__ import annotations

import json
from typing import TYPE_CHECKING, Any

import pytest

from airflow_antbatch.operators.lineage import FACET, AntBatchRunFacet, dataset_name, job_lineage
from airflow_antbatch.spec import JobSpec
from tests.airflow.test_dag_e2e import _load_dag
from tests.conftest import write_transactions

if TYPE_CHECKING:
    import pathlib
    from collections.abc import Iterator

pytestmark = pytest.mark.airflow
CHAIN = "tests.chain_models"


@pytest.mark.parametrize(
    ("uri", "options", "expected"),
    [
        ("s3://lake/predictions/ds=2026-01-01/", None, ("s3://lake", "predictions/ds=2026-01-01")),
        ("s3://lake_conn@lake/in/part-*.parquet", None, ("s3://lake", "in")),  # no connection, no glob
        ("s3://lake", None, ("s3://lake", "/")),
        ("gs://bucket/in/", None, ("gs://bucket", "in")),
        ("abfs://box@acct.dfs.core.windows.net/in/", None, ("abfss://box@acct.dfs.core.windows.net", "in")),
        ("az://box/in", {"account_name": "acct"}, ("abfss://box@acct.dfs.core.windows.net", "in")),
        ("az://box/in", None, ("az://box", "in")),
        ("/data/out/", None, ("file", "/data/out")),
        ("file:///data/out", None, ("file", "/data/out")),
    ],
)
def test_datasets_are_named_as_the_openlineage_naming_spec_says(
    uri: str, options: dict[str, Any] | None, expected: tuple[str, str]
) -> None:
    assert dataset_name(uri, options) == expected


def test_the_run_facet_holds_the_chain_and_the_output_its_counts() -> None:
    spec = JobSpec(
        input_uri=("s3://lake/a/", "s3://lake/b/"),
        output_uri="s3://lake/out/",
        stages=({"name": "embed", "model": "m:embed", "batch_size": 64}, {"name": "rank", "model": "m:rank"}),
        preprocess="m:pre",
    )
    lineage = job_lineage(spec, written={"rows": 10, "shards": 2, "plan_uri": "s3://c@lake/p", "attempt": 1})
    assert [(d.namespace, d.name) for d in lineage.inputs] == [("s3://lake", "a"), ("s3://lake", "b")]
    [output] = lineage.outputs
    assert (output.namespace, output.name) == ("s3://lake", "out")
    stats = output.outputFacets["outputStatistics"]
    assert (stats.rowCount, stats.fileCount) == (10, 2)
    facet = lineage.run_facets[FACET]
    assert isinstance(facet, AntBatchRunFacet)
    assert facet.stages == [{"name": "embed", "model": "m:embed"}, {"name": "rank", "model": "m:rank"}]
    assert (facet.preprocess, facet.plan_uri, facet.attempt) == ("m:pre", "s3://lake/p", 1)


@pytest.fixture
def openlineage_events(tmp_path: pathlib.Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[pathlib.Path]:
    """The provider's listener, sending through the OpenLineage client's file transport (one event a line).

    Its configuration is read once per process and its plugin registers the listener only if
    lineage was enabled when Airflow loaded plugins: both are done here, and undone after.
    """
    from airflow.providers.openlineage import conf
    from airflow.providers.openlineage.plugins.listener import get_openlineage_listener
    from airflow.sdk.listener import get_listener_manager

    events = tmp_path / "openlineage.jsonl"
    transport = {"type": "file", "log_file_path": str(events), "append": True}
    monkeypatch.setenv("AIRFLOW__OPENLINEAGE__TRANSPORT", json.dumps(transport))
    monkeypatch.setenv("AIRFLOW__OPENLINEAGE__NAMESPACE", "antbatch-test")
    monkeypatch.setenv("AIRFLOW__OPENLINEAGE__EXECUTE_IN_THREAD", "True")  # not a fork per event
    caches = [f for f in vars(conf).values() if hasattr(f, "cache_clear")]
    for cached in caches:
        cached.cache_clear()
    listener = get_openlineage_listener()
    manager = get_listener_manager()
    manager.add_listener(listener)
    yield events
    manager.pm.unregister(listener)
    for cached in caches:
        cached.cache_clear()


@pytest.mark.slow
def test_a_dag_run_reports_its_inputs_models_and_output(
    airflow_db: pathlib.Path,
    tmp_path: pathlib.Path,
    monkeypatch: pytest.MonkeyPatch,
    subprocess_env: dict[str, str],
    openlineage_events: pathlib.Path,
) -> None:
    table = write_transactions(tmp_path / "in", files=2, rows_per_file=200, row_group_size=200)
    monkeypatch.setenv("ANTBATCH_TEST_DATA_ROOT", str(tmp_path))
    run = _load_dag("antbatch_lineage_dags.py", "antbatch_lineage").test()
    assert run.state == "success"

    events = [json.loads(line) for line in openlineage_events.read_text().splitlines()]
    by_task = {(e["job"]["name"].rsplit(".", 1)[-1], e["eventType"]): e for e in events}
    start = by_task["plan", "START"]
    assert [(d["namespace"], d["name"]) for d in start["inputs"]] == [("file", str(tmp_path / "in"))]
    facet = start["run"]["facets"][FACET]
    assert facet["stages"] == [
        {"name": "embed", "model": f"{CHAIN}:build_embedder", "output_column": "embedding"},
        {"name": "classify", "model": f"{CHAIN}:build_classifier"},
        {"name": "rerank", "model": f"{CHAIN}:build_reranker", "adapter": f"{CHAIN}:rerank_input"},
    ]
    assert facet["postprocess"] == f"{CHAIN}:score_column" and facet["_schemaURL"].endswith("/RunFacet")

    complete = by_task["finalize", "COMPLETE"]
    assert complete["job"]["namespace"] == "antbatch-test"
    assert [(d["namespace"], d["name"]) for d in complete["inputs"]] == [("file", str(tmp_path / "in"))]
    [output] = complete["outputs"]
    assert (output["namespace"], output["name"]) == ("file", str(tmp_path / "out"))
    stats = output["outputFacets"]["outputStatistics"]
    assert (stats["rowCount"], stats["fileCount"]) == (table.num_rows, 2)
    facet = complete["run"]["facets"][FACET]
    assert facet["stages"][0]["model"] == f"{CHAIN}:build_embedder" and facet["attempt"] == 0
    assert facet["plan_uri"].startswith(str(tmp_path / "out"))
