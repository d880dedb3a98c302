"""A local filesystem that behaves like an object store on the clock: ``latency:///abs/path``.

Every system in the benchmark reads its input through this filesystem, so that none of them
wins by reading from a page cache that a real deployment never has. Each request sleeps
``first_byte_s + nbytes / bandwidth`` before it returns the local bytes: 20 ms to first byte
and 100 MB/s per request stream by default, the order of S3 from a nearby VM. Reads are
ranged GETs of at least ``block_size`` (5 MiB; s3fs 2026.9 defaults to 50 MiB, so this makes
more, smaller requests than s3fs would); listings and metadata look-ups cost a first byte;
writes land locally and pay the latency and bandwidth once, on close (a single PUT).

The figures come from the environment (``ANTBATCH_BENCH_LATENCY_S``,
``ANTBATCH_BENCH_BANDWIDTH_MBS``, ``ANTBATCH_BENCH_BLOCK_MB``), so subprocesses of every system
(the antbatch worker, Ray's workers) see the same ones. Importing this module registers the
``latency`` protocol with fsspec. Where ``ANTBATCH_BENCH_READ_LOG`` names a folder, every GET is
also appended there (path, first byte, length), one file per process, so that a harness can tell
which bytes of which input a whole process tree read (``bench.resume``).
"""

from __future__ import annotations

import io
import os
import threading
import time
import uuid
from collections import Counter
from typing import Any, ClassVar

import fsspec
from fsspec.implementations.local import LocalFileSystem
from fsspec.spec import AbstractBufferedFile

DEFAULT_LATENCY_S = 0.020
DEFAULT_BANDWIDTH_MBS = 100.0
DEFAULT_BLOCK_MB = 5.0
READ_LOG_ENV = "ANTBATCH_BENCH_READ_LOG"


def _env_float(name: str, default: float) -> float:
    value = os.environ.get(name)
    return float(value) if value else default


def latency_env() -> dict[str, str]:
    """The latency model's settings, this process's or the defaults, for the subprocesses it runs."""
    defaults = {"LATENCY_S": DEFAULT_LATENCY_S, "BANDWIDTH_MBS": DEFAULT_BANDWIDTH_MBS, "BLOCK_MB": DEFAULT_BLOCK_MB}
    return {f"ANTBATCH_BENCH_{k}": os.environ.get(f"ANTBATCH_BENCH_{k}", str(v)) for k, v in defaults.items()}


def log_get(path: str, start: int, nbytes: int) -> None:
    """Record one GET under ``$ANTBATCH_BENCH_READ_LOG`` (when set): a line per request, appended."""
    directory = os.environ.get(READ_LOG_ENV)
    if directory:
        with open(os.path.join(directory, f"{os.getpid()}.tsv"), "a") as handle:
            handle.write(f"{path}\t{start}\t{nbytes}\n")


class LatencyFileSystem(fsspec.AbstractFileSystem):
    """Local files behind simulated per-request latency and per-stream bandwidth."""

    protocol = "latency"
    root_marker = "/"
    # Request counts of this process, by kind (get, list, info, put), for the report.
    requests: ClassVar[Counter[str]] = Counter()
    bytes_read: ClassVar[Counter[str]] = Counter()
    _lock: ClassVar[threading.Lock] = threading.Lock()

    def __init__(
        self,
        first_byte_s: float | None = None,
        bandwidth_mbs: float | None = None,
        block_size: int | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        self.first_byte_s = (
            first_byte_s if first_byte_s is not None else _env_float("ANTBATCH_BENCH_LATENCY_S", DEFAULT_LATENCY_S)
        )
        self.bandwidth = 1e6 * (
            bandwidth_mbs
            if bandwidth_mbs is not None
            else _env_float("ANTBATCH_BENCH_BANDWIDTH_MBS", DEFAULT_BANDWIDTH_MBS)
        )
        self.blocksize = block_size or int(_env_float("ANTBATCH_BENCH_BLOCK_MB", DEFAULT_BLOCK_MB) * 2**20)
        self.local = LocalFileSystem()

    # -- the clock ---------------------------------------------------------------------------

    def request(self, kind: str, nbytes: int = 0) -> None:
        """Count one request and sleep for its first byte plus its transfer."""
        with self._lock:
            self.requests[kind] += 1
            self.bytes_read[kind] += nbytes
        time.sleep(self.first_byte_s + nbytes / self.bandwidth)

    @classmethod
    def counts(cls) -> dict[str, int]:
        with cls._lock:
            return {**{f"{k}_requests": v for k, v in cls.requests.items()}, "bytes_read": cls.bytes_read["get"]}

    # -- metadata ----------------------------------------------------------------------------

    @classmethod
    def _strip_protocol(cls, path: Any) -> str:
        text = str(path)
        if text.startswith("latency://"):
            text = text[len("latency://") :]
        return text.rstrip("/") or cls.root_marker

    def ls(self, path: str, detail: bool = True, **kwargs: Any) -> list[Any]:
        self.request("list")
        return self.local.ls(self._strip_protocol(path), detail=detail)  # type: ignore[no-any-return]

    def info(self, path: str, **kwargs: Any) -> dict[str, Any]:
        self.request("info")
        return self.local.info(self._strip_protocol(path))  # type: ignore[no-any-return]

    def mkdir(self, path: str, create_parents: bool = True, **kwargs: Any) -> None:
        self.local.mkdir(self._strip_protocol(path), create_parents=create_parents)

    def makedirs(self, path: str, exist_ok: bool = False) -> None:
        self.local.makedirs(self._strip_protocol(path), exist_ok=exist_ok)

    def rm_file(self, path: str) -> None:
        self.request("delete")
        self.local.rm_file(self._strip_protocol(path))

    def cat_file(self, path: str, start: int | None = None, end: int | None = None, **kwargs: Any) -> bytes:
        local = self._strip_protocol(path)
        data: bytes = self.local.cat_file(local, start=start, end=end)
        self.request("get", len(data))
        log_get(local, _offset(start, local), len(data))
        return data

    # -- files -------------------------------------------------------------------------------

    def _open(
        self,
        path: str,
        mode: str = "rb",
        block_size: int | None = None,
        autocommit: bool = True,
        cache_options: dict[str, Any] | None = None,
        **kwargs: Any,
    ) -> Any:
        path = self._strip_protocol(path)
        if "r" in mode:
            cache_type = kwargs.get("cache_type", "readahead")  # as s3fs: "none" fetches exactly what is read
            return LatencyFile(
                self,
                path,
                mode,
                block_size=block_size or self.blocksize,
                cache_type=cache_type,
                cache_options=cache_options,
            )
        if mode in ("wb", "xb"):
            return _LatencyWriter(self, path)
        raise ValueError(f"latency filesystem: unsupported mode {mode!r}")


def _offset(start: int | None, path: str) -> int:
    """A ``cat_file`` start as a byte offset (None: 0; negative: from the end)."""
    if start is None:
        return 0
    return start if start >= 0 else max(0, os.path.getsize(path) + start)


class LatencyFile(AbstractBufferedFile):  # type: ignore[misc]
    """A read-only file whose every uncached range costs one simulated GET."""

    def _fetch_range(self, start: int, end: int) -> bytes:
        with open(self.path, "rb") as handle:
            handle.seek(start)
            data = handle.read(max(0, end - start))
        self.fs.request("get", len(data))
        log_get(self.path, start, len(data))
        return data


class _LatencyWriter(io.BytesIO):
    """Buffers a whole object and writes it locally on close, after one simulated PUT."""

    def __init__(self, fs: LatencyFileSystem, path: str) -> None:
        super().__init__()
        self.fs = fs
        self.path = path

    def close(self) -> None:
        if self.closed:
            return
        data = self.getvalue()
        self.fs.request("put", len(data))
        os.makedirs(os.path.dirname(self.path), exist_ok=True)
        tmp = f"{self.path}.tmp-{uuid.uuid4().hex}"
        with open(tmp, "wb") as handle:
            handle.write(data)
        os.replace(tmp, self.path)
        super().close()


fsspec.register_implementation("latency", LatencyFileSystem, clobber=True)
