"""The user-code contract at both ends of the model stages.

- preprocess(RecordBatch) -> Tensor | tuple of Tensors | dict of Tensors
  (default: every numeric column except the id and kept columns, as one float32 matrix);
- each model is called as model(x), model(*x) or model(**x) under ``torch.inference_mode``
  (``model_stage.call_model``);
- postprocess(last_model_output, RecordBatch) -> dict of columns | pyarrow.Table
  (default: the output tensor as the column ``prediction``).
The id column and the kept columns are copied from the input next to the predictions.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np
import pyarrow as pa
import torch

from airflow_antbatch.errors import UserCodeError

Preprocess = Callable[[pa.RecordBatch], Any]
Postprocess = Callable[[Any, pa.RecordBatch], Any]


class OutputAssembler:
    """Turns the last model output of a batch into output rows, with the id and kept columns."""

    def __init__(
        self,
        *,
        postprocess: Postprocess | None = None,
        id_column: str | None = None,
        keep_columns: Sequence[str] = (),
    ) -> None:
        self.passthrough = ([id_column] if id_column else []) + list(keep_columns)
        self._postprocess = postprocess or _prediction_column

    def check_input(self, batch: pa.RecordBatch) -> None:
        missing = [c for c in self.passthrough if c not in batch.schema.names]
        if missing:
            raise UserCodeError(f"input lacks the id/keep column(s) {missing}; it has {batch.schema.names}")

    def __call__(self, output: Any, batch: pa.RecordBatch, kept: Mapping[str, Any] | None = None) -> pa.Table:
        """``kept`` holds outputs of earlier stages that the chain keeps as columns."""
        try:
            result = self._postprocess(output, batch)
        except UserCodeError:
            raise
        except Exception as exc:
            raise UserCodeError(f"postprocess hook raised {exc!r}") from exc
        table = self._assemble(batch, result)
        for name, values in (kept or {}).items():
            if name in table.column_names:
                raise UserCodeError(f"the kept stage output column {name!r} clashes with a postprocess column")
            table = table.append_column(name, _to_arrow(name, values))
        return table

    def _assemble(self, batch: pa.RecordBatch, result: Any) -> pa.Table:
        if isinstance(result, pa.RecordBatch):
            result = pa.Table.from_batches([result])
        if isinstance(result, Mapping):
            result = pa.table({name: _to_arrow(name, values) for name, values in result.items()})
        if not isinstance(result, pa.Table):
            raise UserCodeError(
                f"postprocess must return a dict of columns or a pyarrow Table, got {type(result).__name__}"
            )
        if result.num_rows != batch.num_rows:
            raise UserCodeError(f"postprocess returned {result.num_rows} rows for a batch of {batch.num_rows}")
        clash = sorted(set(result.column_names) & set(self.passthrough))
        if clash:
            raise UserCodeError(f"postprocess output column(s) {clash} clash with the id/keep columns")
        kept = {name: batch.column(name) for name in self.passthrough}
        return pa.table({**kept, **{name: result.column(name) for name in result.column_names}})


class NumericFeatures:
    """The default preprocess: every numeric column except the id/kept ones, as one float32 matrix."""

    def __init__(self, passthrough: Sequence[str]) -> None:
        self.passthrough = set(passthrough)

    def __call__(self, batch: pa.RecordBatch) -> torch.Tensor:
        names = [
            f.name
            for f in batch.schema
            if f.name not in self.passthrough and (pa.types.is_integer(f.type) or pa.types.is_floating(f.type))
        ]
        if not names:
            raise UserCodeError(
                f"the default preprocess needs numeric feature columns, but the input has only {batch.schema.names} "
                "besides the id/keep columns: supply a preprocess hook"
            )
        matrix = np.column_stack([batch.column(n).to_numpy(zero_copy_only=False) for n in names])
        return torch.from_numpy(matrix.astype(np.float32, copy=False))


def _prediction_column(output: Any, batch: pa.RecordBatch) -> dict[str, Any]:
    if not isinstance(output, torch.Tensor):
        raise UserCodeError(
            f"the default postprocess takes one output tensor, the model returned {type(output).__name__}: "
            "supply a postprocess hook"
        )
    return {"prediction": output}


def _to_arrow(name: str, values: Any) -> pa.Array | pa.ChunkedArray:
    if isinstance(values, pa.Array | pa.ChunkedArray):
        return values
    if isinstance(values, torch.Tensor):
        values = values.detach().cpu().numpy()
    if isinstance(values, np.ndarray):
        if values.ndim == 2 and values.shape[1] == 1:
            values = values[:, 0]
        if values.ndim == 1:
            return pa.array(values)
        if values.ndim == 2:
            flat = pa.array(np.ascontiguousarray(values).reshape(-1))
            return pa.FixedSizeListArray.from_arrays(flat, values.shape[1])
        raise UserCodeError(f"output column {name!r} has {values.ndim} dimensions; at most 2 fit a column")
    try:
        return pa.array(values)
    except (pa.ArrowException, TypeError) as exc:
        raise UserCodeError(f"output column {name!r} cannot become an Arrow column: {exc}") from exc
