"""An in-memory object store on a virtual clock: S3-like latency, request counts by kind, by key
prefix and by virtual second.

The scale benchmark drives the real ledger against this store with up to 1,000 simulated
workers and 100,000 shards (half a million keys). fsspec's memory filesystem scans every key of
the process on each listing, so this store keeps its own key space (a tree of dicts) and
overrides every request :class:`airflow_antbatch.store.AtomicStore` offers with the same
contract: ``create`` is atomic create-if-absent, ``read`` gives None for a missing key,
``put`` overwrites, ``list``/``list_versions`` give the files below a folder (recursive by
default) relative to it, sorted, and ``counts`` tallies requests by kind, a listing as one
request per page of ``LIST_PAGE`` names.

**Latency** (virtual seconds): medians of 30 ms for a PUT (create, put, heartbeat, output
data), 15 ms for a GET, 25 ms per LIST page and 20 ms for a DELETE, each times a lognormal
factor (sigma 0.3, so 90% fall within 0.6x-1.6x the median). A request takes effect when it is
sent and returns after its latency, so others may see it first; a listing's pages are asked for
one after another, as a client follows continuation tokens. These are typical same-region S3
medians for small objects: AWS puts small-request medians "in the range of tens of
milliseconds" (Best Practices Design Patterns: Optimizing Amazon S3 Performance, "Timeouts and
Retries for Latency-Sensitive Applications").

**Rates.** S3 serves 3,500 PUT/COPY/POST/DELETE and 5,500 GET/HEAD requests per second per
partitioned prefix. Requests are tallied per virtual second and per prefix: the key up to and
including the hash folder that ``airflow_antbatch.layout`` puts after ``claims/``,
``releases/``, ``commits/`` and ``steals/``, other keys by their first folder (a top-level file
by its name). A listing counts its pages against the folder it lists, in the GET class.
"""

from __future__ import annotations

import dataclasses
import math
import random
import threading
import uuid
from collections import Counter
from typing import TYPE_CHECKING, Any

from airflow_antbatch import layout
from airflow_antbatch.store import LIST_PAGE, AtomicStore

if TYPE_CHECKING:
    from bench.simclock import SimClock

PUT_KINDS = frozenset({"create", "put", "heartbeat", "data", "delete"})  # S3's 3,500/s class
GET_KINDS = frozenset({"read", "list"})  # S3's 5,500/s class (LIST is a GET on the bucket)
S3_PUT_PER_S = 3500
S3_GET_PER_S = 5500


@dataclasses.dataclass(frozen=True)
class Latency:
    """Median seconds per request kind and the lognormal spread around them."""

    put_s: float = 0.030
    get_s: float = 0.015
    list_page_s: float = 0.025
    delete_s: float = 0.020
    sigma: float = 0.3

    def median(self, kind: str) -> float:
        if kind in ("create", "put", "heartbeat", "data"):
            return self.put_s
        if kind == "read":
            return self.get_s
        if kind == "list":
            return self.list_page_s
        return self.delete_s


def _is_hash(part: str) -> bool:
    """Whether a folder name is one of ``layout.key_prefix``'s hash folders."""
    return len(part) == layout.PREFIX_CHARS and all(c in "0123456789abcdef" for c in part)


def prefix_of(rel: str) -> str:
    """The S3 prefix a key counts against: ``claims/<hh>/``, ``workers/``, ``done.json``."""
    parts = rel.strip("/").split("/")
    if len(parts) >= 3 and _is_hash(parts[1]):
        return f"{parts[0]}/{parts[1]}/"
    return f"{parts[0]}/" if len(parts) >= 2 else parts[0]


def listing_prefix(rel: str) -> str:
    """The prefix a listing of folder ``rel`` counts against."""
    parts = [p for p in rel.strip("/").split("/") if p]
    if not parts:
        return "/"
    if len(parts) >= 2 and _is_hash(parts[1]):
        return f"{parts[0]}/{parts[1]}/"
    return f"{parts[0]}/"


class RateMeter:
    """Requests per virtual second per (class, prefix), folded into peaks as seconds pass.

    Virtual time never goes back (one simulated thread runs at a time), so only the current
    second is kept in full.
    """

    def __init__(self) -> None:
        self.second = -1
        self.current: Counter[tuple[str, str]] = Counter()
        self.peak: dict[tuple[str, str], tuple[int, int]] = {}  # (class, prefix) -> (count, second)
        self.total_peak: dict[str, tuple[int, int]] = {}  # class -> (count, second), all prefixes

    def add(self, now: float, cls: str, prefix: str, n: int = 1) -> None:
        second = int(now)
        if second != self.second:
            self.fold()
            self.second = second
        self.current[(cls, prefix)] += n

    def fold(self) -> None:
        totals: Counter[str] = Counter()
        for key, count in self.current.items():
            totals[key[0]] += count
            if count > self.peak.get(key, (0, 0))[0]:
                self.peak[key] = (count, self.second)
        for cls, count in totals.items():
            if count > self.total_peak.get(cls, (0, 0))[0]:
                self.total_peak[cls] = (count, self.second)
        self.current.clear()

    def peak_per_prefix(self, cls: str) -> tuple[int, str | None, int | None]:
        """The highest one-second count of ``cls`` in any one prefix: (count, prefix, second)."""
        self.fold()
        best = max(((c, p, s) for (k, p), (c, s) in self.peak.items() if k == cls), default=(0, None, None))
        return best[0], best[1], best[2]


@dataclasses.dataclass
class _File:
    data: bytes
    version: str  # what an ETag is to S3: changes with every write


class SimStore(AtomicStore):
    """``AtomicStore``'s requests over a dict tree, paying latency in virtual time.

    The base class is initialised over a fresh ``memory://`` root (so ``kind``, ``url`` and
    ``counts`` are what the ledger expects) but that filesystem is never touched. A lock guards
    the tree around the in-memory work only; latency is slept outside it (``SimClock``'s rule).
    Requests from a thread the clock did not spawn (a thread pool inside the ledger) are served
    without latency and counted in ``off_clock``, so the report can say so.
    """

    def __init__(self, clock: SimClock, *, latency: Latency | None = None, seed: int = 0, name: str = "state") -> None:
        super().__init__(f"memory://antbatch-sim-{name}-{uuid.uuid4().hex[:8]}")
        self.clock = clock
        self.latency = latency or Latency()
        self._rng = random.Random(seed)
        self._tree: dict[str, Any] = {}
        self._tree_lock = threading.Lock()
        self._writes = 0
        self.meter = RateMeter()
        self.by_folder: Counter[tuple[str, str]] = Counter()  # (kind, first folder) -> requests
        self.off_clock = 0
        self.keys = 0
        # Recursive listings kept up to date per folder once listed: the roster folders are
        # listed by every idle worker every poll, and walking 1,000 names each time would cost
        # the simulation more than anything it measures.
        self._flat: dict[str, dict[str, str]] = {}

    # -- AtomicStore's requests --------------------------------------------------------------

    def create(self, rel: str, data: bytes) -> bool:
        with self._tree_lock:
            parent, name = self._parent(rel, make=True)
            created = name not in parent
            if created:
                parent[name] = self._stored(rel, data)
        self._request("create", rel)
        return created

    def read(self, rel: str) -> bytes | None:
        with self._tree_lock:
            parent, name = self._parent(rel, make=False)
            found = parent.get(name) if parent is not None else None
        self._request("read", rel)
        return found.data if isinstance(found, _File) else None

    def put(self, rel: str, data: bytes, *, kind: str = "put") -> None:
        with self._tree_lock:
            parent, name = self._parent(rel, make=True)
            parent[name] = self._stored(rel, data)
        self._request(kind, rel)

    def list(self, rel: str, *, recursive: bool = True) -> list[str]:
        return sorted(self.list_versions(rel, recursive=recursive))

    def list_versions(self, rel: str, *, recursive: bool = True) -> dict[str, str]:
        with self._tree_lock:
            found = self._listing(rel) if recursive else self._walked(rel, recursive=False)
        pages = max(1, math.ceil(len(found) / LIST_PAGE))
        self._request("list", rel, pages=pages)
        return found

    def delete(self, rel: str) -> None:
        with self._tree_lock:
            parent, name = self._parent(rel, make=False)
            if parent is not None and isinstance(parent.get(name), _File):
                del parent[name]
                self.keys -= 1
                self._index(rel, None)
        self._request("delete", rel)

    def preload(self, rel: str, data: bytes) -> None:
        """Write ``rel`` outside the measurement (what the planner wrote before the workers)."""
        with self._tree_lock:
            parent, name = self._parent(rel, make=True)
            parent[name] = self._stored(rel, data)

    def names(self, rel: str) -> list[str]:
        """The files below ``rel`` (recursive), uncounted and free: for the harness's own checks."""
        with self._tree_lock:
            return sorted(self._walked(rel, recursive=True))

    # -- bookkeeping ---------------------------------------------------------------------------

    def _request(self, kind: str, rel: str, *, pages: int = 1) -> None:
        """Count one request and wait out its latency; a listing's pages one after another, as a
        client follows continuation tokens (so each page counts in the second it is asked for)."""
        cls = "put" if kind in PUT_KINDS else "get"
        prefix = listing_prefix(rel) if kind == "list" else prefix_of(rel)
        folder = rel.split("/", 1)[0]
        simulated = self.clock.is_simulated()
        if not simulated:
            self.off_clock += 1
        for _ in range(pages):
            with self._count_lock:
                self.counts[kind] += 1
                self.meter.add(self.clock.now(), cls, prefix)
                self.by_folder[(kind, folder)] += 1
            if simulated:
                self.clock.sleep(self._draw(kind))

    def _stored(self, rel: str, data: bytes) -> _File:
        """A new version of ``rel``, entered in the listings kept for its folders."""
        self._writes += 1
        stored = _File(bytes(data), str(self._writes))
        self._index(rel, stored.version)
        return stored

    def _index(self, rel: str, version: str | None) -> None:
        parts = rel.strip("/").split("/")
        if any(part.startswith(".") for part in parts):
            return
        for depth in range(len(parts)):
            flat = self._flat.get("/".join(parts[:depth]))
            if flat is None:
                continue
            name = "/".join(parts[depth:])
            if version is None:
                flat.pop(name, None)
            else:
                flat[name] = version

    def _listing(self, rel: str) -> dict[str, str]:
        folder = rel.strip("/")
        flat = self._flat.get(folder)
        if flat is None:
            flat = self._flat[folder] = self._walked(folder, recursive=True)
        return dict(flat)

    def _walked(self, rel: str, *, recursive: bool) -> dict[str, str]:
        node = self._folder(rel)
        found: dict[str, str] = {}
        if node is not None:
            _walk(node, "", recursive, found)
        return found

    def _draw(self, kind: str) -> float:
        return self.latency.median(kind) * math.exp(self.latency.sigma * self._rng.gauss(0.0, 1.0))

    def _parent(self, rel: str, *, make: bool) -> tuple[Any, str]:
        *folders, name = rel.strip("/").split("/")
        node = self._tree
        for folder in folders:
            child = node.get(folder)
            if child is None:
                if not make:
                    return None, name
                child = node[folder] = {}
            elif not isinstance(child, dict):
                raise NotADirectoryError(f"{rel}: {folder} is a file")
            node = child
        if make and name not in node:
            self.keys += 1
        return node, name

    def _folder(self, rel: str) -> dict[str, Any] | None:
        node: Any = self._tree
        for folder in (p for p in rel.strip("/").split("/") if p):
            node = node.get(folder) if isinstance(node, dict) else None
            if node is None:
                return None
        return node if isinstance(node, dict) else None


def _walk(node: dict[str, Any], prefix: str, recursive: bool, out: dict[str, str]) -> None:
    for name, child in node.items():
        if name.startswith("."):
            continue
        if isinstance(child, _File):
            out[prefix + name] = child.version
        elif recursive:
            _walk(child, f"{prefix}{name}/", recursive, out)
