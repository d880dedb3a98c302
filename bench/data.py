"""Generated, seeded input data: nothing is downloaded, and every run scores the same rows.

Text rows are 5..120 words drawn from a made-up vocabulary (mixed case, some punctuation), so
the tokenizer has real work to do; several Parquet files of several row groups each, like the
output of a Spark job. The straggler job gets small numeric files, one per shard.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
from typing import TYPE_CHECKING

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from bench.vocab import PUNCTUATION, words

if TYPE_CHECKING:
    from collections.abc import Callable

MIN_WORDS, MAX_WORDS = 5, 120


@dataclasses.dataclass(frozen=True)
class TextData:
    rows: int
    files: int
    row_group_rows: int
    seed: int = 7

    def key(self) -> str:
        return f"text-{self.rows}r-{self.files}f-{self.row_group_rows}g-s{self.seed}"


def _texts(rng: np.random.Generator, rows: int) -> list[str]:
    """Rows of 5..120 words with Zipf-distributed ranks, some capitalised, some punctuated."""
    vocabulary = words()
    lengths = rng.integers(MIN_WORDS, MAX_WORDS + 1, size=rows)
    total = int(lengths.sum())
    ranks = np.minimum(rng.zipf(1.1, size=total) - 1, len(vocabulary) - 1).tolist()
    capital = (rng.random(total) < 0.1).tolist()
    marks = np.where(rng.random(total) < 0.1, rng.choice(np.array(list(PUNCTUATION)), size=total), "").tolist()
    drawn = [
        (vocabulary[r].capitalize() if c else vocabulary[r]) + m for r, c, m in zip(ranks, capital, marks, strict=True)
    ]
    out, start = [], 0
    for n in lengths.tolist():
        out.append(" ".join(drawn[start : start + n]))
        start += n
    return out


def _publish(directory: str, fill: Callable[[str], None]) -> list[str]:
    """Generate into a private folder, then rename it into place: runs side by side never see half a dataset."""
    if not os.path.isdir(directory):
        tmp = f"{directory}.tmp-{os.getpid()}"
        shutil.rmtree(tmp, ignore_errors=True)
        os.makedirs(tmp)
        fill(tmp)
        try:
            os.rename(tmp, directory)
        except OSError:  # another run published it first
            shutil.rmtree(tmp, ignore_errors=True)
    return sorted(os.path.join(directory, n) for n in os.listdir(directory) if n.endswith(".parquet"))


def write_text(root: str, spec: TextData) -> list[str]:
    """The dataset's files (absolute paths), generating them once under ``root``."""

    def fill(directory: str) -> None:
        rng = np.random.default_rng(spec.seed)
        per_file = -(-spec.rows // spec.files)
        for index in range(spec.files):
            start = index * per_file
            count = min(per_file, spec.rows - start)
            table = pa.table(
                {"id": pa.array(np.arange(start, start + count, dtype=np.int64)), "text": _texts(rng, count)}
            )
            path = os.path.join(directory, f"part-{index:03d}.parquet")
            pq.write_table(table, path, row_group_size=spec.row_group_rows)
        with open(os.path.join(directory, "_spec.json"), "w") as handle:
            json.dump(dataclasses.asdict(spec), handle)

    return _publish(os.path.join(root, spec.key()), fill)


def write_numeric(root: str, files: int, rows_per_file: int, seed: int = 11) -> list[str]:
    """Small numeric files for the straggler job: ``id`` and one float feature."""

    def fill(directory: str) -> None:
        rng = np.random.default_rng(seed)
        for index in range(files):
            ids = np.arange(index * rows_per_file, (index + 1) * rows_per_file, dtype=np.int64)
            table = pa.table({"id": ids, "x": rng.random(rows_per_file, dtype=np.float32)})
            pq.write_table(table, os.path.join(directory, f"part-{index:03d}.parquet"))

    return _publish(os.path.join(root, f"numeric-{files}f-{rows_per_file}r-s{seed}"), fill)
