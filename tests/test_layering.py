"""Import boundaries: the worker side runs without Airflow; the package root without torch."""

from __future__ import annotations

import ast
import pathlib
import subprocess
import sys

import pytest

import airflow_antbatch

WORKER_SIDE = [
    "airflow_antbatch.cli",
    "airflow_antbatch.finalize",
    "airflow_antbatch.ledger",
    "airflow_antbatch.merge",
    "airflow_antbatch.object_reader",
    "airflow_antbatch.planning",
    "airflow_antbatch.pool.controller",
    "airflow_antbatch.pool.policy",
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


PACKAGE = pathlib.Path(airflow_antbatch.__file__).parent
ROLE_MODULES = ["operators", "sensors", "triggers", "hooks", "plugins", "task_group.py"]
# The one place for Airflow's names, and the fence around the cncf-kubernetes provider's.
AIRFLOW_IMPORTERS = {"version_compat.py", "operators/kpo_adapter.py"}


def _airflow_imports(path: pathlib.Path) -> list[str]:
    """Every ``import airflow...`` / ``from airflow... import`` in a file, at any depth
    (TYPE_CHECKING blocks and function bodies included), as ``line: module``."""
    found = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        modules = []
        if isinstance(node, ast.Import):
            modules = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            modules = [node.module]
        found += [f"{node.lineno}: {m}" for m in modules if m == "airflow" or m.startswith("airflow.")]
    return found


def _role_files() -> list[pathlib.Path]:
    files = []
    for entry in ROLE_MODULES:
        where = PACKAGE / entry
        files += sorted(where.rglob("*.py")) if where.is_dir() else [where] if where.exists() else []
    return files


def test_role_modules_import_airflow_only_through_version_compat() -> None:
    assert len(_role_files()) > 10  # the walk found the modules
    offenders = {
        str(path.relative_to(PACKAGE)): imports
        for path in _role_files()
        if str(path.relative_to(PACKAGE)) not in AIRFLOW_IMPORTERS and (imports := _airflow_imports(path))
    }
    assert offenders == {}, "import these through airflow_antbatch/version_compat.py (re-export them there)"


def test_the_checker_sees_nested_and_type_checking_imports(tmp_path: pathlib.Path) -> None:
    module = tmp_path / "m.py"
    module.write_text(
        "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from airflow.sdk import Context\n"
        "def f():\n    import airflow.configuration\nimport airflow_antbatch\n"
    )
    assert _airflow_imports(module) == ["3: airflow.sdk", "5: airflow.configuration"]
