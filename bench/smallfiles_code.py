"""The user code of the small-file benchmark's two jobs: the same features and model over objects
read one by one (``fetch_features``) or from packs (``pack_features``).

The model is deliberately cheap (a byte histogram of each object into a linear layer), so the
jobs measure reading, as a job over millions of small images or documents does when its model
is not the bottleneck.

``fetch_features`` is the hook a user writes without a merge: the input is a Parquet list of
object URLs, and the hook reads each object through s3fs, one after the other. It passes
``max_concurrency=1`` to ``cat_file``: s3fs 2026.9 otherwise sends a HEAD before every GET (to
decide whether to split a large object into ranges), which would double the baseline's
requests. Each call appends ``start end objects`` (wall clock) to a file under
``ANTBATCH_BENCH_FETCH_LOG``, from which the harness takes the read phase.
"""

from __future__ import annotations

import os
import time
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

if TYPE_CHECKING:
    import pyarrow as pa

BINS = 16
CLASSES = 4
_fs: Any = None


def _features(datas: list[bytes]) -> torch.Tensor:
    """Each object's share of bytes in each of 16 value ranges."""
    rows = np.zeros((len(datas), BINS), dtype=np.float32)
    for i, data in enumerate(datas):
        values = np.frombuffer(data, dtype=np.uint8) >> 4
        rows[i] = np.bincount(values, minlength=BINS) / max(1, len(data))
    return torch.from_numpy(rows)


def _store() -> Any:
    """One s3fs client per process, to the endpoint the harness names (its latency proxy)."""
    global _fs
    if _fs is None:
        import fsspec

        _fs = fsspec.filesystem("s3", client_kwargs={"endpoint_url": os.environ["ANTBATCH_BENCH_S3_ENDPOINT"]})
    return _fs


def fetch_features(batch: pa.RecordBatch) -> torch.Tensor:
    """Unmerged: read every object named in ``path``, one by one, then take its features."""
    fs = _store()
    started = time.time()
    datas = [fs.cat_file(path, max_concurrency=1) for path in batch.column("path").to_pylist()]
    ended = time.time()
    log_dir = os.environ.get("ANTBATCH_BENCH_FETCH_LOG")
    if log_dir:
        with open(os.path.join(log_dir, f"fetch-{os.getpid()}.txt"), "a") as handle:
            handle.write(f"{started} {ended} {len(datas)}\n")
    return _features(datas)


def pack_features(batch: pa.RecordBatch) -> torch.Tensor:
    """Packed: the objects' bytes are in the records already."""
    return _features(batch.column("data").to_pylist())


def build_model() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(BINS, CLASSES), torch.nn.Softmax(dim=1))
