"""Job options defined once: the builder's and the plan operator's parameters, their templating
and the docs' option tables all come from JobSpec's fields (issue 15, point 7)."""

from __future__ import annotations

import datetime as dt
import inspect
from typing import Any

import pytest
from airflow.sdk import DAG

from airflow_antbatch.operators.plan import PlanBatchInferenceOperator
from airflow_antbatch.options import job_options, templated
from airflow_antbatch.task_group import elastic_batch_inference
from scripts import option_tables

JOB: dict[str, Any] = {"input_uri": "s3://lake/in/ds={{ ds }}/", "output_uri": "s3://lake/out/", "model": "pkg:m"}


@pytest.mark.parametrize("target", [elastic_batch_inference, PlanBatchInferenceOperator])
def test_the_signature_lists_every_job_option_with_its_default_and_type(target: Any) -> None:
    params = inspect.signature(target).parameters
    for option in job_options():
        param = params[option.name]
        assert param.kind is param.KEYWORD_ONLY
        assert (param.default, param.annotation) == (option.default, option.annotation), option.name
    assert "max_workers" in params and "conn_id" in params  # their own options stay


def _plan(**kwargs: Any) -> Any:
    with DAG("options", schedule=None, start_date=dt.datetime(2026, 1, 1, tzinfo=dt.UTC)) as dag:
        elastic_batch_inference("job", **{**JOB, **kwargs})
    return dag.task_dict["job.plan"]


def test_every_job_option_reaches_the_plan_and_the_templated_ones_are_template_fields() -> None:
    spec = _plan(backup_tries=False, same_error_limit=2, max_shard_rows=700, keep_columns=["a"]).job_spec()
    assert (spec.backup_tries, spec.same_error_limit, spec.max_shard_rows, spec.keep_columns) == (False, 2, 700, ("a",))
    assert set(PlanBatchInferenceOperator.template_fields) == {*templated(), "force_rerun"}
    assert {"input_uri", "output_uri", "model", "preprocess", "postprocess", "state_uri", "stages"} <= set(templated())


def test_a_misspelt_or_missing_option_fails_when_the_dag_is_parsed() -> None:
    with pytest.raises(TypeError, match=r"unexpected keyword argument\(s\) \['max_shard_row'\]; job options: \["):
        _plan(max_shard_row=700)
    with pytest.raises(TypeError, match=r"missing required keyword argument\(s\) \['output_uri'\]"):
        with DAG("missing", schedule=None, start_date=dt.datetime(2026, 1, 1, tzinfo=dt.UTC)):
            elastic_batch_inference(input_uri="s3://lake/in/", model="pkg:m")


def test_the_option_tables_in_the_readme_and_the_user_guide_are_current() -> None:
    assert option_tables.main(["--check"]) == 0, "run make docs-options"
    table = option_tables.option_table()
    assert all(f"| `{o.name}` |" in table for o in job_options())
