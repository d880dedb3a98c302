"""Import boundaries: the worker side runs without Airflow; the package root without torch."""

from __future__ import annotations

import subprocess
import sys

import pytest

WORKER_SIDE = [
    "airflow_antbatch.cli",
    "airflow_antbatch.finalize",
    "airflow_antbatch.ledger",
    "airflow_antbatch.merge",
    "airflow_antbatch.object_reader",
    "airflow_antbatch.planning",
    "airflow_antbatch.progress",
    "airflow_antbatch.spec",
    "airflow_antbatch.status_view",
    "airflow_antbatch.store",
    "airflow_antbatch.worker.local",
    "airflow_antbatch.worker.loop",
    "airflow_antbatch.worker.near_cache",
    "airflow_antbatch.worker.run",
]

_BLOCK_AIRFLOW = """
import sys
class Block:
    def find_spec(self, name, path=None, target=None):
        if name == "airflow" or name.startswith("airflow."):
            raise ImportError(f"airflow is hidden in this test: {name}")
sys.meta_path.insert(0, Block())
"""


@pytest.mark.parametrize("module", WORKER_SIDE)
def test_worker_side_imports_without_airflow(module: str) -> None:
    code = _BLOCK_AIRFLOW + f"import {module}\nassert not any(m.startswith('airflow.') for m in sys.modules)"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr


def test_package_root_does_not_import_torch_or_pyarrow() -> None:
    code = "import sys, airflow_antbatch; print(sorted(m for m in ('torch', 'pyarrow') if m in sys.modules))"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "[]"
