"""The plan at a million shards: ``python -m bench.plan_scale [--quick]`` (issue 13, point 2).

Three figures, each against its bar:

- **Bytes per shard on the store** (bar: 32). A JSONL plan of 1,000,000 objects, one per shard,
  with S3-like paths, sizes spread over half to all of ``target_shard_bytes`` and quoted 32-hex
  ETags; and a Parquet-style plan (100 files of 10,000 row groups, 100 row groups per shard).
- **plan_job** over the 1,000,000 objects of a simulated listing, in a fresh process: wall time
  (bar: 2 min) and peak RSS (bar: 2 GB), listing pages included.
- **Worker start**, in a fresh process: reading the plan's bytes and building the JobPlan (bar:
  well under 2 s) and the RSS after (bar: 300 MB), besides the RSS of the imports alone.

The simulated listing (``SimListing``, protocol ``simlist``) answers ``find``/``glob``/``isdir``/
``info`` the way s3fs does, an 8-key info dict per object, and sleeps ``PAGE_S`` = 25 ms per
page of 1,000 entries: the median LIST page of the scale benchmark's simulated store
(``bench/simstore.py``), a same-region S3 ListObjectsV2 call. A million objects are 1,000 pages,
25 s of the planner's wall time. Opening an object gives one JSON line, which is all the planner
reads (``input_columns``). ``--quick`` does a tenth of the objects, into
``bench/results/plan-scale-quick.json``; the full run writes ``bench/results/plan-scale.json``.
"""

from __future__ import annotations

import argparse
import datetime as dt
import hashlib
import io
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from typing import Any, ClassVar

from fsspec import register_implementation
from fsspec.spec import AbstractFileSystem

PAGE = 1000  # entries per listing page, as S3 ListObjectsV2 returns them
PAGE_S = 0.025  # seconds per page (bench/simstore.py's median LIST page)
PREFIX = "bucket/lake/ds=2026-12-01"
TARGET_BYTES = 128 * 2**20  # JobSpec.target_shard_bytes' default
FIRST_LINE = b'{"id": 0, "text": "a first record"}\n'
MTIME = dt.datetime(2026, 12, 1, tzinfo=dt.UTC)
BARS = {"bytes_per_shard": 32, "plan_s": 120, "plan_peak_rss_mb": 2048, "start_s": 2, "start_rss_mb": 300}


class SimListing(AbstractFileSystem):
    """``objects`` JSONL objects under ``PREFIX``, listed a page at a time on the clock.

    Object ``i`` is ``part-{i:07d}.jsonl``; its size and ETag are hashes of ``i``, so every
    listing of the same count is the same. The count is a class setting because the planner
    passes ``storage_options`` to the state store too, which must not see it.
    """

    protocol = "simlist"
    cachable = False
    objects: ClassVar[int] = 0
    pages: ClassVar[int] = 0

    def find(
        self, path: str, maxdepth: int | None = None, withdirs: bool = False, detail: bool = False, **kw: Any
    ) -> dict[str, dict[str, Any]] | list[str]:
        path = self._strip_protocol(path).rstrip("/")
        found: dict[str, dict[str, Any]] = {}
        if PREFIX.startswith(path) and (path == PREFIX or PREFIX[len(path)] == "/"):
            for start in range(0, self.objects, PAGE):
                time.sleep(PAGE_S)
                type(self).pages += 1
                found.update(_entry(i) for i in range(start, min(self.objects, start + PAGE)))
        return found if detail else sorted(found)

    def info(self, path: str, **kw: Any) -> dict[str, Any]:
        path = self._strip_protocol(path).rstrip("/")
        if PREFIX.startswith(path):
            return {"name": path, "size": 0, "type": "directory"}
        name = path.rsplit("/", 1)[-1]
        if path.rsplit("/", 1)[0] == PREFIX and name.startswith("part-") and name.endswith(".jsonl"):
            index = int(name[5:-6])
            if index < self.objects:
                return _entry(index)[1]
        raise FileNotFoundError(path)

    def _open(self, path: str, mode: str = "rb", **kw: Any) -> io.BytesIO:
        self.info(path)
        return io.BytesIO(FIRST_LINE)


def _entry(index: int) -> tuple[str, dict[str, Any]]:
    """One listed object, with the keys s3fs gives (its memory cost is part of the figure)."""
    key = f"{PREFIX}/part-{index:07d}.jsonl"
    digest = hashlib.blake2b(index.to_bytes(8, "little"), digest_size=16).digest()
    size = TARGET_BYTES // 2 + 1 + int.from_bytes(digest[:4], "little") % (TARGET_BYTES // 2)
    etag = f'"{digest.hex()}"'
    info = {
        "Key": key,
        "LastModified": MTIME,
        "ETag": etag,
        "Size": size,
        "StorageClass": "STANDARD",
        "type": "file",
        "size": size,
        "name": key,
    }
    return key, info


def register(objects: int) -> str:
    """Register ``simlist://`` with ``objects`` objects; return the input URI."""
    SimListing.objects = objects
    SimListing.pages = 0
    register_implementation(SimListing.protocol, SimListing, clobber=True)
    return f"{SimListing.protocol}://{PREFIX}"


def rss_mb() -> dict[str, float]:
    """This process's resident set now and at its peak (Linux /proc)."""
    fields = {}
    with open("/proc/self/status") as status:
        for line in status:
            name, _, value = line.partition(":")
            if name in ("VmRSS", "VmHWM"):
                fields[name] = int(value.split()[0]) / 1024
    return {"rss_mb": round(fields["VmRSS"], 1), "peak_rss_mb": round(fields["VmHWM"], 1)}


# -- children: each figure in a fresh process -----------------------------------------------


def child_plan(objects: int, out: str) -> dict[str, Any]:
    """plan_job over the simulated listing; the plan lands under ``out``."""
    from airflow_antbatch.planning import plan_job
    from airflow_antbatch.spec import JobSpec

    spec = JobSpec(input_uri=register(objects), output_uri=out, model="bench:model")
    started = time.perf_counter()
    result = plan_job(spec)
    seconds = time.perf_counter() - started
    plan_bytes = os.path.getsize(result.plan_uri)
    return {
        "objects": objects,
        "shards": len(result.plan),
        "plan_uri": result.plan_uri,
        "plan_bytes": plan_bytes,
        "bytes_per_shard": round(plan_bytes / len(result.plan), 2),
        "plan_s": round(seconds, 2),
        "listing_pages": SimListing.pages,
        "listing_sleep_s": round(SimListing.pages * PAGE_S, 2),
        "plan_peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
    }


def child_start(plan_path: str) -> dict[str, Any]:
    """What a worker does before it claims: read the plan's bytes and build the JobPlan."""
    from airflow_antbatch.shards import JobPlan

    imported = rss_mb()
    started = time.perf_counter()
    with open(plan_path, "rb") as handle:
        data = handle.read()
    plan = JobPlan.from_bytes(data, source=plan_path)
    del data
    loaded = time.perf_counter()
    last = plan.shard(len(plan) - 1)
    found = plan.index_of(last.shard_id)
    touched = time.perf_counter()
    return {
        "shards": len(plan),
        "start_s": round(loaded - started, 3),
        "first_lookup_s": round(touched - loaded, 6),
        "found": found,
        "import_rss_mb": imported["rss_mb"],
        "start_rss_mb": rss_mb()["rss_mb"],
        "start_peak_rss_mb": rss_mb()["peak_rss_mb"],
    }


def _run_child(*args: str) -> dict[str, Any]:
    out = subprocess.run(
        [sys.executable, "-m", "bench.plan_scale", "--child", *args], capture_output=True, text=True, check=False
    )
    if out.returncode:
        raise RuntimeError(f"child {args} failed:\n{out.stderr}")
    result: dict[str, Any] = json.loads(out.stdout.splitlines()[-1])
    return result


# -- the Parquet-style plan --------------------------------------------------------------------


def parquet_style(files: int, groups_per_file: int, groups_per_shard: int) -> dict[str, Any]:
    """Bytes per shard of a plan of few big Parquet files, cut by row groups (no footers read:
    the row groups are made up, 1,000 rows and ~1 MB each)."""
    import random

    from airflow_antbatch.planning import InputFile, cut_shards
    from airflow_antbatch.shards import JobPlan
    from airflow_antbatch.spec import JobSpec

    rng = random.Random(0)
    rows = 1000
    inputs = []
    for f in range(files):
        groups = tuple((rows, rng.randrange(900_000, 1_100_000)) for _ in range(groups_per_file))
        size = sum(b for _, b in groups) // 3
        inputs.append(InputFile(f"s3://{PREFIX}/part-{f:05d}.parquet", size, f'"{rng.randbytes(16).hex()}"', groups))
    spec = JobSpec(input_uri=f"s3://{PREFIX}", output_uri="s3://bucket/out", model="bench:model")
    started = time.perf_counter()
    shards = cut_shards(inputs, groups_per_shard * rows, spec.target_shard_bytes)
    plan = JobPlan(spec, 0, "0" * 64, "parquet", shards, "2026-12-01T00:00:00+00:00", ("id", "text"), inputs[0].path)
    data = plan.to_bytes()
    return {
        "files": files,
        "row_groups": files * groups_per_file,
        "shards": len(plan),
        "pieces_per_shard": round(len(plan.shards.batch) / len(plan), 2),
        "plan_bytes": len(data),
        "bytes_per_shard": round(len(data) / len(plan), 2),
        "cut_and_write_s": round(time.perf_counter() - started, 2),
    }


# -- the whole run ---------------------------------------------------------------------------------


def run(objects: int, parquet_files: int) -> dict[str, Any]:
    with tempfile.TemporaryDirectory(prefix="plan-scale-") as tmp:
        planned = _run_child("plan", str(objects), os.path.join(tmp, "out"))
        start = _run_child("start", planned.pop("plan_uri"))
    parquet = parquet_style(parquet_files, 10_000, 100)
    bars = {
        "jsonl_bytes_per_shard": planned["bytes_per_shard"] <= BARS["bytes_per_shard"],
        "parquet_bytes_per_shard": parquet["bytes_per_shard"] <= BARS["bytes_per_shard"],
        "plan_s": planned["plan_s"] <= BARS["plan_s"],
        "plan_peak_rss_mb": planned["plan_peak_rss_mb"] <= BARS["plan_peak_rss_mb"],
        "start_s": start["start_s"] <= BARS["start_s"],
        "start_rss_mb": start["start_rss_mb"] <= BARS["start_rss_mb"],
    }
    return {"plan_job": planned, "worker_start": start, "parquet_style": parquet, "bars": BARS, "met": bars}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="100,000 objects instead of 1,000,000")
    parser.add_argument("--child", nargs="+", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        kind, *rest = args.child
        result = child_plan(int(rest[0]), rest[1]) if kind == "plan" else child_start(rest[0])
        print(json.dumps(result))
        return 0
    from bench.run import RESULTS, git_state, machine

    objects, parquet_files = (100_000, 10) if args.quick else (1_000_000, 100)
    record = {
        "benchmark": "plan-scale",
        "when": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "git": git_state(),
        "machine": machine(),
        "listing": {"page_entries": PAGE, "page_s": PAGE_S},
        **run(objects, parquet_files),
    }
    print(json.dumps(record, indent=1))
    name = "plan-scale-quick.json" if args.quick else "plan-scale.json"
    with open(os.path.join(RESULTS, name), "w") as handle:
        json.dump(record, handle, indent=1)
        handle.write("\n")
    return 0 if all(record["met"].values()) else 1


if __name__ == "__main__":
    sys.exit(main())
