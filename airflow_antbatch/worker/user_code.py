"""Loading user code by reference: ``pkg.module:attr`` import paths, or saved model files.

Failures become ``UserCodeError`` naming the reference and the role it was meant to play, so
that a typo in a DAG is one clear line in the task log, before any shard is claimed.
"""

from __future__ import annotations

import importlib
import io
import os
import pickle
from typing import TYPE_CHECKING, Any, cast

import fsspec
import torch

from airflow_antbatch.errors import UserCodeError

if TYPE_CHECKING:
    from collections.abc import Callable

_SAVED_MODEL_SUFFIXES = (".pt", ".pth", ".ts", ".torchscript", ".pt2")
# Set to 1 on the workers to load torch.save'd modules (full pickles) from model URLs.
TRUST_PICKLED_MODELS_ENV = "ANTBATCH_TRUST_PICKLED_MODELS"


def load_callable(ref: str, role: str) -> Callable[..., Any]:
    """Import ``pkg.module:attr`` (dots after the colon walk attributes)."""
    module_name, sep, attr_path = ref.partition(":")
    if not sep or not module_name or not attr_path:
        raise UserCodeError(f"{role} {ref!r} is not an import path of the form 'package.module:function'")
    try:
        target: Any = importlib.import_module(module_name)
    except Exception as exc:
        raise UserCodeError(f"{role} {ref!r}: cannot import module {module_name!r}: {exc!r}") from exc
    for part in attr_path.split("."):
        try:
            target = getattr(target, part)
        except AttributeError as exc:
            raise UserCodeError(f"{role} {ref!r}: module {module_name!r} has no attribute {attr_path!r}") from exc
    if not callable(target):
        raise UserCodeError(f"{role} {ref!r} is not callable (got {type(target).__name__})")
    return target  # type: ignore[no-any-return]


def load_model(ref: str, *, device: str, storage_options: dict[str, Any] | None = None) -> torch.nn.Module:
    """A model in eval mode on ``device``, from a factory import path or a saved file URL."""
    if ref.lower().endswith(_SAVED_MODEL_SUFFIXES) and ":" not in ref.split("://", 1)[-1]:
        model = _load_saved(ref, storage_options or {})
    else:
        factory = load_callable(ref, "model factory")
        try:
            model = factory()
        except Exception as exc:
            raise UserCodeError(f"model factory {ref!r} raised {exc!r}") from exc
    if not isinstance(model, torch.nn.Module):
        raise UserCodeError(f"model {ref!r} gave a {type(model).__name__}, not a torch.nn.Module")
    try:
        model = model.to(device)
        # A torch.export program keeps the mode it was exported in and refuses eval().
        return model if ref.lower().endswith(".pt2") else model.eval()
    except (RuntimeError, AssertionError) as exc:
        raise UserCodeError(f"model {ref!r} cannot be moved to device {device!r}: {exc}") from exc


def _load_saved(url: str, storage_options: dict[str, Any]) -> torch.nn.Module:
    try:
        with fsspec.open(url, "rb", **storage_options) as handle:
            data = io.BytesIO(handle.read())
    except FileNotFoundError as exc:
        raise UserCodeError(f"saved model {url!r} does not exist") from exc
    try:
        if url.lower().endswith(".pt2"):
            loaded: Any = torch.export.load(data).module()
        else:
            loaded = torch.jit.load(data, map_location="cpu")  # type: ignore[no-untyped-call]
        return cast(torch.nn.Module, loaded)
    except Exception as exc:
        error = exc
    return _load_torch_saved(url, data, error)


def _load_torch_saved(url: str, data: io.BytesIO, error: Exception) -> torch.nn.Module:
    """A ``torch.save``d file: weights alone are refused; a whole module is a pickle, and
    unpickling runs code, so it loads only where the workers' owner opted in."""
    data.seek(0)
    try:
        weights = torch.load(data, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError:
        pass  # more than tensors inside: a pickled module
    except Exception:
        raise UserCodeError(f"saved model {url!r} cannot be loaded by torch: {error!r}") from error
    else:
        raise UserCodeError(
            f"saved model {url!r} holds a {type(weights).__name__} (weights?), not a model: load it in a model factory"
        )
    if os.environ.get(TRUST_PICKLED_MODELS_ENV) != "1":
        raise UserCodeError(
            f"saved model {url!r} is a pickled Python object, and unpickling can run any code, so it is not "
            f"loaded: save it with torch.export (.pt2) or TorchScript (.pt), or, if you trust where it comes from, "
            f"set {TRUST_PICKLED_MODELS_ENV}=1 in the workers' environment"
        )
    data.seek(0)
    loaded = torch.load(data, map_location="cpu", weights_only=False)
    if not isinstance(loaded, torch.nn.Module):
        raise UserCodeError(f"saved model {url!r} holds a {type(loaded).__name__}, not a torch.nn.Module")
    return loaded
