"""JobSpec: the versioned contract handed to workers, with errors that name the field."""

from __future__ import annotations

import json
from typing import Any

import pytest

from airflow_antbatch.errors import SpecError
from airflow_antbatch.spec import SPEC_VERSION, JobSpec, ModelStage

BASE: dict[str, Any] = {"input_uri": "/data/in", "output_uri": "/data/out", "model": "pkg.mod:factory"}
IO: dict[str, Any] = {"input_uri": "/data/in", "output_uri": "/data/out"}
EMBED: dict[str, Any] = {"name": "embed", "model": "pkg.mod:embedder"}
RANK: dict[str, Any] = {"name": "rank", "model": "pkg.mod:ranker"}


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
        # Fields of plain types are checked from their type hints, with no line of their own.
        ({"backup_tries": "yes"}, "backup_tries"),
        ({"device": 3}, "device"),
        ({"lease_ttl_s": True}, "lease_ttl_s"),
        ({"id_column": 1}, "id_column"),
    ],
)
def test_invalid_field_is_named(override: dict[str, Any], field: str) -> None:
    with pytest.raises(SpecError, match=f"'{field}'"):
        JobSpec.from_dict({**BASE, **override})


def test_unknown_field_is_named_with_the_known_ones() -> None:
    with pytest.raises(SpecError, match=r"unknown job spec field\(s\) \['bach_size'\].*batch_size"):
        JobSpec.from_dict({**BASE, "bach_size": 3})


def test_missing_required_field() -> None:
    with pytest.raises(SpecError, match=r"missing required field\(s\) \['output_uri'\]"):
        JobSpec.from_dict({"input_uri": "/a", "model": "pkg:m"})


def test_other_spec_version_is_refused() -> None:
    with pytest.raises(SpecError, match="spec_version"):
        JobSpec.from_dict({**BASE, "spec_version": SPEC_VERSION + 1})


def test_not_json() -> None:
    with pytest.raises(SpecError, match="my.json is not valid JSON"):
        JobSpec.from_json("{", source="my.json")


def test_a_chain_round_trips_through_json() -> None:
    spec = JobSpec.from_dict(
        {
            **IO,
            "stages": [
                {**EMBED, "batch_size": 64, "device": "cuda", "threads": 2, "output_column": "emb"},
                {**RANK, "adapter": "pkg.mod:adapt", "autocast_dtype": "float16", "compile": "inductor"},
            ],
            "autocast_dtype": "bfloat16",
            "quarantine_limit": 0,
        }
    )
    assert spec.stages[1] == ModelStage(**RANK, adapter="pkg.mod:adapt", autocast_dtype="float16", compile="inductor")
    again = JobSpec.from_json(spec.to_json())
    assert again == spec
    assert json.loads(spec.to_json())["stages"][0]["output_column"] == "emb"


def test_stages_built_by_hand_are_checked_like_dicts() -> None:
    with pytest.raises(SpecError, match=r"'stages\[1\]\.batch_size' must be > 0"):
        JobSpec(**IO, stages=(ModelStage(**EMBED), ModelStage(**RANK, batch_size=0)))


def test_model_stages_inherit_the_job_defaults() -> None:
    spec = JobSpec(
        **IO,
        stages=[{**EMBED, "batch_size": 32, "device": "cuda", "compile": "eager"}, RANK],
        batch_size=128,
        device="cpu",
        autocast_dtype="bfloat16",
        compile="inductor",
    )
    embed, rank = spec.model_stages
    assert (embed.batch_size, embed.device, embed.autocast_dtype, embed.compile) == (32, "cuda", "bfloat16", "eager")
    assert (rank.batch_size, rank.device, rank.autocast_dtype, rank.compile) == (128, "cpu", "bfloat16", "inductor")
    assert spec.stages[1].batch_size is None  # the stored chain keeps what was written


def test_one_model_is_a_chain_of_one() -> None:
    [stage] = JobSpec(**BASE, batch_size=64, device="cuda", autocast_dtype="float16").model_stages
    assert stage == ModelStage(
        name="model", model=BASE["model"], batch_size=64, device="cuda", autocast_dtype="float16"
    )


@pytest.mark.parametrize(
    ("data", "message"),
    [
        (IO, r"exactly one of 'model' .* or 'stages'"),
        ({**BASE, "stages": [EMBED]}, r"exactly one of 'model' .* or 'stages'"),
        ({**IO, "stages": []}, r"exactly one of 'model' .* or 'stages'"),
        ({**IO, "stages": EMBED}, r"'stages' must be a list"),
        ({**IO, "stages": ["pkg:m"]}, r"'stages\[0\]' must be an object"),
        ({**IO, "stages": [{**EMBED, "name": "not a name"}]}, r"'stages\[0\]\.name' must be an identifier"),
        ({**IO, "stages": [{**EMBED, "name": "write"}]}, r"'stages\[0\]\.name' must be an identifier .* 'write'"),
        ({**IO, "stages": [EMBED, {**RANK, "name": 3}]}, r"'stages\[1\]\.name' must be str"),
        ({**IO, "stages": [EMBED, {**RANK, "model": ""}]}, r"'stages\[1\]\.model' must not be empty"),
        ({**IO, "stages": [EMBED, {**RANK, "name": "embed"}]}, r"'stages' repeats the stage name\(s\) \['embed'\]"),
        ({**IO, "stages": [{**EMBED, "adapter": "pkg:a"}, RANK]}, r"'stages\[0\]' \('embed'\) cannot have an adapter"),
        (
            {**IO, "stages": [{**EMBED, "output_column": "x"}, {**RANK, "output_column": "x"}]},
            r"'stages' keeps output column\(s\) \['x'\]",
        ),
        (
            {**IO, "stages": [{**EMBED, "output_column": "txn_id"}, RANK], "id_column": "txn_id"},
            r"'stages' keeps output column\(s\) \['txn_id'\]",
        ),
        (
            {**IO, "stages": [{**EMBED, "output_column": "m"}, RANK], "keep_columns": ["m"]},
            r"'stages' keeps output column\(s\) \['m'\]",
        ),
        (
            {**IO, "stages": [{**EMBED, "output_column": "prediction"}, RANK]},
            r"'stages' keeps output column\(s\) \['prediction'\]",
        ),
        ({**IO, "stages": [EMBED, {**RANK, "batch_size": 0}]}, r"'stages\[1\]\.batch_size' must be > 0"),
        ({**IO, "stages": [EMBED, {**RANK, "threads": True}]}, r"'stages\[1\]\.threads' must be int"),
        ({**IO, "stages": [EMBED, {**RANK, "compile": ""}]}, r"'stages\[1\]\.compile' must not be empty"),
        ({**IO, "stages": [{**EMBED, "autocast_dtype": "fp8"}]}, r"'stages\[0\]\.autocast_dtype' must be one of"),
        ({**IO, "stages": [{**EMBED, "bach_size": 3}]}, r"'stages\[0\]' has unknown field\(s\) \['bach_size'\]"),
        ({**IO, "stages": [{"name": "embed"}]}, r"'stages\[0\]' is missing field\(s\) \['model'\]"),
        ({**BASE, "autocast_dtype": "float32"}, r"'autocast_dtype' must be one of \['bfloat16', 'float16'\]"),
        ({**BASE, "compile": ""}, r"'compile' must not be empty"),
        ({**BASE, "quarantine_limit": -1}, r"'quarantine_limit' must be >= 0"),
        ({**BASE, "quarantine_limit": 1.5}, r"'quarantine_limit' must be int"),
    ],
)
def test_invalid_chain_settings_are_named(data: dict[str, Any], message: str) -> None:
    with pytest.raises(SpecError, match=message):
        JobSpec.from_dict(data)


def test_a_kept_prediction_column_is_fine_with_a_postprocess() -> None:
    stages = [{**EMBED, "output_column": "prediction"}, RANK]
    assert (
        JobSpec.from_dict({**IO, "stages": stages, "postprocess": "pkg:post"}).stages[0].output_column == "prediction"
    )
