"""An fsspec root plus the one primitive the ledger relies on: atomic create-if-absent.

fsspec's generic ``mode="x"`` is check-then-write, so it is not used. Each supported backend
uses its own truly atomic path (see docs/adr/0001-atomic-create.md):

- local files: write a temp file, then ``os.link`` it to the final name (fails if the name
  exists, and readers never see a half-written file);
- S3 (s3fs): ``PutObject`` with ``If-None-Match: *``;
- GCS (gcsfs): an upload with ``ifGenerationMatch=0``;
- Azure Blob (adlfs): ``Put Blob`` with ``If-None-Match: *``;
- memory: a process-wide lock (the memory filesystem is process-local anyway).

The cloud stores' code lives in ``store_backends``. Any other protocol is refused with
``UnsupportedStoreError``, as is a cloud URL whose client (an extra) is not installed.
"""

from __future__ import annotations

import contextlib
import os
import threading
import uuid
from collections import Counter
from typing import Any

import fsspec
from fsspec.implementations.local import LocalFileSystem
from fsspec.implementations.memory import MemoryFileSystem

from airflow_antbatch.errors import StoreError, UnsupportedStoreError
from airflow_antbatch.store_backends import (
    S3_PROTOCOLS,
    cloud_create,
    cloud_kind,
    cloud_read,
    is_client_error,
    missing_client_message,
    quiet_client_logs,
    version_of,
)

_MEMORY_LOCK = threading.Lock()
_SUPPORTED = "supported: local files, s3://, gs://, az:// (abfs://), memory://"
LIST_PAGE = 1000  # names per listing page (S3 ListObjectsV2, GCS, Azure)


class AtomicStore:
    """Files under one root, addressed by relative paths, with request counting.

    ``counts`` tallies every request by kind (create, read, put, list, delete), so that tests
    and benchmarks can check what the ledger costs per shard.
    """

    def __init__(self, url: str, storage_options: dict[str, Any] | None = None) -> None:
        try:
            fs, root = fsspec.core.url_to_fs(url, **(storage_options or {}))
        except ImportError as exc:
            # A known cloud store whose extra is not installed, or any other fsspec protocol
            # whose client is missing: one line, not a traceback from inside fsspec.
            message = missing_client_message(url) or f"{url!r}: {exc} ({_SUPPORTED})"
            raise UnsupportedStoreError(message) from None
        except ValueError as exc:
            if not str(exc).startswith("Protocol not known"):
                raise
            raise UnsupportedStoreError(f"{url!r}: {exc} ({_SUPPORTED})") from None
        self.fs: fsspec.AbstractFileSystem = fs
        self.url = url.rstrip("/")
        self.root = root.rstrip("/")
        self.kind = _backend_kind(fs, url)
        quiet_client_logs(self.kind)
        self.counts: Counter[str] = Counter()
        self._count_lock = threading.Lock()

    def path(self, rel: str) -> str:
        return f"{self.root}/{rel}" if rel else self.root

    def uri(self, rel: str) -> str:
        """The full URL of ``rel``, as users and other processes can open it."""
        return f"{self.url}/{rel}" if rel else self.url

    def _count(self, kind: str, n: int = 1) -> None:
        with self._count_lock:
            self.counts[kind] += n

    def create(self, rel: str, data: bytes) -> bool:
        """Write ``data`` at ``rel`` unless something is there; True if this call created it."""
        self._count("create")
        path = self.path(rel)
        try:
            if self.kind == "local":
                return _local_create(path, data)
            if self.kind == "memory":
                return _memory_create(self.fs, path, data)
            return cloud_create(self.kind, self.fs, path, data)
        except (StoreError, FileNotFoundError):
            raise
        except Exception as exc:
            if not is_transport_error(exc):
                raise
            raise StoreError(f"create of {self.uri(rel)} failed: {exc}") from exc

    def read(self, rel: str) -> bytes | None:
        """The bytes at ``rel``, or None if nothing is there (one GET, never a listing)."""
        self._count("read")
        try:
            if self.kind in ("local", "memory"):
                return bytes(self.fs.cat_file(self.path(rel)))
            return cloud_read(self.kind, self.fs, self.path(rel))
        except FileNotFoundError:
            return None
        except Exception as exc:
            if not is_transport_error(exc):
                raise
            raise StoreError(f"read of {self.uri(rel)} failed: {exc}") from exc

    def put(self, rel: str, data: bytes, *, kind: str = "put") -> None:
        """Overwrite ``rel`` atomically: readers see the old bytes or the new, never a part."""
        self._count(kind)
        path = self.path(rel)
        try:
            if self.kind == "local":
                _local_replace(path, data)
            else:
                self.fs.pipe_file(path, data)
        except Exception as exc:
            if not is_transport_error(exc):
                raise
            raise StoreError(f"write of {self.uri(rel)} failed: {exc}") from exc

    def list(self, rel: str, *, recursive: bool = True) -> list[str]:
        """Files below ``rel``, relative to it, hidden temp files left out (one paginated listing)."""
        return sorted(self.list_versions(rel, recursive=recursive))

    def list_versions(self, rel: str, *, recursive: bool = True) -> dict[str, str]:
        """Files below ``rel`` with what changes when each is rewritten (ETag, or mtime and size).

        Counted as one request per page of ``LIST_PAGE`` names, as S3 and GCS bill them. Lets an
        observer see which heartbeats moved without reading any of them.
        """
        base = self.path(rel)
        self.fs.invalidate_cache(base)
        try:
            found = self.fs.find(base, detail=True) if recursive else self.fs.ls(base, detail=True)
        except FileNotFoundError:
            found = {}
        except Exception as exc:
            if not is_transport_error(exc):
                raise
            raise StoreError(f"listing of {self.uri(rel)} failed: {exc}") from exc
        infos = found if isinstance(found, dict) else {info["name"]: info for info in found}
        self._count("list", max(1, -(-len(infos) // LIST_PAGE)))
        prefix = base.rstrip("/") + "/"
        return {
            name[len(prefix) :]: version_of(info)
            for name, info in infos.items()
            if name.startswith(prefix)
            and info.get("type", "file") == "file"
            and not any(part.startswith(".") for part in name[len(prefix) :].split("/"))
        }

    def delete(self, rel: str) -> None:
        self._count("delete")
        with contextlib.suppress(FileNotFoundError):
            self.fs.rm_file(self.path(rel))


def is_transport_error(exc: BaseException) -> bool:
    """The store could not be reached or answered with an error: OSError, or one of a cloud
    client's own exceptions (botocore's, aiohttp's, gcsfs's, Azure's are not OSErrors). Only
    modules already loaded are consulted: an error cannot come from a client never imported."""
    return isinstance(exc, OSError) or is_client_error(exc)


def with_connection_pool(url: str, options: dict[str, Any], concurrency: int) -> dict[str, Any]:
    """s3fs opens at most 10 connections unless told otherwise, which caps any concurrency at 10."""
    if url.split("://", 1)[0] not in S3_PROTOCOLS:
        return options
    config = dict(options.get("config_kwargs") or {})
    config.setdefault("max_pool_connections", concurrency)
    return {**options, "config_kwargs": config}


def _backend_kind(fs: fsspec.AbstractFileSystem, url: str) -> str:
    if isinstance(fs, LocalFileSystem):
        return "local"
    if isinstance(fs, MemoryFileSystem):
        return "memory"
    protocols = {fs.protocol} if isinstance(fs.protocol, str) else set(fs.protocol)
    kind = cloud_kind(protocols)
    if kind is not None:
        return kind
    raise UnsupportedStoreError(
        f"{url!r}: the {sorted(protocols)} filesystem has no atomic create-if-absent that "
        f"airflow-antbatch can rely on ({_SUPPORTED}); exactly-once output cannot be promised there"
    )


def _local_create(path: str, data: bytes) -> bool:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    tmp = _write_temp(path, data)
    try:
        os.link(tmp, path)
        return True
    except FileExistsError:
        return False
    finally:
        os.unlink(tmp)


def _local_replace(path: str, data: bytes) -> None:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    tmp = _write_temp(path, data)
    try:
        os.replace(tmp, path)
    except BaseException:
        os.unlink(tmp)
        raise


def _write_temp(path: str, data: bytes) -> str:
    """A fully written, fsynced sibling of ``path`` whose name marks it as temporary."""
    directory, name = os.path.split(path)
    tmp = os.path.join(directory, f".{name}.tmp-{uuid.uuid4().hex}")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
    try:
        os.write(fd, data)
        os.fsync(fd)
    finally:
        os.close(fd)
    return tmp


def _memory_create(fs: fsspec.AbstractFileSystem, path: str, data: bytes) -> bool:
    with _MEMORY_LOCK:
        if fs.exists(path):
            return False
        fs.pipe_file(path, data)
        return True
