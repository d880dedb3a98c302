"""Row-wise operations on model inputs and outputs: tensors, arrays, and dicts/tuples of them.

Stages of a chain may use different batch sizes, so one stage's outputs are cut and joined
along the first dimension (rows) before the next stage sees them.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np
import torch

from airflow_antbatch.errors import UserCodeError


def slice_tree(value: Any, start: int, stop: int) -> Any:
    if isinstance(value, torch.Tensor | np.ndarray):
        return value[start:stop]
    if isinstance(value, Mapping):
        return {k: slice_tree(v, start, stop) for k, v in value.items()}
    if isinstance(value, tuple | list):
        return type(value)(slice_tree(v, start, stop) for v in value)
    return value


def concat_tree(values: list[Any], where: str) -> Any:
    """Join row-wise; ``where`` names the stage in the error when shapes do not line up."""
    first = values[0]
    if len(values) == 1:
        return first
    try:
        if isinstance(first, torch.Tensor):
            return torch.cat(values)
        if isinstance(first, np.ndarray):
            return np.concatenate(values)
    except (RuntimeError, ValueError) as exc:
        raise UserCodeError(
            f"{where}: cannot join batches of shapes {[tuple(v.shape) for v in values]} to re-batch them; "
            "give the stages the same batch_size or make the output's trailing dimensions fixed"
        ) from exc
    if isinstance(first, Mapping):
        return {k: concat_tree([v[k] for v in values], where) for k in first}
    if isinstance(first, tuple | list):
        return type(first)(concat_tree([v[i] for v in values], where) for i in range(len(first)))
    return first
