"""Security: no secret leaks into what a job writes or prints, and a tampered plan cannot
make a worker write outside the output prefix."""

from __future__ import annotations

import json
import os
import pathlib
import subprocess
import sys

import fsspec
import pyarrow as pa
import pytest

from airflow_antbatch.errors import LedgerCorruptError
from airflow_antbatch.ledger import Ledger
from airflow_antbatch.planning import plan_job
from airflow_antbatch.spec import JobSpec
from tests.conftest import TABULAR, write_transactions
from tests.s3_servers import SECRET_KEY, StoreLocation


def test_a_plan_naming_a_shard_outside_the_output_is_refused(tmp_path: pathlib.Path) -> None:
    """Shard ids name output files; a plan whose ids are strings of any kind is not a planner's."""
    write_transactions(tmp_path / "in", files=1, rows_per_file=10, row_group_size=10)
    spec = JobSpec(input_uri=str(tmp_path / "in"), output_uri=str(tmp_path / "out"), model=f"{TABULAR}:build_model")
    plan_uri = plan_job(spec).plan_uri
    table = pa.ipc.open_file(pa.BufferReader(pathlib.Path(plan_uri).read_bytes())).read_all()
    index = table.schema.get_field_index("shard")
    tampered = table.set_column(index, "shard", pa.array(["../../../escaped"] * table.num_rows))
    sink = pa.BufferOutputStream()
    with pa.ipc.new_file(sink, tampered.schema) as writer:
        writer.write_table(tampered)
    pathlib.Path(plan_uri).write_bytes(sink.getvalue().to_pybytes())
    with pytest.raises(LedgerCorruptError, match="plan columns"):
        Ledger.open(plan_uri)


@pytest.mark.slow
def test_no_secret_reaches_the_ledger_the_output_or_the_logs(
    seaweedfs_location: StoreLocation, tmp_path: pathlib.Path, subprocess_env: dict[str, str]
) -> None:
    """Credentials come from the environment; after a run, nothing the job wrote or printed holds them."""
    write_transactions(tmp_path / "in", files=2, rows_per_file=50, row_group_size=25)
    options = seaweedfs_location.storage_options
    fs = fsspec.filesystem("s3", **options)
    fs.put(str(tmp_path / "in") + "/", f"{seaweedfs_location.url}/in", recursive=True)
    env = {**subprocess_env, **{k: v for k, v in os.environ.items() if k.startswith("AWS_")}}
    assert env["AWS_SECRET_ACCESS_KEY"] == SECRET_KEY
    args = [
        sys.executable, "-m", "airflow_antbatch", "--storage-options", json.dumps(options), "run",
        "--input", f"{seaweedfs_location.url}/in", "--output", f"{seaweedfs_location.url}/out",
        "--model", f"{TABULAR}:build_model", "--preprocess", f"{TABULAR}:preprocess", "--id-column", "txn_id",
        "--workers", "1", "--json",
    ]  # fmt: skip
    result = subprocess.run(args, capture_output=True, text=True, env=env, timeout=180)
    assert result.returncode == 0, result.stderr
    assert SECRET_KEY not in result.stdout + result.stderr
    written = fs.find(f"{seaweedfs_location.url}/out")
    assert any("/_antbatch/" in p for p in written) and any(p.endswith("_SUCCESS") for p in written)
    leaks = [p for p in written if SECRET_KEY.encode() in fs.cat_file(p)]
    assert leaks == []
