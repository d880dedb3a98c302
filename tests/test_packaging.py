"""The distributions users install: ``python -m build`` output, its metadata and what it ships.

Installing the wheel into fresh virtualenvs (with Airflow, and without) is ``make install-check``
(scripts/check_install.sh): it needs minutes of pip, so it is not part of this suite.
"""

from __future__ import annotations

import email.parser
import pathlib
import shutil
import subprocess
import sys
import tarfile
import zipfile

import pytest

import airflow_antbatch
from airflow_antbatch.get_provider_info import get_provider_info
from tests.conftest import REPO_ROOT

pytestmark = pytest.mark.slow

DIST = f"airflow_antbatch-{airflow_antbatch.__version__}"


@pytest.fixture(scope="module")
def dist(tmp_path_factory: pytest.TempPathFactory) -> dict[str, pathlib.Path]:
    """Wheel and sdist, built once in an isolated build environment as a release would be.

    Built from a copy of the checkout's files: setuptools writes ``*.egg-info`` into the
    source tree, and one left in the repository makes Airflow see the provider's entry
    points twice in the tests that follow."""
    out = tmp_path_factory.mktemp("dist")
    src = tmp_path_factory.mktemp("src")
    listed = subprocess.run(
        ["git", "ls-files", "--cached", "--others", "--exclude-standard"],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        check=True,
    ).stdout.splitlines()
    for name in listed:
        if (REPO_ROOT / name).is_file():
            (src / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(REPO_ROOT / name, src / name)
    result = subprocess.run(
        [sys.executable, "-m", "build", "--outdir", str(out), str(src)],
        capture_output=True,
        text=True,
        timeout=240,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "deprecat" not in (result.stdout + result.stderr).lower(), result.stdout + result.stderr
    return {"wheel": out / f"{DIST}-py3-none-any.whl", "sdist": out / f"{DIST}.tar.gz"}


def test_twine_accepts_the_metadata(dist: dict[str, pathlib.Path]) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "twine", "check", "--strict", *map(str, dist.values())],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_the_wheel_ships_only_the_package(dist: dict[str, pathlib.Path]) -> None:
    names = zipfile.ZipFile(dist["wheel"]).namelist()
    tops = {name.split("/")[0] for name in names}
    assert tops == {"airflow_antbatch", f"{DIST}.dist-info"}
    assert "airflow_antbatch/examples/tabular.py" in names  # the example DAG's model and hooks


def test_the_sdist_holds_what_builds_the_wheel_and_no_partial_test_suite(dist: dict[str, pathlib.Path]) -> None:
    with tarfile.open(dist["sdist"]) as sdist:
        names = {name.removeprefix(f"{DIST}/") for name in sdist.getnames()}
    assert {"pyproject.toml", "README.md", "airflow_antbatch/cli.py", "PKG-INFO"} <= names
    assert not {name for name in names if name.startswith(("tests", "bench", "dags", "scripts", "docker"))}


def test_metadata_keeps_airflow_out_of_the_base_install(dist: dict[str, pathlib.Path]) -> None:
    wheel = zipfile.ZipFile(dist["wheel"])
    meta = email.parser.Parser().parsestr(wheel.read(f"{DIST}.dist-info/METADATA").decode())
    assert (meta["Name"], meta["Version"]) == ("airflow-antbatch", airflow_antbatch.__version__)
    assert meta["License-Expression"] == "Apache-2.0"
    assert "Framework :: Apache Airflow :: Provider" in (meta.get_all("Classifier") or [])
    assert {"airflow", "s3"} <= set(meta.get_all("Provides-Extra") or [])
    requires: list[str] = meta.get_all("Requires-Dist") or []
    base = [r for r in requires if "extra ==" not in r]
    assert any(r.startswith("torch") for r in base)
    assert not [r for r in base if "airflow" in r], "a worker image would pull in Airflow"
    assert any(r.startswith("apache-airflow-providers-cncf-kubernetes") and 'extra == "airflow"' in r for r in requires)


def test_entry_points_register_the_provider_and_the_cli(dist: dict[str, pathlib.Path]) -> None:
    text = zipfile.ZipFile(dist["wheel"]).read(f"{DIST}.dist-info/entry_points.txt").decode()
    assert "[apache_airflow_provider]\nprovider_info = airflow_antbatch.get_provider_info:get_provider_info" in text
    assert "[console_scripts]\nantbatch = airflow_antbatch.cli:main" in text
    # Airflow's provider discovery refuses a provider whose package-name is not the distribution.
    assert get_provider_info()["package-name"] == "airflow-antbatch"
