"""PlanBatchInferenceOperator: the plan is written once, reused, forced; the fan-out is sized."""

from __future__ import annotations

import datetime as dt
import pathlib
from typing import TYPE_CHECKING, Any

import pytest
from airflow.sdk import DAG
from airflow.sdk.exceptions import AirflowFailException

from airflow_antbatch.errors import SpecError
from airflow_antbatch.operators.plan import PlanBatchInferenceOperator, as_bool, worker_count
from airflow_antbatch.shards import JobPlan
from airflow_antbatch.spec import ModelStage
from tests.airflow.conftest import TABULAR, FakeTaskInstance

if TYPE_CHECKING:
    import pyarrow as pa


def _plan(directory: pathlib.Path, **kwargs: Any) -> PlanBatchInferenceOperator:
    return PlanBatchInferenceOperator(
        task_id="plan",
        input_uri=str(directory),
        output_uri=str(directory.parent / "out"),
        **{"model": f"{TABULAR}:build_model", "max_shard_rows": 250, **kwargs},
    )


@pytest.mark.parametrize(
    ("shards", "max_workers", "min_per_worker", "expected"),
    [
        (12, 4, 1, 4),
        (3, 4, 1, 3),
        (12, 8, 5, 2),  # each worker gets at least 5 shards to share
        (15, 8, 5, 3),
        (1, 4, 3, 1),  # always at least one worker
        (0, 4, 1, 1),
        (100, 4, 1, 4),
    ],
)
def test_worker_count(shards: int, max_workers: int, min_per_worker: int, expected: int) -> None:
    assert worker_count(shards, max_workers, min_per_worker) == expected


def test_returns_one_kwargs_dict_per_worker_and_pushes_the_plan_uri(
    transactions: tuple[pathlib.Path, pa.Table], fake_ti: FakeTaskInstance
) -> None:
    directory, _ = transactions  # 12 row groups of 250 rows: 12 shards
    result = _plan(directory, max_workers=5, min_shards_per_worker=3).execute(fake_ti.context())
    plan_uri = fake_ti.xcom["plan_uri"]
    assert str(plan_uri).endswith("/out/_antbatch/attempt-000/plan.arrow")
    assert result == [{"plan_uri": plan_uri, "worker_id": f"worker-{i}", "slot": f"{i}/4"} for i in range(4)]


def test_a_rerun_reuses_the_plan_and_force_rerun_starts_a_fresh_attempt(
    transactions: tuple[pathlib.Path, pa.Table],
) -> None:
    directory, _ = transactions
    uris = []
    for force in (False, False, "True"):
        ti = FakeTaskInstance()
        _plan(directory, force_rerun=force).execute(ti.context())
        uris.append(ti.xcom["plan_uri"])
    assert uris[0] == uris[1]
    assert str(uris[2]).endswith("/attempt-001/plan.arrow")


def test_a_changed_input_fails_the_task_for_good(transactions: tuple[pathlib.Path, pa.Table]) -> None:
    directory, _ = transactions
    _plan(directory).execute(FakeTaskInstance().context())
    (directory / "part-000.parquet").rename(directory / "part-999.parquet")
    with pytest.raises(AirflowFailException, match="force"):
        _plan(directory).execute(FakeTaskInstance().context())


def test_job_fields_are_validated_when_the_dag_is_parsed(tmp_path: pathlib.Path) -> None:
    with pytest.raises(SpecError, match="batch_size"):
        _plan(tmp_path, batch_size=0)
    with pytest.raises(ValueError, match="max_workers"):
        _plan(tmp_path, max_workers=0)


def test_uris_and_force_rerun_are_templated(tmp_path: pathlib.Path) -> None:
    with DAG("templating", schedule=None, start_date=dt.datetime(2026, 1, 1, tzinfo=dt.UTC)):
        op = PlanBatchInferenceOperator(
            task_id="plan",
            input_uri=str(tmp_path) + "/in/ds={{ ds }}/",
            output_uri=str(tmp_path) + "/out/ds={{ ds }}/",
            model=f"{TABULAR}:build_model",
            force_rerun="{{ params.force_rerun }}",
        )
    op.render_template_fields({"ds": "2026-11-25", "params": {"force_rerun": True}})
    spec = op.job_spec()
    assert spec.input_uri == f"{tmp_path}/in/ds=2026-11-25/" and spec.output_uri == f"{tmp_path}/out/ds=2026-11-25/"
    assert as_bool(op.force_rerun, "force_rerun") is True


@pytest.mark.parametrize(("value", "expected"), [(True, True), ("False", False), ("true", True), ("", False)])
def test_as_bool(value: object, expected: bool) -> None:
    assert as_bool(value, "force_rerun") is expected


def test_as_bool_refuses_anything_else() -> None:
    with pytest.raises(AirflowFailException, match="force_rerun must be true or false"):
        as_bool("maybe", "force_rerun")


CHAIN = "tests.chain_models"
STAGES: list[Any] = [
    {"name": "embed", "model": f"{CHAIN}:build_embedder", "batch_size": 64, "output_column": "embedding"},
    ModelStage(name="rerank", model=f"{CHAIN}:build_reranker", adapter=f"{CHAIN}:rerank_input", threads=1),
]


def test_a_chain_and_its_settings_are_written_into_the_plan(
    transactions: tuple[pathlib.Path, pa.Table], fake_ti: FakeTaskInstance
) -> None:
    directory, _ = transactions
    op = _plan(directory, model=None, stages=STAGES, autocast_dtype="bfloat16", compile="inductor", quarantine_limit=0)
    op.execute(fake_ti.context())
    plan_uri = str(fake_ti.xcom["plan_uri"])
    spec = JobPlan.from_bytes(pathlib.Path(plan_uri).read_bytes(), source=plan_uri).spec.to_dict()
    assert spec["model"] is None
    assert [(s["name"], s["batch_size"], s["adapter"]) for s in spec["stages"]] == [
        ("embed", 64, None),
        ("rerank", None, f"{CHAIN}:rerank_input"),
    ]
    assert spec["stages"][0]["output_column"] == "embedding" and spec["stages"][1]["threads"] == 1
    assert (spec["autocast_dtype"], spec["compile"], spec["quarantine_limit"]) == ("bfloat16", "inductor", 0)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"stages": STAGES}, r"exactly one of 'model' .* or 'stages'"),
        ({"model": None}, r"exactly one of 'model' .* or 'stages'"),
        ({"model": None, "stages": [{"name": "embed"}]}, r"'stages\[0\]' is missing field\(s\) \['model'\]"),
        ({"model": None, "stages": [STAGES[0], {**STAGES[0], "model": "x:y"}]}, r"repeats the stage name"),
        ({"autocast_dtype": "fp8"}, r"'autocast_dtype' must be one of"),
        ({"quarantine_limit": -1}, r"'quarantine_limit' must be >= 0"),
    ],
)
def test_chain_settings_are_validated_when_the_dag_is_parsed(
    tmp_path: pathlib.Path, kwargs: dict[str, Any], message: str
) -> None:
    with pytest.raises(SpecError, match=message):
        _plan(tmp_path, **kwargs)


def test_the_import_paths_of_a_chain_are_templated(tmp_path: pathlib.Path) -> None:
    stages = [{"name": "embed", "model": "{{ params.pkg }}.models:embedder"}, {"name": "rank", "model": "m:rank"}]
    with DAG("templating", schedule=None, start_date=dt.datetime(2026, 1, 1, tzinfo=dt.UTC)):
        op = _plan(tmp_path, model=None, stages=stages)
    assert op.stages == stages  # only the fields that were set: the rendered view stays readable
    op.render_template_fields({"params": {"pkg": "fraud"}})
    assert [s.model for s in op.job_spec().stages] == ["fraud.models:embedder", "m:rank"]
