"""The ``antbatch`` CLI end to end, in real subprocesses: runs, kills, reruns and clear errors."""

from __future__ import annotations

import argparse
import collections
import inspect
import json
import os
import pathlib
import signal
import subprocess
import sys
import time
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from airflow_antbatch import exit_codes, finalize, planning
from airflow_antbatch.cli import build_parser, main, parse_stage
from airflow_antbatch.finalize import read_manifest
from airflow_antbatch.ledger import Ledger
from airflow_antbatch.spec import ModelStage
from airflow_antbatch.worker import local
from airflow_antbatch.worker import run as worker_run
from airflow_antbatch.worker.local import worker_command
from tests.conftest import TABULAR, committed_ids, write_transactions

ANTBATCH = [sys.executable, "-m", "airflow_antbatch"]
HOOKS = ["--preprocess", f"{TABULAR}:preprocess", "--postprocess", f"{TABULAR}:postprocess"]


def _antbatch(*args: str, env: dict[str, str] | None = None, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*ANTBATCH, *args], capture_output=True, text=True, env=env, timeout=timeout)


def _run_args(input_dir: pathlib.Path, output: pathlib.Path, *extra: str) -> list[str]:
    return ["run", "--input", str(input_dir), "--output", str(output), "--id-column", "txn_id", *extra]


def _assert_exactly_once(output: pathlib.Path, table: pa.Table) -> None:
    ids = committed_ids(str(output))
    duplicated = [i for i, n in collections.Counter(ids).items() if n > 1]
    missing = set(table.column("txn_id").to_pylist()) - set(ids)
    assert not duplicated and not missing, f"{len(duplicated)} duplicated, {len(missing)} missing"
    assert len(ids) == table.num_rows


@pytest.mark.slow
def test_run_scores_every_row_once_and_a_rerun_skips_everything(
    transactions: tuple[pathlib.Path, pa.Table], tmp_path: pathlib.Path, subprocess_env: dict[str, str]
) -> None:
    directory, table = transactions
    out = tmp_path / "out"
    args = _run_args(directory, out, "--model", f"{TABULAR}:build_model", *HOOKS, "--workers", "3")
    first = _antbatch(*args, "--max-shard-rows", "250", "--json", env=subprocess_env)
    assert first.returncode == 0, first.stderr
    doc = json.loads(first.stdout)
    assert doc["manifest"]["rows"] == 3000 and doc["manifest"]["shards"] == 12
    assert sum(w["summary"]["shards_committed"] for w in doc["workers"]) == 12
    _assert_exactly_once(out, table)

    second = _antbatch(*args, "--max-shard-rows", "250", env=subprocess_env)
    assert second.returncode == 0, second.stderr
    assert "reused plan" in second.stderr
    assert second.stderr.count("exit 0, committed 0 shards (0 rows), skipped 12 already committed") == 3

    status = _antbatch("status", str(out), "--json", env=subprocess_env)
    assert json.loads(status.stdout)["committed"] == 12


@pytest.mark.slow
def test_sigkill_of_a_worker_mid_shard_loses_and_duplicates_nothing(
    tmp_path: pathlib.Path, subprocess_env: dict[str, str]
) -> None:
    table = write_transactions(tmp_path / "in", files=4, rows_per_file=600, row_group_size=100)
    markers = tmp_path / "markers"
    markers.mkdir()
    env = {**subprocess_env, "ANTBATCH_TEST_BATCH_DELAY": "0.15", "ANTBATCH_TEST_MARKER_DIR": str(markers)}
    out = tmp_path / "out"
    args = _run_args(
        tmp_path / "in", out, "--model", "tests.slow_model:build_slow_model", "--preprocess", f"{TABULAR}:preprocess"
    )
    args += ["--workers", "3", "--max-shard-rows", "200", "--batch-size", "50", "--lease-ttl", "2"]
    run = subprocess.Popen([*ANTBATCH, *args], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
    victim = _wait_for_marker(markers, timeout=60)
    time.sleep(0.2)  # let it get into the middle of a shard
    os.kill(victim, signal.SIGKILL)
    output, _ = run.communicate(timeout=180)
    assert run.returncode == 0, output
    assert "exit -9" in output  # the launcher saw the killed worker
    _assert_exactly_once(out, table)
    plan_uri = str(out / "_antbatch" / "attempt-000" / "plan.arrow")
    # The dead worker's try was taken over: some shard has a second claim (epoch 1).
    assert any(name.endswith("/0001.json") for name in Ledger.open(plan_uri).store.list("claims"))


def _wait_for_marker(markers: pathlib.Path, timeout: float) -> int:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        found = list(markers.iterdir())
        if found:
            return int(found[0].name)
        time.sleep(0.05)
    raise AssertionError("no worker started scoring")


@pytest.mark.slow
@pytest.mark.parametrize("drain", [(), ("--drain-s", "30")], ids=["release", "drain"])
def test_sigterm_releases_the_shard_and_exits_with_the_preempted_code(
    transactions: tuple[pathlib.Path, pa.Table],
    tmp_path: pathlib.Path,
    subprocess_env: dict[str, str],
    drain: tuple[str, ...],
) -> None:
    """SIGTERM mid-shard: the worker gives the shard back, or with a drain budget (NOTE
    [drain]) commits it first; either way it exits with the preempted code."""
    directory, table = transactions
    markers = tmp_path / "markers"
    markers.mkdir()
    env = {**subprocess_env, "ANTBATCH_TEST_BATCH_DELAY": "0.2", "ANTBATCH_TEST_MARKER_DIR": str(markers)}
    out = tmp_path / "out"
    plan = _antbatch(
        "plan", "--input", str(directory), "--output", str(out), "--model", "tests.slow_model:build_slow_model",
        "--preprocess", f"{TABULAR}:preprocess", "--id-column", "txn_id", "--json", env=env,
    )  # fmt: skip
    plan_uri = json.loads(plan.stdout)["plan_uri"]
    worker = subprocess.Popen(
        [*ANTBATCH, "worker", "--spec", plan_uri, "--worker-id", "w0", *drain],
        stdout=subprocess.PIPE,
        text=True,
        env=env,
    )
    _wait_for_marker(markers, timeout=60)
    worker.send_signal(signal.SIGTERM)
    stdout, _ = worker.communicate(timeout=60)
    assert worker.returncode == exit_codes.PREEMPTED
    summary = json.loads(stdout)
    assert summary["outcome"] == "preempted"
    ledger = Ledger.open(plan_uri)
    drained = bool(drain)
    assert summary["shards_committed"] == drained  # the shard in hand: committed, or given back
    assert len(ledger.store.list("releases")) == summary["claiming"]["claims"] - drained
    # A replacement worker takes the released shard over at once and finishes the job.
    done = _antbatch("worker", "--spec", plan_uri, "--worker-id", "w1", env={**env, "ANTBATCH_TEST_BATCH_DELAY": "0"})
    assert done.returncode == 0, done.stderr
    assert _antbatch("finalize", "--spec", plan_uri, env=env).returncode == 0
    _assert_exactly_once(out, table)


@pytest.mark.parametrize(
    ("make_args", "message"),
    [
        (
            lambda d, o: _run_args(o / "missing", o / "out", "--model", f"{TABULAR}:build_model"),
            r"does not exist",
        ),
        (
            lambda d, o: _run_args(d, o / "out", "--model", f"{TABULAR}:build_model", "--format", "csv"),
            r"holds no csv data files",
        ),
        (
            lambda d, o: _run_args(d, o / "out", "--model", "not_a_module_xyz:factory"),
            r"cannot import module 'not_a_module_xyz'",
        ),
    ],
    ids=["missing-input", "unknown-format", "model-import-error"],
)
def test_bad_input_gives_one_clear_line_and_no_traceback(
    transactions: tuple[pathlib.Path, pa.Table],
    tmp_path: pathlib.Path,
    subprocess_env: dict[str, str],
    make_args: object,
    message: str,
) -> None:
    directory, _ = transactions
    result = _antbatch(*make_args(directory, tmp_path), env=subprocess_env)  # type: ignore[operator]
    assert result.returncode != 0
    assert "Traceback" not in result.stderr
    assert any(("error:" in line and __import__("re").search(message, line)) for line in result.stderr.splitlines()), (
        result.stderr
    )


def test_unknown_format_extension_is_named(tmp_path: pathlib.Path, subprocess_env: dict[str, str]) -> None:
    (tmp_path / "data.xml").write_text("<rows/>")
    result = _antbatch(*_run_args(tmp_path / "data.xml", tmp_path / "out", "--model", "m:f"), env=subprocess_env)
    assert result.returncode == exit_codes.ERROR
    assert "cannot tell the format of input file" in result.stderr and "data.xml" in result.stderr
    assert "Traceback" not in result.stderr


# -- chains and worker sizing on the command line ----------------------------------------------

CHAIN = "tests.chain_models"
CHAIN_STAGES = [
    "--stage", f"name=embed,model={CHAIN}:build_embedder,batch_size=64,output_column=embedding",
    "--stage", f"name=classify,model={CHAIN}:build_classifier,batch_size=100",
    "--stage", f"name=rerank,model={CHAIN}:build_reranker,batch_size=37,adapter={CHAIN}:rerank_input",
]  # fmt: skip


def test_parse_stage_reads_every_key() -> None:
    text = (
        "name=embed, model=pkg.mod:fn,batch_size=64,device=cpu,threads=1,adapter=pkg:fn,output_column=emb,"
        "autocast_dtype=bfloat16,compile=inductor"
    )
    assert parse_stage(text) == ModelStage(
        name="embed",
        model="pkg.mod:fn",
        batch_size=64,
        device="cpu",
        threads=1,
        adapter="pkg:fn",
        output_column="emb",
        autocast_dtype="bfloat16",
        compile="inductor",
    )


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("name=a,model=m:f,bach_size=3", r"unknown key 'bach_size' in .*; known keys: name, model, batch_size"),
        ("name=a,model=m:f,batch_size=big", r"batch_size='big' is not an integer"),
        ("name=a,model=m:f,threads=1.5", r"threads='1.5' is not an integer"),
        ("name=a,model", r"expected key=value, got 'model'"),
        ("name=a,model=m:f,", r"expected key=value, got ''"),
        ("name=a,name=b,model=m:f", r"key 'name' given twice"),
        ("model=m:f", r"missing name in 'model=m:f'"),
        ("batch_size=3", r"missing name and model"),
    ],
)
def test_parse_stage_names_the_bad_key_or_value(text: str, message: str) -> None:
    with pytest.raises(argparse.ArgumentTypeError, match=message):
        parse_stage(text)


def _parse_error(capsys: pytest.CaptureFixture[str], *argv: str) -> str:
    with pytest.raises(SystemExit) as info:
        build_parser().parse_args(argv)
    assert info.value.code == 2
    return capsys.readouterr().err.strip().splitlines()[-1]


IO_ARGS = ["--input", "in/", "--output", "out/"]


@pytest.mark.parametrize("command", ["plan", "run"])
def test_model_and_stage_exclude_each_other_and_one_is_required(
    command: str, capsys: pytest.CaptureFixture[str]
) -> None:
    both = _parse_error(capsys, command, *IO_ARGS, "--model", "m:f", "--stage", "name=a,model=m:f")
    assert "argument --stage: not allowed with argument --model" in both
    neither = _parse_error(capsys, command, *IO_ARGS)
    assert "one of the arguments --model --stage is required" in neither
    bad = _parse_error(capsys, command, *IO_ARGS, "--stage", "name=a,model=m:f,batch=2")
    assert "argument --stage: unknown key 'batch'" in bad


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["run", *IO_ARGS, "--model", "m:f", "--cpu-budget", "0"], "argument --cpu-budget: must be >= 1, got 0"),
        (["worker", "--spec", "p", "--worker-id", "w", "--preprocess-workers", "-1"], "must be >= 0, got -1"),
        (["worker", "--spec", "p", "--worker-id", "w", "--torch-threads", "x"], "'x' is not an integer"),
        (["plan", *IO_ARGS, "--model", "m:f", "--autocast-dtype", "float32"], "argument --autocast-dtype: invalid"),
        (["plan", *IO_ARGS, "--model", "m:f", "--quarantine-limit", "-1"], "argument --quarantine-limit: must be >= 0"),
    ],
)
def test_bad_worker_and_precision_options_are_argparse_errors(
    argv: list[str], message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    assert message in _parse_error(capsys, *argv)


def test_plan_writes_the_chain_and_its_settings(
    transactions: tuple[pathlib.Path, pa.Table], tmp_path: pathlib.Path, capsys: pytest.CaptureFixture[str]
) -> None:
    directory, _ = transactions
    argv = ["plan", "--input", str(directory), "--output", str(tmp_path / "out"), *CHAIN_STAGES, "--json"]
    argv += ["--autocast-dtype", "bfloat16", "--compile", "inductor", "--quarantine-limit", "0"]
    assert main(argv) == exit_codes.OK
    spec = Ledger.open(json.loads(capsys.readouterr().out)["plan_uri"]).plan.spec
    assert [s.name for s in spec.stages] == ["embed", "classify", "rerank"]
    assert spec.stages[2].adapter == f"{CHAIN}:rerank_input" and spec.stages[0].batch_size == 64
    assert spec.model is None
    assert (spec.autocast_dtype, spec.compile, spec.quarantine_limit) == ("bfloat16", "inductor", 0)


def test_a_bad_stage_value_is_named_with_its_place_in_the_chain(
    tmp_path: pathlib.Path, capsys: pytest.CaptureFixture[str]
) -> None:
    argv = ["plan", "--input", str(tmp_path), "--output", str(tmp_path / "out")]
    argv += ["--stage", "name=a,model=m:f", "--stage", "name=b,model=m:g,batch_size=0"]
    assert main(argv) == exit_codes.ERROR
    assert "job spec field 'stages[1].batch_size' must be > 0" in capsys.readouterr().err


class _Summary:
    outcome = "finished"
    failed_for_good: tuple[str, ...] = ()
    stopped_job: str | None = None

    def to_dict(self) -> dict[str, str]:
        return {"outcome": self.outcome}


def test_worker_passes_its_sizing_options_to_run_worker(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    seen: dict[str, Any] = {}

    def fake_run_worker(plan_uri: str, worker_id: str, **kwargs: Any) -> _Summary:
        seen.update(kwargs, plan_uri=plan_uri, worker_id=worker_id)
        return _Summary()

    monkeypatch.setattr(worker_run, "run_worker", fake_run_worker)
    monkeypatch.setattr(signal, "signal", lambda *_: None)  # leave pytest's handlers alone
    argv = ["worker", "--spec", "p.json", "--worker-id", "w0", "--cpu-budget", "3", "--preprocess-workers", "0"]
    assert main(argv) == exit_codes.OK
    assert (seen["cpu_budget"], seen["preprocess_workers"], seen["torch_threads"]) == (3, 0, None)
    main(["worker", "--spec", "p.json", "--worker-id", "w0", "--torch-threads", "2"])
    assert (seen["cpu_budget"], seen["preprocess_workers"], seen["torch_threads"]) == (None, None, 2)


def test_run_worker_takes_the_options_the_cli_passes() -> None:
    params = inspect.signature(worker_run.run_worker).parameters
    assert {"cpu_budget", "preprocess_workers", "torch_threads"} <= set(params)


@pytest.mark.parametrize(
    ("options", "flags"),
    [
        ({}, []),
        ({"cpu_budget": 4}, ["--cpu-budget", "4"]),
        ({"preprocess_workers": 0}, ["--preprocess-workers", "0"]),  # 0 is a setting, not "unset"
        (
            {"cpu_budget": 2, "preprocess_workers": 1, "torch_threads": 1},
            ["--cpu-budget", "2", "--preprocess-workers", "1", "--torch-threads", "1"],
        ),
    ],
)
def test_worker_command_passes_sizing_options_the_cli_accepts(options: dict[str, int], flags: list[str]) -> None:
    cmd = worker_command("/job/attempt-000/plan.json", "worker-0", **options)
    assert cmd[cmd.index("worker-0") + 1 :] == flags
    args = build_parser().parse_args(cmd[3:])
    for name in ("cpu_budget", "preprocess_workers", "torch_threads"):
        assert getattr(args, name) == options.get(name)


def test_run_gives_each_local_worker_a_share_of_the_cpus(
    transactions: tuple[pathlib.Path, pa.Table], tmp_path: pathlib.Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    directory, _ = transactions
    calls: list[dict[str, Any]] = []

    def fake_run_local_workers(plan_uri: str, ids: list[str], **kwargs: Any) -> list[dict[str, Any]]:
        calls.append({"ids": ids, **kwargs})
        return []

    monkeypatch.setattr(local, "run_local_workers", fake_run_local_workers)
    monkeypatch.setattr(local, "available_cpus", lambda: 8)
    monkeypatch.setattr(finalize, "finalize_job", lambda *_: {"rows": 0, "shards": 0})
    argv = ["run", "--input", str(directory), "--output", str(tmp_path / "out"), "--model", "m:f", "--workers", "3"]
    assert main(argv) == exit_codes.OK
    assert main([*argv, "--cpu-budget", "5", "--preprocess-workers", "2"]) == exit_codes.OK
    assert [(c["cpu_budget"], c["preprocess_workers"], c["torch_threads"]) for c in calls] == [
        (2, None, None),
        (5, 2, None),
    ]
    assert calls[0]["ids"] == ["worker-0", "worker-1", "worker-2"]


def test_run_by_default_runs_one_worker_in_this_process_with_four_shards_to_aim_for(
    transactions: tuple[pathlib.Path, pa.Table], tmp_path: pathlib.Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    directory, _ = transactions
    seen: dict[str, Any] = {}

    def fake_plan_job(spec: Any, **kwargs: Any) -> Any:
        seen["min_shards"] = kwargs["min_shards"]
        return real_plan_job(spec, **kwargs)

    def fake_run_worker(plan_uri: str, worker_id: str, **kwargs: Any) -> _Summary:
        seen.update(kwargs, worker_id=worker_id)
        return _Summary()

    real_plan_job = planning.plan_job
    monkeypatch.setattr(planning, "plan_job", fake_plan_job)
    monkeypatch.setattr(worker_run, "run_worker", fake_run_worker)
    monkeypatch.setattr(local, "run_local_workers", lambda *_, **__: pytest.fail("no subprocess for one worker"))
    monkeypatch.setattr(signal, "signal", lambda *_: None)  # leave pytest's handlers alone
    monkeypatch.setattr(finalize, "finalize_job", lambda *_: {"rows": 0, "shards": 0})
    argv = ["run", "--input", str(directory), "--output", str(tmp_path / "out"), "--model", "m:f"]
    assert main(argv) == exit_codes.OK
    assert seen["worker_id"] == "worker-0" and seen["min_shards"] == 4
    assert (seen["cpu_budget"], seen["preprocess_workers"]) == (None, None)  # the worker sizes itself


@pytest.mark.slow
def test_run_at_defaults_reports_its_time_to_the_first_batch(
    transactions: tuple[pathlib.Path, pa.Table], tmp_path: pathlib.Path, subprocess_env: dict[str, str]
) -> None:
    directory, table = transactions
    out = tmp_path / "out"
    started = time.monotonic()
    result = _antbatch(
        *_run_args(directory, out, "--model", f"{TABULAR}:build_model", *HOOKS), "--json", env=subprocess_env
    )
    took = time.monotonic() - started
    assert result.returncode == 0, result.stderr
    [worker] = json.loads(result.stdout)["workers"]
    assert worker["exit_code"] == 0
    assert 0 < worker["summary"]["time_to_first_batch_s"] < took
    _assert_exactly_once(out, table)


@pytest.mark.slow
def test_run_scores_a_chain_given_as_stages(tmp_path: pathlib.Path, subprocess_env: dict[str, str]) -> None:
    table = write_transactions(tmp_path / "in", files=2, rows_per_file=500, row_group_size=250)
    out = tmp_path / "out"
    args = _run_args(tmp_path / "in", out, *CHAIN_STAGES, "--preprocess", f"{TABULAR}:preprocess")
    args += ["--postprocess", f"{CHAIN}:score_column", "--workers", "2", "--cpu-budget", "2", "--quarantine-limit", "0"]
    result = _antbatch(*args, "--max-shard-rows", "250", "--json", env=subprocess_env)
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout)["manifest"]["rows"] == 1000
    _assert_exactly_once(out, table)
    manifest = read_manifest(str(out))
    assert manifest is not None
    assert pq.read_schema(manifest["files"][0]["uri"]).names == ["txn_id", "score", "embedding"]


_ENTRY = """
import os, sys
from airflow_antbatch.cli import main
assert "torch" not in sys.modules, "the entry point's imports load torch before main() can set the policy"
sys.argv = ["antbatch", "--help"]
try:
    main()
except SystemExit:
    pass
print(os.environ.get("OMP_WAIT_POLICY"))
"""


@pytest.mark.parametrize(("given", "seen"), [(None, "PASSIVE"), ("ACTIVE", "ACTIVE")])
def test_the_entry_point_waits_passively_unless_told(given: str | None, seen: str) -> None:
    """The ``antbatch`` script runs ``main()`` as ``python -m airflow_antbatch`` does: both set a
    passive OpenMP wait policy before torch loads (an explicit setting wins), so the command
    the README shows runs as the benchmarked one."""
    env = {k: v for k, v in os.environ.items() if k != "OMP_WAIT_POLICY"}
    if given:
        env["OMP_WAIT_POLICY"] = given
    out = subprocess.run([sys.executable, "-c", _ENTRY], env=env, capture_output=True, text=True, check=True)
    assert out.stdout.strip().splitlines()[-1] == seen
