"""The small-file benchmark: ``python -m bench.smallfiles [--quick]``.

Objects of 4-64 KiB (20,000; quick 2,000, so that it stays under 4 minutes: the unmerged job
alone reads about 35 objects/s here) in a real S3 server (SeaweedFS on 127.0.0.1, started as
the tests start it) behind a proxy that adds an object store's latency (``bench/s3latency.py``:
20 ms to first byte per request, 100 MB/s per connection, the worker benchmark's model). Then,
each step in a fresh process (``bench/smallfiles_run.py``) with its CPU sampled:

1. *unmerged*: an antbatch job whose input is a Parquet list of the objects' URLs and whose
   preprocess hook reads each object through s3fs, one after the other, as a plain hook does;
2. *merge*: ``merge_small_files`` of every object at its default concurrency, then *packed*:
   the same job (same features, same model) over the packs;
3. *sweep*: ``merge_small_files`` at each concurrency of the profile, on as many objects as
   keep the step short, beside the latency-bound limit ``concurrency / (first byte +
   mean object / bandwidth)`` objects/s; then a few of the same steps with ``reader="s3fs"``,
   to show what reading through obstore (the default on S3) is worth.

Writes ``bench/results/smallfiles{-quick,}.json`` and, from it, the small-files section of
docs/benchmarks.md and docs/benchmarks-smallfiles.png (``bench.smallfiles_report``).
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import io
import json
import math
import os
import shutil
import subprocess
import sys
import time
from typing import TYPE_CHECKING, Any

import numpy as np
import psutil
import pyarrow as pa
import pyarrow.parquet as pq

from bench.monitor import Sample, TreeMonitor
from bench.run import CPUS, REPO, RESULTS, git_state, machine, render, wait_for_quiet
from bench.s3latency import LatencyProxy

if TYPE_CHECKING:
    from collections.abc import Callable

    from tests.s3_servers import S3Server

OBJECTS_ROOT = "objs"
GROUP = 100  # objects per innermost prefix: a sweep step lists its objects by whole prefixes
MIN_OBJECT, MAX_OBJECT = 4 * 1024, 64 * 1024
# 64 MB volumes: the objects, the packs of the merge and of every sweep step, with room to spare.
SEAWEEDFS_VOLUMES = 96


@dataclasses.dataclass(frozen=True)
class Profile:
    name: str
    objects: int
    concurrencies: tuple[int, ...] = (1, 8, 32, 64, 128, 256)
    # The same steps read by s3fs instead of obstore: what the reader is worth, side by side.
    s3fs_concurrencies: tuple[int, ...] = (8, 64)
    # A sweep step merges about `rounds` latency rounds of objects (concurrency x rounds), at
    # least one prefix and at most `sweep_max_objects`, so that concurrency 1 takes seconds.
    sweep_rounds: int = 25
    sweep_max_objects: int = 20_000
    batch_size: int = 256
    max_shard_rows: int = 1024
    seed: int = 5

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


PROFILES = {
    "quick": Profile("quick", objects=2_000),
    "full": Profile("full", objects=20_000),
}


class MachineMonitor(TreeMonitor):
    """The whole machine's CPU seconds (every process, other work included), on the same clock."""

    def __init__(self, interval_s: float = 0.5) -> None:
        super().__init__(os.getpid(), interval_s)

    def _sample(self) -> None:
        times = psutil.cpu_times()
        busy = times.user + times.system + getattr(times, "irq", 0.0) + getattr(times, "softirq", 0.0)
        self.samples.append(Sample(time.time(), busy, 0, 0))


# -- data -------------------------------------------------------------------------------------


def object_key(index: int) -> str:
    """``objs/<thousand>/<hundred>/obj-<index>.bin``: any first k*100 objects are whole prefixes."""
    return f"{OBJECTS_ROOT}/{index // 1000:03d}/{index % 1000 // GROUP}/obj-{index:06d}.bin"


def prefixes(bucket: str, count: int) -> list[str]:
    """The fewest prefixes that hold exactly the first ``count`` objects (a multiple of GROUP)."""
    out = [f"s3://{bucket}/{OBJECTS_ROOT}/{t:03d}" for t in range(count // 1000)]
    out += [f"s3://{bucket}/{OBJECTS_ROOT}/{count // 1000:03d}/{h}" for h in range(count % 1000 // GROUP)]
    return out


def upload(server: S3Server, profile: Profile) -> dict[str, Any]:
    """Seeded random objects, straight into the server (no latency), and the list file of their URLs."""
    import fsspec

    fs = fsspec.filesystem("s3", skip_instance_cache=True, **server.storage_options)
    rng = np.random.default_rng(profile.seed)
    sizes = rng.integers(MIN_OBJECT, MAX_OBJECT + 1, size=profile.objects)
    started = time.time()
    for start in range(0, profile.objects, 1000):
        fs.pipe(
            {
                f"{server.bucket}/{object_key(i)}": rng.bytes(int(sizes[i]))
                for i in range(start, min(start + 1000, profile.objects))
            }
        )
    listing = io.BytesIO()
    urls = [f"s3://{server.bucket}/{object_key(i)}" for i in range(profile.objects)]
    pq.write_table(pa.table({"path": urls}), listing)
    fs.pipe_file(f"{server.bucket}/lists/objects.parquet", listing.getvalue())
    return {
        "objects": profile.objects,
        "bytes": int(sizes.sum()),
        "mean_object_bytes": round(float(sizes.mean()), 1),
        "object_bytes_range": [MIN_OBJECT, MAX_OBJECT],
        "upload_s": round(time.time() - started, 1),
        "layout": f"s3://{server.bucket}/{object_key(0)} ... (groups of {GROUP} under prefixes of 1000)",
    }


# -- steps ------------------------------------------------------------------------------------


class Harness:
    """Runs steps in fresh processes and attaches the proxy's traffic and the CPU they saw."""

    def __init__(
        self, work: str, env: dict[str, str], proxy: LatencyProxy, cpu: TreeMonitor, server: TreeMonitor
    ) -> None:
        self.work = work
        self.env = env
        self.proxy = proxy
        self.cpu = cpu
        self.server = server
        self.began = time.time()

    def step(self, name: str, config: dict[str, Any]) -> dict[str, Any]:
        config = {**config, "result_path": os.path.join(self.work, f"{name}.json")}
        before = self.proxy.counts()
        proxy_before = self._proxy_cpu_s()
        with open(os.path.join(self.work, f"{name}.log"), "w") as log:
            proc = subprocess.Popen(
                [sys.executable, "-m", "bench.smallfiles_run", json.dumps(config)],
                cwd=REPO,
                env=self.env,
                stdout=log,
                stderr=subprocess.STDOUT,
            )
            with TreeMonitor(proc.pid, interval_s=0.25) as tree:
                code = proc.wait()
        if code != 0 or not os.path.exists(config["result_path"]):
            raise RuntimeError(f"{name} failed (exit {code}); see {self.work}/{name}.log")
        with open(config["result_path"]) as handle:
            result: dict[str, Any] = json.load(handle)
        after = self.proxy.counts()
        result["proxy_cpu_s"] = round(self._proxy_cpu_s() - proxy_before, 2)
        start, end = result["window"]
        result["traffic"] = {k: after[k] - before[k] for k in after if k != "max_open"}
        result["client_cpu_util"] = round(tree.utilisation(start, end, CPUS), 3)
        result["client_cpu_s"] = round(tree.cpu_between(start, end), 2)
        result["server_cpu_s"] = round(self.server.cpu_between(start, end), 2)
        result["machine_cpu_util"] = round(self.cpu.utilisation(start, end, CPUS), 3)
        result["load_avg_after"] = round(os.getloadavg()[0], 2)
        result["client_peak_rss_mb"] = round(tree.peak_rss_mb, 1)
        print(f"[{time.time() - self.began:6.1f}s] {name}: {result['run_s']:.1f} s", flush=True)
        return result

    def _proxy_cpu_s(self) -> float:
        """CPU seconds of the proxy's thread so far (it shares this process with the samplers)."""
        times = [t for t in psutil.Process().threads() if t.id == self.proxy.thread_id]
        return float(times[0].user_time + times[0].system_time) if times else 0.0

    def job(
        self, name: str, input_uri: str, preprocess: str, profile: Profile, options: dict[str, Any]
    ) -> dict[str, Any]:
        return self.step(
            name,
            {
                "step": "job",
                "input_uri": input_uri,
                "output_dir": os.path.join(self.work, "out", name),
                "preprocess": preprocess,
                "batch_size": profile.batch_size,
                "max_shard_rows": profile.max_shard_rows,
                "storage_options": options,
                "cpu_budget": CPUS,
            },
        )

    def merge(
        self,
        name: str,
        sources: list[str],
        output_uri: str,
        concurrency: int,
        options: dict[str, Any],
        reader: str = "auto",
    ) -> dict[str, Any]:
        self.proxy.traffic.max_open = self.proxy.traffic.open
        result = self.step(
            name,
            {
                "step": "merge",
                "sources": sources,
                "output_uri": output_uri,
                "concurrency": concurrency,
                "storage_options": options,
                "reader": reader,
            },
        )
        result["connections_max_open"] = self.proxy.traffic.max_open
        return result


def limit_objs_s(concurrency: int, mean_bytes: float, first_byte_s: float, bandwidth_mbs: float) -> float:
    """Reads at ``concurrency`` in flight, each ``first byte + size / bandwidth``: the latency-bound limit."""
    return concurrency / (first_byte_s + mean_bytes / (bandwidth_mbs * 1e6))


def read_phase_unmerged(log_dir: str) -> dict[str, float]:
    """From the hook's log: objects over the wall span of fetching, and the time per object."""
    spans = []
    for name in os.listdir(log_dir):
        with open(os.path.join(log_dir, name)) as handle:
            spans += [tuple(float(x) for x in line.split()) for line in handle if line.strip()]
    objects = sum(s[2] for s in spans)
    wall = max(s[1] for s in spans) - min(s[0] for s in spans)
    return {
        "objects": int(objects),
        "read_s": round(wall, 3),
        "read_objs_s": round(objects / wall, 1),
        "ms_per_object_per_process": round(1000 * sum(s[1] - s[0] for s in spans) / objects, 2),
        "processes_fetching": len(os.listdir(log_dir)),
    }


def sweep_objects(profile: Profile, concurrency: int) -> int:
    wanted = max(GROUP, concurrency * profile.sweep_rounds)
    rounded = math.ceil(wanted / GROUP) * GROUP
    return min(rounded, profile.sweep_max_objects, profile.objects)


def sweep_step(
    harness: Harness,
    profile: Profile,
    bucket: str,
    concurrency: int,
    reader: str,
    options: dict[str, Any],
    limits: Callable[[int], float],
) -> dict[str, Any]:
    """One merge of the sweep, beside the latency-bound limit at its concurrency."""
    count = sweep_objects(profile, concurrency)
    name = f"sweep-c{concurrency}-{reader}"
    step = harness.merge(name, prefixes(bucket, count), f"s3://{bucket}/sweep/{name}", concurrency, options, reader)
    limit = limits(concurrency)
    return {
        "concurrency": concurrency,
        "reader": step["reader"],
        "objects": step["objects"],
        "merge_objs_s": round(step["objects_per_s"], 1),
        "limit_objs_s": round(limit, 1),
        "over_limit": round(step["objects_per_s"] / limit, 3),
        # The reads alone (listing, the plan and the pack's upload aside): what the limit models.
        "read_objs_s": round(step["read_objects_per_s"], 1),
        "read_over_limit": round(step["read_objects_per_s"] / limit, 3),
        "seconds": round(step["seconds"], 2),
        "packs": step["packs"],
        "requests": step["traffic"]["requests"],
        "connections_max_open": step["connections_max_open"],
        "client_cpu_ms_per_object": round(1000 * step["client_cpu_s"] / step["objects"], 2),
        "server_cpu_ms_per_object": round(1000 * step["server_cpu_s"] / step["objects"], 2),
        "proxy_cpu_ms_per_object": round(1000 * step["proxy_cpu_s"] / step["objects"], 2),
        "client_cpu_util": step["client_cpu_util"],
        "machine_cpu_util": step["machine_cpu_util"],
        "load_avg_after": step["load_avg_after"],
    }


def run(
    profile: Profile, harness: Harness, server: S3Server, data: dict[str, Any], latency: dict[str, float]
) -> dict[str, Any]:
    bucket = server.bucket
    options = {"client_kwargs": {"endpoint_url": harness.proxy.endpoint_url}}
    fetch_log = harness.env["ANTBATCH_BENCH_FETCH_LOG"]

    unmerged = harness.job(
        "unmerged-job", f"s3://{bucket}/lists", "bench.smallfiles_code:fetch_features", profile, options
    )
    unmerged["read"] = read_phase_unmerged(fetch_log)
    merge = harness.merge(
        "merge", [f"s3://{bucket}/{OBJECTS_ROOT}"], f"s3://{bucket}/packs", _default_concurrency(), options
    )
    packed = harness.job("packed-job", f"s3://{bucket}/packs", "bench.smallfiles_code:pack_features", profile, options)
    limits = functools.partial(
        limit_objs_s,
        mean_bytes=data["mean_object_bytes"],
        first_byte_s=latency["first_byte_s"],
        bandwidth_mbs=latency["bandwidth_mbs"],
    )
    sweep = [sweep_step(harness, profile, bucket, c, "auto", options, limits) for c in profile.concurrencies]
    with_s3fs = [sweep_step(harness, profile, bucket, c, "s3fs", options, limits) for c in profile.s3fs_concurrencies]
    return summarise(data, unmerged, merge, packed, sweep, with_s3fs)


def _default_concurrency() -> int:
    from airflow_antbatch.merge import DEFAULT_CONCURRENCY

    return DEFAULT_CONCURRENCY


def summarise(
    data: dict[str, Any],
    unmerged: dict[str, Any],
    merge: dict[str, Any],
    packed: dict[str, Any],
    sweep: list[dict[str, Any]],
    with_s3fs: list[dict[str, Any]],
) -> dict[str, Any]:
    """The flat figures the bars are judged on, then every step in full."""
    objects = data["objects"]
    for name, step in (("the unmerged job", unmerged), ("the merge", merge), ("the packed job", packed)):
        if step["objects"] != objects:
            raise RuntimeError(f"{name} handled {step['objects']} objects of {objects}")
    unmerged_read = unmerged["read"]["read_objs_s"]
    packed_read = round(objects / packed["read_busy_s"], 1)
    unmerged_e2e = round(objects / unmerged["run_s"], 1)
    packed_e2e = round(objects / (merge["run_s"] + packed["run_s"]), 1)
    best = max(sweep, key=lambda s: s["merge_objs_s"])
    best_read = max(sweep, key=lambda s: s["read_objs_s"])
    nearest = max(sweep, key=lambda s: s["over_limit"])
    return {
        "unmerged_read_objs_s": unmerged_read,
        "packed_read_objs_s": packed_read,
        "read_ratio": round(packed_read / unmerged_read, 2),
        "unmerged_e2e_objs_s": unmerged_e2e,
        "packed_e2e_objs_s": packed_e2e,
        "packed_job_objs_s": round(objects / packed["run_s"], 1),
        "e2e_ratio": round(packed_e2e / unmerged_e2e, 2),
        "unmerged_e2e_s": round(unmerged["run_s"], 2),
        "packed_e2e_s": round(merge["run_s"] + packed["run_s"], 2),
        "merge_objs_s": best["merge_objs_s"],
        "merge_limit_objs_s": best["limit_objs_s"],
        "merge_over_limit": best["over_limit"],
        "merge_best_concurrency": best["concurrency"],
        "merge_read_objs_s": best_read["read_objs_s"],
        "merge_read_over_limit": best_read["read_over_limit"],
        "merge_read_best_concurrency": best_read["concurrency"],
        "merge_nearest_limit": {k: nearest[k] for k in ("concurrency", "merge_objs_s", "limit_objs_s", "over_limit")},
        "bars": {
            "read_10x": packed_read >= 10 * unmerged_read,
            "e2e_faster": packed_e2e > unmerged_e2e,
            "merge_half_limit_at_best": best["over_limit"] >= 0.5,
            "merge_reads_half_limit_at_best": best_read["read_over_limit"] >= 0.5,
        },
        "sweep": sweep,
        "sweep_s3fs": with_s3fs,
        "unmerged": unmerged,
        "merge": merge,
        "packed": packed,
    }


def _weed_pid() -> int:
    """The SeaweedFS server this process started (its CPU is the store's, apart from the client's)."""
    found = [p.pid for p in psutil.Process().children() if p.name() == "weed"]
    if len(found) != 1:
        raise RuntimeError(f"expected one weed child process, found {found}")
    return int(found[0])


def main(argv: list[str] | None = None) -> int:
    from tests.s3_servers import run_seaweedfs

    parser = argparse.ArgumentParser(prog="python -m bench.smallfiles", description=__doc__)
    parser.add_argument("--quick", action="store_true", help="the quick profile (2,000 objects, under 4 minutes)")
    parser.add_argument("--objects", type=int, help="override the profile's object count (a multiple of 100)")
    parser.add_argument("--work", default=os.environ.get("ANTBATCH_BENCH_WORK", "/tmp/antbatch-bench"))
    parser.add_argument("--out", help="result JSON (default bench/results/smallfiles[-quick].json)")
    parser.add_argument(
        "--no-report", action="store_true", help="do not rewrite docs/benchmarks.md's section and the PNG"
    )
    parser.add_argument("--quiet-wait", type=float, default=0.0, help="wait up to this many seconds for load < 0.5")
    args = parser.parse_args(argv)

    profile = PROFILES["quick" if args.quick else "full"]
    if args.objects:
        profile = dataclasses.replace(profile, objects=args.objects)
    if profile.objects % GROUP:
        parser.error(f"--objects must be a multiple of {GROUP}")
    out_path = args.out or os.path.join(RESULTS, "smallfiles-quick.json" if args.quick else "smallfiles.json")
    load_before = wait_for_quiet(args.quiet_wait)
    began = time.time()
    work = os.path.join(args.work, f"smallfiles-{profile.name}-{os.getpid()}")
    fetch_log = os.path.join(work, "fetch-log")
    os.makedirs(fetch_log)
    with (
        run_seaweedfs(max_volumes=SEAWEEDFS_VOLUMES) as server,
        MachineMonitor() as cpu,
        TreeMonitor(_weed_pid(), interval_s=0.5) as server_cpu,
    ):
        print(f"[{time.time() - began:6.1f}s] SeaweedFS at {server.endpoint_url}", flush=True)
        os.environ.update(server.env)  # credentials travel by environment, as in production
        data = upload(server, profile)
        print(f"[{time.time() - began:6.1f}s] uploaded {data['objects']} objects in {data['upload_s']} s", flush=True)
        upstream = ("127.0.0.1", int(server.endpoint_url.rsplit(":", 1)[1]))
        with LatencyProxy(upstream) as proxy:
            env = {
                **os.environ,
                "PYTHONPATH": REPO + os.pathsep + os.environ.get("PYTHONPATH", ""),
                "OMP_WAIT_POLICY": "PASSIVE",
                "ANTBATCH_BENCH_S3_ENDPOINT": proxy.endpoint_url,
                "ANTBATCH_BENCH_FETCH_LOG": fetch_log,
            }
            latency = {"first_byte_s": proxy.first_byte_s, "bandwidth_mbs": proxy.bandwidth / 1e6}
            results = run(profile, Harness(work, env, proxy, cpu, server_cpu), server, data, latency)
    report = {
        "benchmark": "smallfiles",
        "profile": profile.name,
        "command": f"python -m bench.smallfiles{' --quick' if args.quick else ''}"
        + (f" --objects {args.objects}" if args.objects else ""),
        "machine": machine(),
        "git": git_state(),
        "latency": {
            **latency,
            "where": "a TCP proxy on 127.0.0.1 between s3fs and SeaweedFS (bench/s3latency.py)",
        },
        "data": data,
        "config": profile.to_dict(),
        "load_avg_before": round(load_before, 2),
        **results,
        "load_avg_after": round(os.getloadavg()[0], 2),
        "wall_s": round(time.time() - began, 1),
        "finished_at": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
    }
    os.makedirs(os.path.dirname(out_path), exist_ok=True)
    with open(out_path, "w") as handle:
        json.dump(report, handle, indent=1)
    from bench.smallfiles_report import text_table

    print(text_table(report))
    print(f"wrote {out_path} in {report['wall_s']:.0f}s")
    shutil.rmtree(work, ignore_errors=True)
    if not args.no_report:
        render(out_path, "bench.smallfiles_report")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
