"""The ``antbatch`` CLI end to end, in real subprocesses: runs, kills, reruns and clear errors."""

from __future__ import annotations

import collections
import json
import os
import pathlib
import signal
import subprocess
import sys
import time

import pyarrow as pa
import pytest

from airflow_antbatch import exit_codes
from airflow_antbatch.ledger import Ledger
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
    plan_uri = str(out / "_antbatch" / "attempt-000" / "plan.json")
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
def test_sigterm_releases_the_shard_and_exits_with_the_preempted_code(
    transactions: tuple[pathlib.Path, pa.Table], tmp_path: pathlib.Path, subprocess_env: dict[str, str]
) -> None:
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
        [*ANTBATCH, "worker", "--spec", plan_uri, "--worker-id", "w0"], stdout=subprocess.PIPE, text=True, env=env
    )
    _wait_for_marker(markers, timeout=60)
    worker.send_signal(signal.SIGTERM)
    stdout, _ = worker.communicate(timeout=60)
    assert worker.returncode == exit_codes.PREEMPTED
    assert json.loads(stdout)["outcome"] == "preempted"
    ledger = Ledger.open(plan_uri)
    assert len(ledger.store.list("releases")) == 1
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
