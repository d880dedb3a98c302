"""The GPU check's dry run (``python -m bench.gpu --dry-run``): the whole script on a CPU with toy
models, as the lent GPU machine would run it (no Airflow imported), and its docs renderer."""

from __future__ import annotations

import json
import os
import pathlib
import subprocess
import sys

import pytest

from bench import gpu_report
from tests.conftest import REPO_ROOT

# Runs the check as `make gpu-check` does, then fails if anything of Airflow was imported: the
# lent machine has none.
_RUN = (
    "import runpy, sys; sys.argv = ['bench.gpu', '--dry-run', '--out', sys.argv[1], '--work', sys.argv[2]]\n"
    "try:\n    runpy.run_module('bench.gpu', run_name='__main__')\n"
    "except SystemExit as exc:\n    code = exc.code\n"
    "airflow = sorted(m for m in sys.modules if m == 'airflow' or m.startswith('airflow.'))\n"
    "assert not airflow, airflow[:5]\nsys.exit(code)\n"
)


@pytest.fixture(scope="module")
def dry_run(tmp_path_factory: pytest.TempPathFactory) -> dict[str, object]:
    folder = tmp_path_factory.mktemp("gpu")
    out = folder / "gpu.json"
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT), "OMP_NUM_THREADS": "1"}
    done = subprocess.run(
        [sys.executable, "-c", _RUN, str(out), str(folder)],
        cwd=REPO_ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=240,
    )
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-4000:]
    result: dict[str, object] = json.loads(out.read_text())
    return result


def test_the_dry_run_scores_every_row_with_both_systems_and_compiles_once(dry_run: dict[str, object]) -> None:
    workloads = dry_run["workloads"]
    assert isinstance(workloads, dict) and set(workloads) == {"images", "text"}
    for name, record in workloads.items():
        assert record["naive"]["rows"] == record["antbatch"]["rows"] == record["rows"] > 0, name
        assert record["check"] == {"same_ids": True, "label_agreement": 1.0}, name
        assert record["speedup"] > 0
    assert workloads["text"]["antbatch_compile"]["rows"] == workloads["text"]["rows"]
    assert "skipped" in workloads["images"]["antbatch_compile"]
    assert dry_run["dry_run"] is True and "skipped" in dry_run["ray"]


def test_the_renderer_tabulates_a_result_and_says_when_none_exists(
    dry_run: dict[str, object], tmp_path: pathlib.Path
) -> None:
    assert "Not run yet" in gpu_report.render(tmp_path)
    (tmp_path / "gpu.json").write_text(json.dumps(dry_run))
    text = gpu_report.render(tmp_path)
    assert "| images | 32 |" in text and "| text | 32 |" in text
    assert "skipped: a dry run compiles the text job only" in text


def test_without_a_gpu_the_real_check_stops_at_once_with_a_clear_message(tmp_path: pathlib.Path) -> None:
    from bench import gpu

    if gpu.torch.cuda.is_available():
        pytest.skip("a CUDA device is present: the real check would run")
    assert gpu.main(["--out", str(tmp_path / "gpu.json")]) == 2
    assert not (tmp_path / "gpu.json").exists()
