"""Do the systems agree? Every system's output of the last repeat, joined on ``id``.

A faster system that scores different rows, or scores them differently, has not won anything:
the harness checks that each system wrote every input row once, with the naive loop's top
class, and reports the largest difference in top score (float noise from batching aside, none).
"""

from __future__ import annotations

import glob
import os
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq


def read_output(directory: str) -> pa.Table:
    """A system's output files, bookkeeping (the ledger, quarantine) left out, sorted by id."""
    files = [
        f
        for f in glob.glob(os.path.join(directory, "**", "*.parquet"), recursive=True)
        if not any(part.startswith("_") for part in os.path.relpath(f, directory).split(os.sep))
    ]
    return pa.concat_tables([pq.read_table(f, columns=["id", "top_class", "top_score"]) for f in files]).sort_by("id")


def compare(directories: dict[str, str], reference: str, rows: int) -> dict[str, Any]:
    """Per system: rows written, whether ids and top classes match the reference, max score difference."""
    tables = {name: read_output(path) for name, path in directories.items()}
    base = tables[reference]
    out: dict[str, Any] = {}
    for name, table in tables.items():
        same_ids = table.num_rows == base.num_rows and np.array_equal(table["id"].to_numpy(), base["id"].to_numpy())
        out[name] = {
            "rows": table.num_rows,
            "every_row_once": table.num_rows == rows and len(np.unique(table["id"].to_numpy())) == rows,
            "top_class_equal": bool(
                same_ids and np.array_equal(table["top_class"].to_numpy(), base["top_class"].to_numpy())
            ),
            "max_top_score_diff": float(
                np.abs(table["top_score"].to_numpy() - base["top_score"].to_numpy()).max() if same_ids else np.inf
            ),
        }
    out["all_agree"] = all(v["every_row_once"] and v["top_class_equal"] for v in out.values() if isinstance(v, dict))
    return out
