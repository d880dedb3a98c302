"""JobSpec: the versioned contract handed to workers, with errors that name the field."""

from __future__ import annotations

import json
from typing import Any

import pytest

from airflow_antbatch.errors import SpecError
from airflow_antbatch.spec import SPEC_VERSION, JobSpec

BASE: dict[str, Any] = {"input_uri": "/data/in", "output_uri": "/data/out", "model": "pkg.mod:factory"}


def test_json_round_trip_keeps_every_field() -> None:
    spec = JobSpec(
        **BASE,
        input_format="parquet",
        preprocess="pkg.mod:pre",
        keep_columns=("a", "b"),
        id_column="id",
        storage_options={"client_kwargs": {"endpoint_url": "http://127.0.0.1:1"}},
    )
    again = JobSpec.from_json(spec.to_json())
    assert again == spec
    assert json.loads(spec.to_json())["spec_version"] == SPEC_VERSION


def test_list_input_and_columns_normalise_to_tuples() -> None:
    spec = JobSpec.from_dict({**BASE, "input_uri": ["/a", "/b"], "keep_columns": ["x"]})
    assert spec.input_uris == ("/a", "/b")
    assert spec.keep_columns == ("x",)


def test_state_root_defaults_beside_output() -> None:
    assert JobSpec(**BASE).state_root == "/data/out/_antbatch"
    assert JobSpec(**BASE, state_uri="s3://b/state").state_root == "s3://b/state"


@pytest.mark.parametrize(
    ("override", "field"),
    [
        ({"batch_size": 0}, "batch_size"),
        ({"batch_size": "64"}, "batch_size"),
        ({"batch_size": True}, "batch_size"),
        ({"lease_ttl_s": -1}, "lease_ttl_s"),
        ({"max_shard_attempts": 0}, "max_shard_attempts"),
        ({"input_format": "xml"}, "input_format"),
        ({"input_uri": ""}, "input_uri"),
        ({"input_uri": []}, "input_uri"),
        ({"model": ""}, "model"),
        ({"keep_columns": [1]}, "keep_columns"),
        ({"id_column": "a", "keep_columns": ["a"]}, "keep_columns"),
        ({"storage_options": {"secret": "x"}}, "storage_options"),
    ],
)
def test_invalid_field_is_named(override: dict[str, Any], field: str) -> None:
    with pytest.raises(SpecError, match=f"'{field}'"):
        JobSpec.from_dict({**BASE, **override})


def test_unknown_field_is_named_with_the_known_ones() -> None:
    with pytest.raises(SpecError, match=r"unknown job spec field\(s\) \['bach_size'\].*batch_size"):
        JobSpec.from_dict({**BASE, "bach_size": 3})


def test_missing_required_field() -> None:
    with pytest.raises(SpecError, match=r"missing required field\(s\) \['model'\]"):
        JobSpec.from_dict({"input_uri": "/a", "output_uri": "/b"})


def test_other_spec_version_is_refused() -> None:
    with pytest.raises(SpecError, match="spec_version"):
        JobSpec.from_dict({**BASE, "spec_version": SPEC_VERSION + 1})


def test_not_json() -> None:
    with pytest.raises(SpecError, match="my.json is not valid JSON"):
        JobSpec.from_json("{", source="my.json")
