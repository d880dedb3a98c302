"""User code by reference: clear errors that name the reference and its role."""

from __future__ import annotations

import pathlib
from typing import Any

import pytest
import torch

from airflow_antbatch.errors import UserCodeError
from airflow_antbatch.worker.user_code import load_callable, load_model

TABULAR = "airflow_antbatch.examples.tabular"


@pytest.mark.parametrize(
    ("ref", "message"),
    [
        ("no_colon_here", "is not an import path of the form 'package.module:function'"),
        ("no_such_pkg_xyz.mod:f", "cannot import module 'no_such_pkg_xyz.mod'"),
        (f"{TABULAR}:missing", f"module '{TABULAR}' has no attribute 'missing'"),
        (f"{TABULAR}:MERCHANTS", "is not callable"),
    ],
)
def test_bad_references_are_explained(ref: str, message: str) -> None:
    with pytest.raises(UserCodeError, match=message):
        load_callable(ref, "preprocess hook")


def test_factory_errors_and_non_modules_are_explained() -> None:
    with pytest.raises(UserCodeError, match=r"model factory 'tests.slow_model:broken_factory' raised ImportError"):
        load_model("tests.slow_model:broken_factory", device="cpu")
    with pytest.raises(UserCodeError, match="gave a dict, not a torch.nn.Module"):
        load_model("builtins:dict", device="cpu")


def test_factory_model_is_in_eval_mode() -> None:
    model = load_model(f"{TABULAR}:build_model", device="cpu")
    assert not model.training


def _save_exported(model: torch.nn.Module, path: pathlib.Path) -> None:
    from airflow_antbatch.examples.tabular import FEATURES

    torch.export.save(torch.export.export(model, (torch.ones(2, FEATURES),)), str(path))


# TorchScript is deprecated in torch 2.13 but still what many teams have on disk.
@pytest.mark.filterwarnings("ignore:`torch.jit.* is deprecated:DeprecationWarning")
@pytest.mark.parametrize(
    ("name", "save"),
    [
        ("model.pt", lambda m, p: torch.jit.save(torch.jit.script(m), str(p))),
        ("model.pt2", _save_exported),
    ],
)
def test_saved_model_loads_from_a_url(tmp_path: pathlib.Path, name: str, save: Any) -> None:
    from airflow_antbatch.examples.tabular import FEATURES, build_model

    path = tmp_path / name
    save(build_model(), path)
    model = load_model(f"file://{path}", device="cpu")
    x = torch.ones(2, FEATURES)
    assert torch.allclose(model(x), build_model()(x))


def test_missing_saved_model_is_explained(tmp_path: pathlib.Path) -> None:
    with pytest.raises(UserCodeError, match="saved model .*nope.pt' does not exist"):
        load_model(str(tmp_path / "nope.pt"), device="cpu")


def test_a_pickled_module_is_refused_unless_the_workers_owner_trusts_it(
    tmp_path: pathlib.Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from airflow_antbatch.examples.tabular import FEATURES, build_model
    from airflow_antbatch.worker.user_code import TRUST_PICKLED_MODELS_ENV

    path = tmp_path / "model.pth"
    torch.save(build_model(), path)
    with pytest.raises(UserCodeError, match=f"pickled Python object.*set {TRUST_PICKLED_MODELS_ENV}=1"):
        load_model(str(path), device="cpu")
    monkeypatch.setenv(TRUST_PICKLED_MODELS_ENV, "1")
    x = torch.ones(2, FEATURES)
    assert torch.allclose(load_model(str(path), device="cpu")(x), build_model()(x))


def test_saved_weights_are_not_taken_for_a_model(tmp_path: pathlib.Path) -> None:
    from airflow_antbatch.examples.tabular import build_model

    path = tmp_path / "weights.pt"
    torch.save(build_model().state_dict(), path)
    with pytest.raises(UserCodeError, match=r"holds a (Ordered)?[Dd]ict \(weights\?\), not a model"):
        load_model(str(path), device="cpu")
