"""Near cache: a shard's small input files fetched many at a time, ahead of the reader.

A shard cut from many small files (the planner packs them into one shard without copying)
would otherwise pay the store's first-byte latency once per file, one after the other. When
the reader starts a shard (the worker reads the next claimed shard while the current one is
scored), the cache starts fetching every file of the shard that is small enough, up to
``concurrency`` at once and ``max_bytes`` in all, and the reader takes each file from it when
its turn comes. Larger files, and pieces that are some row groups of a file, stream
(``reader.open_piece``, with no read-ahead into the file's other row groups).

Entries are keyed by the file's path, size and version (ETag or mtime) as the plan recorded
them, so a file rewritten since planning is never served from an entry of the old one, and
the bytes served are those a direct read would have returned when the fetch ran. In memory
an entry is dropped once read; on disk (``directory``) entries stay for a retried shard or the
next job on this node, evicted oldest first beyond ``max_bytes``. The directory is scanned
when this process's running estimate of it passes the budget, not on every write, and each
eviction frees a tenth of the budget more than it must, so scans stay rare.
"""

from __future__ import annotations

import asyncio
import collections
import concurrent.futures
import contextlib
import dataclasses
import hashlib
import io
import logging
import os
import threading
from typing import TYPE_CHECKING, Any, BinaryIO

import fsspec
import fsspec.asyn

from airflow_antbatch.store import with_connection_pool
from airflow_antbatch.worker.reader import open_piece

if TYPE_CHECKING:
    from collections.abc import Iterator

    from airflow_antbatch.shards import Piece, Shard

log = logging.getLogger(__name__)

EVICT_TO = 0.9  # an eviction leaves the disk cache at this share of its budget


@dataclasses.dataclass(frozen=True)
class CacheOptions:
    max_bytes: int = 256 * 2**20  # 0 turns the cache off
    directory: str | None = None  # None: in memory
    concurrency: int = 32
    max_file_bytes: int = 16 * 2**20  # larger files stream instead


@dataclasses.dataclass
class CacheStats:
    hits: int = 0  # files read from the cache
    misses: int = 0  # files read directly
    bytes_prefetched: int = 0
    fetch_errors: int = 0  # a failed fetch falls back to a direct read, which reports the error

    def to_dict(self) -> dict[str, int]:
        return dataclasses.asdict(self)


def cache_key(piece: Piece) -> str:
    return hashlib.sha256(f"{piece.path}\0{piece.file_size}\0{piece.version}".encode()).hexdigest()


class NearCache:
    """Fetches shards' small files concurrently; ``open`` serves them, or opens the file."""

    def __init__(self, storage_options: dict[str, Any] | None = None, options: CacheOptions | None = None) -> None:
        self.options = options or CacheOptions()
        self.storage_options = dict(storage_options or {})
        self.stats = CacheStats()
        self._lock = threading.Lock()
        self._waiting: collections.OrderedDict[str, Piece] = collections.OrderedDict()  # budget permitting
        self._pending: dict[str, concurrent.futures.Future[bytes]] = {}  # fetching, or fetched and unread
        self._reserved = 0  # bytes of the pending fetches
        self._threads: concurrent.futures.ThreadPoolExecutor | None = None
        self._limit: asyncio.Semaphore | None = None
        # The disk cache's size as this process last scanned it, plus what it wrote since
        # (other processes sharing the directory show up at the next scan).
        self._disk_bytes = 0
        if self.options.directory:
            os.makedirs(self.options.directory, exist_ok=True)
            self._disk_bytes = sum(size for _, size, _ in self._disk_entries())

    def cacheable(self, piece: Piece) -> bool:
        return (
            self.options.max_bytes > 0
            and piece.file_size is not None
            and piece.version is not None
            and piece.file_size <= min(self.options.max_file_bytes, self.options.max_bytes)
        )

    def prefetch(self, shard: Shard) -> None:
        """Queue the shard's small files and start fetching them, in order, within the budget."""
        with self._lock:
            for piece in shard.pieces:
                key = cache_key(piece)
                if self.cacheable(piece) and key not in self._pending and not self._on_disk(key):
                    self._waiting[key] = piece
            self._fill()

    def forget(self, shard: Shard) -> None:
        """The reader is done with the shard (read, failed or stopped): drop what it did not take."""
        with self._lock:
            for piece in shard.pieces:
                key = cache_key(piece)
                self._waiting.pop(key, None)
                future = self._pending.pop(key, None)
                if future is not None:
                    future.cancel()
                    self._reserved -= piece.file_size or 0
            self._fill()

    @contextlib.contextmanager
    def open(self, piece: Piece) -> Iterator[BinaryIO]:
        """The piece's file: from the cache when fetched (waiting for a fetch in flight), else directly."""
        data = self._take(piece) if self.cacheable(piece) else None
        if data is not None:
            yield io.BytesIO(data)
            return
        with self._lock:
            self.stats.misses += 1
        with open_piece(piece, self.storage_options) as handle:
            yield handle

    def close(self) -> None:
        with self._lock:
            for future in self._pending.values():
                future.cancel()
            self._pending.clear()
            self._waiting.clear()
        if self._threads is not None:
            self._threads.shutdown(wait=False, cancel_futures=True)

    # -- internals -------------------------------------------------------------------------------

    def _fill(self) -> None:
        """Start waiting fetches while the budget allows (under the lock)."""
        while self._waiting:
            key, piece = next(iter(self._waiting.items()))
            size = piece.file_size or 0
            if self._pending and self._reserved + size > self.options.max_bytes:
                return
            del self._waiting[key]
            self._reserved += size
            self._pending[key] = self._submit(piece.path)

    def _take(self, piece: Piece) -> bytes | None:
        key = cache_key(piece)
        with self._lock:
            self._waiting.pop(key, None)  # its turn came before its fetch could start
            future = self._pending.pop(key, None)
        if future is None:
            data = self._read_disk(key)
            if data is not None:
                with self._lock:
                    self.stats.hits += 1
            return data
        try:
            data = future.result()
        except Exception as exc:
            log.warning("near cache: fetching %s failed (%s); reading it directly", piece.path, exc)
            with self._lock:
                self.stats.fetch_errors += 1
            return None
        finally:
            with self._lock:
                self._reserved -= piece.file_size or 0
                self._fill()
        with self._lock:
            self.stats.hits += 1
            self.stats.bytes_prefetched += len(data)
        if self.options.directory:
            self._write_disk(key, data)
        return data

    def _submit(self, path: str) -> concurrent.futures.Future[bytes]:
        options = with_connection_pool(path, self.storage_options, self.options.concurrency)
        fs, stripped = fsspec.core.url_to_fs(path, **options)
        if getattr(fs, "async_impl", False):
            if self._limit is None:
                self._limit = asyncio.Semaphore(self.options.concurrency)
            return asyncio.run_coroutine_threadsafe(_fetch(fs, stripped, self._limit), fs.loop)
        if self._threads is None:
            self._threads = concurrent.futures.ThreadPoolExecutor(self.options.concurrency, "antbatch-cache")
        return self._threads.submit(lambda: bytes(fs.cat_file(stripped)))

    def _disk_path(self, key: str) -> str:
        assert self.options.directory is not None
        return os.path.join(self.options.directory, key)

    def _on_disk(self, key: str) -> bool:
        return bool(self.options.directory) and os.path.exists(self._disk_path(key))

    def _read_disk(self, key: str) -> bytes | None:
        if not self.options.directory:
            return None
        try:
            with open(self._disk_path(key), "rb") as handle:
                data = handle.read()
        except FileNotFoundError:
            return None
        with contextlib.suppress(FileNotFoundError):
            os.utime(self._disk_path(key))  # recently used: evicted last
        return data

    def _write_disk(self, key: str, data: bytes) -> None:
        path = self._disk_path(key)
        temp = f"{path}.{os.getpid()}.{threading.get_ident()}.tmp"
        with open(temp, "wb") as handle:
            handle.write(data)
        os.replace(temp, path)  # readers see a whole entry or none
        with self._lock:
            self._disk_bytes += len(data)
            over = self._disk_bytes > self.options.max_bytes
        if over:
            self._evict()

    def _disk_entries(self) -> list[tuple[float, int, str]]:
        """(last used, size, path) of every whole entry in the directory."""
        assert self.options.directory is not None
        entries = []
        with os.scandir(self.options.directory) as found:
            for entry in found:
                if entry.is_file() and not entry.name.endswith(".tmp"):
                    with contextlib.suppress(FileNotFoundError):  # another process evicted it
                        stat = entry.stat()
                        entries.append((stat.st_mtime, stat.st_size, entry.path))
        return entries

    def _evict(self) -> None:
        """Oldest-used entries go first, until the directory holds ``EVICT_TO`` of ``max_bytes``."""
        entries = self._disk_entries()
        total = sum(size for _, size, _ in entries)
        for _, size, path in sorted(entries):
            if total <= EVICT_TO * self.options.max_bytes:
                break
            with contextlib.suppress(FileNotFoundError):
                os.remove(path)
            total -= size
        with self._lock:
            self._disk_bytes = total


async def _fetch(fs: fsspec.asyn.AsyncFileSystem, path: str, limit: asyncio.Semaphore) -> bytes:
    async with limit:
        return bytes(await fs._cat_file(path))
