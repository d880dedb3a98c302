"""What every system process shares: its configuration, the models of a workload, the result file.

A system process imports torch and the workload, builds the models (``startup_s``, reported
apart), then times the job from its first read to its last output file (``run_s``): rows/s
is ``rows / run_s``. The wall-clock window goes into the result so that the monitor outside
can tell the CPU the tree used during the job alone.
"""

from __future__ import annotations

import dataclasses
import json
import os
import sys
import time
from typing import Any

import numpy as np
import pyarrow as pa


@dataclasses.dataclass
class RunConfig:
    """One system run, as the orchestrator writes it (JSON on the command line)."""

    system: str
    workload: str  # a key of bench.workloads.MODELS
    input_dir: str  # local directory of the generated Parquet files
    output_dir: str  # local: every system writes its output to local disk
    result_path: str
    batch_size: int
    threads: int = 1
    options: dict[str, Any] = dataclasses.field(default_factory=dict)

    @classmethod
    def from_argv(cls) -> RunConfig:
        return cls(**json.loads(sys.argv[1]))

    def input_files(self) -> list[str]:
        return sorted(os.path.join(self.input_dir, n) for n in os.listdir(self.input_dir) if n.endswith(".parquet"))


def write_result(config: RunConfig, result: dict[str, Any]) -> None:
    payload = {"system": config.system, "workload": config.workload, "batch_size": config.batch_size, **result}
    tmp = config.result_path + ".tmp"
    with open(tmp, "w") as handle:
        json.dump(payload, handle, indent=1, default=_jsonable)
    os.replace(tmp, config.result_path)


def _jsonable(value: Any) -> Any:
    if isinstance(value, np.generic):
        return value.item()
    return str(value)


def build_models(workload: str) -> list[Any]:
    """The workload's models, in chain order (one for a single model)."""
    from bench import workloads

    return workloads.build_models(workload)


def infer(models: list[Any], inputs: dict[str, Any], batch: pa.RecordBatch) -> Any:
    """The models on one preprocessed batch, called the way the antbatch worker calls them."""
    from bench import workloads

    if len(models) == 1:
        return models[0](**inputs)
    return workloads.run_chain(models, inputs, batch)


def output_table(ids: pa.Array | np.ndarray, columns: dict[str, Any]) -> pa.Table:
    """``id`` plus the postprocess columns; 2-D columns become fixed-size lists (as in antbatch)."""
    out: dict[str, Any] = {"id": ids}
    for name, values in columns.items():
        array = values.detach().cpu().numpy() if hasattr(values, "detach") else np.asarray(values)
        if array.ndim == 2:
            out[name] = pa.FixedSizeListArray.from_arrays(
                pa.array(np.ascontiguousarray(array).reshape(-1)), array.shape[1]
            )
        else:
            out[name] = pa.array(array)
    return pa.table(out)


class StageTimer:
    """Seconds per stage of a sequential loop."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = {}
        self._last = time.perf_counter()

    def lap(self, stage: str) -> None:
        now = time.perf_counter()
        self.seconds[stage] = self.seconds.get(stage, 0.0) + now - self._last
        self._last = now

    def reset(self) -> None:
        self._last = time.perf_counter()

    def rounded(self) -> dict[str, float]:
        return {k: round(v, 3) for k, v in self.seconds.items()}
