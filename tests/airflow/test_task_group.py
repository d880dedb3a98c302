"""The one-call builder: the shape it wires, its launcher seam, and a DAG parse without torch."""

from __future__ import annotations

import datetime as dt
import subprocess
import sys
from typing import Any

import pytest
from airflow.sdk import DAG, BaseOperator, TaskGroup, TriggerRule

from airflow_antbatch import task_group
from airflow_antbatch.errors import SpecError
from airflow_antbatch.spec import ModelStage
from airflow_antbatch.task_group import elastic_batch_inference
from tests.conftest import REPO_ROOT

JOB: dict[str, Any] = {"input_uri": "s3://lake/in/ds={{ ds }}/", "output_uri": "s3://lake/out/", "model": "pkg:m"}


def _build(**kwargs: Any) -> tuple[dict[str, Any], TaskGroup]:
    """The group's tasks by id (typed Any: the tests read operator-specific attributes)."""
    with DAG("builder", schedule=None, start_date=dt.datetime(2026, 1, 1, tzinfo=dt.UTC)) as dag:
        group = elastic_batch_inference("score", **{**JOB, **kwargs})
    return dict(dag.task_dict), group


def test_wires_plan_workers_sensor_and_finalize() -> None:
    tasks, group = _build(max_workers=3, lease_ttl_s=20, poke_interval=5, worker_retries=4)
    assert group.group_id == "score"
    assert sorted(tasks) == ["score.finalize", "score.plan", "score.wait_for_shards", "score.worker"]
    plan, worker = tasks["score.plan"], tasks["score.worker"]
    sensor, finalize = tasks["score.wait_for_shards"], tasks["score.finalize"]
    assert worker.upstream_task_ids == {"score.plan"}
    assert sensor.upstream_task_ids == {"score.plan", "score.worker"}
    assert finalize.upstream_task_ids == {"score.wait_for_shards"}
    assert sensor.trigger_rule == TriggerRule.ALL_DONE_MIN_ONE_SUCCESS
    assert sensor.stall_timeout == 60 and sensor.poke_interval == 5 and sensor.mode == "poke"
    pull = "{{ ti.xcom_pull(task_ids='score.plan', key='plan_uri') }}"
    assert sensor.plan_uri == pull and finalize.plan_uri == pull
    assert plan.max_workers == 3 and plan.input_uri == JOB["input_uri"]
    # One mapped task per worker, mapped over the plan's return value.
    assert worker.partial_kwargs["workers_on_host"] == 3 and worker.partial_kwargs["retries"] == 4
    assert worker.map_index_template == "{{ task.worker_id }}"


def test_the_dag_serializes_as_the_scheduler_stores_it() -> None:
    from airflow.serialization.serialized_objects import DagSerialization

    with DAG("builder", schedule=None, start_date=dt.datetime(2026, 1, 1, tzinfo=dt.UTC)) as dag:
        elastic_batch_inference("score", **JOB)
    restored = DagSerialization.deserialize_dag(DagSerialization.serialize_dag(dag))
    assert sorted(restored.task_dict) == sorted(dag.task_dict)


CHAIN: dict[str, Any] = {
    "model": None,
    "stages": [
        {"name": "embed", "model": "tests.chain_models:build_embedder", "batch_size": 64, "output_column": "emb"},
        ModelStage(name="rank", model="tests.chain_models:build_reranker", adapter="tests.chain_models:rerank_input"),
    ],
    "autocast_dtype": "bfloat16",
    "compile": "inductor",
    "quarantine_limit": 3,
}


def test_a_chain_dag_parses_and_serializes_with_its_stages() -> None:
    from airflow.serialization.serialized_objects import DagSerialization

    with DAG("chain", schedule=None, start_date=dt.datetime(2026, 1, 1, tzinfo=dt.UTC)) as dag:
        elastic_batch_inference("score", **{**JOB, **CHAIN})
    spec = dag.task_dict["score.plan"].job_spec()
    assert [s.name for s in spec.stages] == ["embed", "rank"] and spec.model is None
    assert (spec.autocast_dtype, spec.compile, spec.quarantine_limit) == ("bfloat16", "inductor", 3)
    restored = DagSerialization.deserialize_dag(DagSerialization.serialize_dag(dag))
    assert restored.task_dict["score.plan"].stages == [
        {"name": "embed", "model": "tests.chain_models:build_embedder", "batch_size": 64, "output_column": "emb"},
        {"name": "rank", "model": "tests.chain_models:build_reranker", "adapter": "tests.chain_models:rerank_input"},
    ]


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [({"stages": CHAIN["stages"]}, "exactly one of 'model'"), ({**CHAIN, "stages": []}, "exactly one of 'model'")],
)
def test_a_job_needs_a_model_or_a_chain_but_not_both(kwargs: dict[str, Any], message: str) -> None:
    with pytest.raises(SpecError, match=message):
        _build(**kwargs)


def test_an_unknown_launcher_names_the_available_ones() -> None:
    with pytest.raises(
        ValueError, match="unknown launcher 'k8s'; available launchers: kubernetes, kubernetes-pool, local"
    ):
        _build(launcher="k8s")


def test_job_settings_are_checked_when_the_dag_is_parsed() -> None:
    with pytest.raises(SpecError, match="max_shard_rows"):
        _build(max_shard_rows=0)


def test_worker_kwargs_reach_the_launchers_operator() -> None:
    tasks, _ = _build(worker_kwargs={"cpu_budget": 4, "preprocess_workers": 0, "torch_threads": 3, "kill_grace_s": 5.0})
    partial = tasks["score.worker"].partial_kwargs
    assert (partial["cpu_budget"], partial["preprocess_workers"], partial["torch_threads"]) == (4, 0, 3)
    assert partial["kill_grace_s"] == 5.0


class PodLikeWorker(BaseOperator):
    """What a pod launcher looks like to the builder: the same mapped kwargs, its own options."""

    def __init__(self, *, plan_uri: str, worker_id: str, storage_options: Any = None, image: str, **kw: Any) -> None:
        super().__init__(**kw)
        self.plan_uri, self.worker_id, self.image = plan_uri, worker_id, image


def test_another_launcher_plugs_in_through_the_registry(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(task_group.LAUNCHERS, "pod", f"{__name__}:PodLikeWorker")
    tasks, _ = _build(launcher="pod", worker_kwargs={"image": "antbatch:1"})
    worker = tasks["score.worker"]
    assert worker.operator_class is PodLikeWorker
    assert worker.partial_kwargs["image"] == "antbatch:1"


def test_parsing_the_example_dag_imports_neither_torch_nor_kubernetes() -> None:
    code = (
        "import runpy, sys\n"
        f"runpy.run_path({str(REPO_ROOT / 'dags' / 'nightly_batch_inference.py')!r})\n"
        "heavy = sorted(m for m in ('torch', 'kubernetes', 'pyarrow') if m in sys.modules)\n"
        "print(heavy)\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.strip().splitlines()[-1] == "[]"


def test_the_sensor_follows_the_deployments_default_deferrable_unless_told(monkeypatch: pytest.MonkeyPatch) -> None:
    tasks, _ = _build()
    assert tasks["score.wait_for_shards"].deferrable is False  # [operators] default_deferrable's default
    monkeypatch.setenv("AIRFLOW__OPERATORS__DEFAULT_DEFERRABLE", "True")
    tasks, _ = _build()
    assert tasks["score.wait_for_shards"].deferrable is True
    tasks, _ = _build(deferrable_sensor=False)
    assert tasks["score.wait_for_shards"].deferrable is False
    monkeypatch.delenv("AIRFLOW__OPERATORS__DEFAULT_DEFERRABLE")
    tasks, _ = _build(deferrable_sensor=True)
    assert tasks["score.wait_for_shards"].deferrable is True


def test_finalize_emits_the_output_root_asset_or_the_one_given() -> None:
    from airflow.sdk import Asset

    tasks, _ = _build(output_uri="s3://lake/predictions/ds={{ ds }}/")
    assert tasks["score.finalize"].outlets == [Asset(uri="s3://lake/predictions")]
    mine = Asset(name="fraud_scores", uri="s3://lake/predictions")
    tasks, _ = _build(output_asset=mine)
    assert tasks["score.finalize"].outlets == [mine]
    tasks, _ = _build(output_uri="{{ var.value.out }}", output_asset=False)
    assert tasks["score.finalize"].outlets == []
    with pytest.raises(ValueError, match="has no static root"):
        _build(output_uri="{{ var.value.out }}")
