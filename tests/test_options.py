"""Job options defined once: JobSpec's fields make the CLI's flags and resolve keyword arguments."""

from __future__ import annotations

import dataclasses

import pytest

from airflow_antbatch.cli import _spec_from_args, build_parser
from airflow_antbatch.options import job_options, resolve
from airflow_antbatch.spec import JobSpec

IO = ["plan", "--input", "in/", "--output", "out/", "--model", "m:f"]
# The options whose flags the CLI spells by hand (a list, a group, a global flag).
BY_HAND = {
    "input_uri": "--input",
    "output_uri": "--output",
    "model": "--model",
    "stages": "--stage",
    "keep_columns": "--keep-column",
    "storage_options": "--storage-options",
}


def _flags() -> set[str]:
    parser = build_parser()
    plan = parser._subparsers._group_actions[0].choices["plan"]  # type: ignore[union-attr]
    return {flag for p in (parser, plan) for action in p._actions for flag in action.option_strings}


def test_every_job_option_is_a_cli_flag() -> None:
    fields = {f.name for f in dataclasses.fields(JobSpec)} - {"spec_version"}
    assert {o.name for o in job_options()} == fields
    flags = _flags()
    for option in job_options():
        assert set(option.flags or (BY_HAND[option.name],)) <= flags, option.name


def test_no_flags_give_the_job_spec_defaults() -> None:
    spec = _spec_from_args(build_parser().parse_args(IO))
    assert spec == JobSpec(input_uri="in/", output_uri="out/", model="m:f")


def test_flags_and_their_older_spellings_set_the_job_options() -> None:
    argv = [*IO, "--lease-ttl", "2.5", "--max-attempts", "5", "--format", "csv", "--state", "s/"]
    argv += ["--no-backup-tries", "--target-shard-bytes", "1000", "--same-error-limit", "2", "--keep-column", "k"]
    spec = _spec_from_args(build_parser().parse_args(argv))
    assert (spec.lease_ttl_s, spec.max_shard_attempts, spec.input_format, spec.state_uri) == (2.5, 5, "csv", "s/")
    assert (spec.backup_tries, spec.target_shard_bytes, spec.same_error_limit) == (False, 1000, 2)
    assert spec.keep_columns == ("k",)


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--batch-size", "0"], "argument --batch-size: must be >= 1, got 0"),
        (["--max-shard-rows", "x"], "argument --max-shard-rows: 'x' is not an integer"),
        (["--lease-ttl-s", "soon"], "argument --lease-ttl-s/--lease-ttl: invalid float value: 'soon'"),
        (["--input-format", "xml"], "argument --input-format/--format: invalid choice: 'xml'"),
    ],
)
def test_a_bad_flag_is_an_argparse_error_naming_it(
    argv: list[str], message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit):
        build_parser().parse_args([*IO, *argv])
    assert message in capsys.readouterr().err


def test_resolve_fills_the_defaults_and_refuses_unknown_or_missing_options() -> None:
    job = resolve({"input_uri": "a", "output_uri": "b", "batch_size": 7}, "builder")
    assert job["batch_size"] == 7 and job["max_shard_rows"] == 100_000 and job["storage_options"] == {}
    with pytest.raises(TypeError, match=r"builder\(\) got unexpected keyword argument\(s\) \['bach_size'\]; job opt"):
        resolve({"input_uri": "a", "output_uri": "b", "bach_size": 7}, "builder")
    with pytest.raises(TypeError, match=r"builder\(\) missing required keyword argument\(s\) \['output_uri'\]"):
        resolve({"input_uri": "a"}, "builder")
