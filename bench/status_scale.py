"""Status and a worker's start at a million shards and a thousand workers (issue 13, points 2 and 3).

``python -m bench.status_scale [--quick]`` plans 1,000,000 objects through bench.plan_scale's
simulated listing (100,000 with ``--quick``), then, each in a fresh process on local files:

- **a worker's start**: open the ledger (read and build the plan) and win its first claim,
  through the real ``Ledger`` and ``Claimer``: seconds and RSS (bars: 2 s, 300 MB);
- **one status read** with 1,000 workers' heartbeats in the ledger, as the sensor, the trigger,
  the UI page and ``antbatch status`` read it: ``Ledger.open(...).status()`` from a cold start,
  its requests by kind (listing pages counted) and its CPU seconds (bars: 1,100 requests, 2 s).
  Each heartbeat is what a busy worker writes: counts, two leases, its run, twenty recent
  failures and an hour of 10-second timeline buckets (the largest a heartbeat gets).

Results go to ``bench/results/status-scale.json`` (``status-scale-quick.json`` with ``--quick``).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from typing import Any

from bench.plan_scale import child_plan, rss_mb

WORKERS = 1000
BARS = {"start_s": 2.0, "start_rss_mb": 300.0, "status_requests": 1100, "status_cpu_s": 2.0}


def write_heartbeats(plan_uri: str, workers: int) -> None:
    """``workers`` busy workers' heartbeats, as big as the worker loop makes them."""
    from airflow_antbatch.ledger import Ledger, WorkerIdentity

    ledger = Ledger.open(plan_uri)
    now = int(time.time()) // 10 * 10
    timeline = [[now - 10 * i, 400] for i in range(360)]
    for i in range(workers):
        identity = WorkerIdentity(f"worker-{i}")
        ledger.recent_failures.clear()
        ledger.recent_failures.extend((ledger.plan.shard_id(i), 0, "ValueError: a long error " * 4) for _ in range(20))
        first = i * len(ledger.plan) // workers
        stats = {
            "shards_committed": 500,
            "rows_committed": 50_000,
            "rows_per_s": 40.0,
            "rows_quarantined": 0,
            "current_shard": ledger.plan.shard_id(first),
            "leases": [ledger.plan.shard_id(first), ledger.plan.shard_id(first + 1)],
            "run": [first + 2, first + 1000],
            "idle": False,
            "timeline": timeline,
        }
        ledger.heartbeat(identity, 7, state="running", stats=stats)


def child_start(plan_uri: str) -> dict[str, Any]:
    """What ``antbatch worker`` does before its first shard: open the ledger, win a claim."""
    from airflow_antbatch.ledger import Ledger, WorkerIdentity
    from airflow_antbatch.worker.claims import Claimer

    imported = rss_mb()
    started = time.perf_counter()
    ledger = Ledger.open(plan_uri)
    claimer = Claimer(ledger, WorkerIdentity("worker-999"), slot=(999, 1000))
    lease = claimer.next_lease(time.sleep)
    seconds = time.perf_counter() - started
    assert lease is not None
    return {
        "shards": len(ledger.plan),
        "start_s": round(seconds, 3),
        "import_rss_mb": imported["rss_mb"],
        "start_rss_mb": rss_mb()["rss_mb"],
        "requests": dict(ledger.store.counts),
    }


def child_status(plan_uri: str) -> dict[str, Any]:
    """One cold status read, as a sensor poke or ``antbatch status`` makes it."""
    from airflow_antbatch.ledger import Ledger

    cpu = time.process_time()
    wall = time.perf_counter()
    ledger = Ledger.open(plan_uri)
    opened = time.process_time()
    status = ledger.status()
    return {
        "workers": len(status.workers),
        "committed": status.committed,
        "requests": dict(ledger.store.counts),
        "status_requests": sum(ledger.store.counts.values()),  # the plan's GET in open() included
        "status_cpu_s": round(time.process_time() - cpu, 3),
        "status_cpu_s_without_plan": round(time.process_time() - opened, 3),
        "status_wall_s": round(time.perf_counter() - wall, 3),
        "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
    }


def _child(*args: str) -> dict[str, Any]:
    out = subprocess.run(
        [sys.executable, "-m", "bench.status_scale", *args], check=True, capture_output=True, text=True
    ).stdout
    return dict(json.loads(out.strip().splitlines()[-1]))


def run(objects: int) -> dict[str, Any]:
    with tempfile.TemporaryDirectory(prefix="status-scale-") as tmp:
        planned = _child("--child-plan", str(objects), os.path.join(tmp, "out"))
        write_heartbeats(planned["plan_uri"], WORKERS)
        start = _child("--child-start", planned["plan_uri"])
        status = _child("--child-status", planned["plan_uri"])
    return {
        "shards": planned["shards"],
        "workers": WORKERS,
        "bytes_per_shard": planned["bytes_per_shard"],
        "start": start,
        "status": status,
        "bars": BARS,
        "met": {
            "start_s": start["start_s"] <= BARS["start_s"],
            "start_rss_mb": start["start_rss_mb"] <= BARS["start_rss_mb"],
            "status_requests": status["status_requests"] <= BARS["status_requests"],
            "status_cpu_s": status["status_cpu_s"] <= BARS["status_cpu_s"],
        },
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="100,000 objects instead of 1,000,000")
    parser.add_argument("--child-plan", nargs=2, metavar=("OBJECTS", "OUT"), help=argparse.SUPPRESS)
    parser.add_argument("--child-start", metavar="PLAN_URI", help=argparse.SUPPRESS)
    parser.add_argument("--child-status", metavar="PLAN_URI", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child_plan:
        print(json.dumps(child_plan(int(args.child_plan[0]), args.child_plan[1])))
        return 0
    if args.child_start:
        print(json.dumps(child_start(args.child_start)))
        return 0
    if args.child_status:
        print(json.dumps(child_status(args.child_status)))
        return 0
    result = run(100_000 if args.quick else 1_000_000)
    name = "status-scale-quick.json" if args.quick else "status-scale.json"
    path = os.path.join(os.path.dirname(__file__), "results", name)
    with open(path, "w") as handle:
        json.dump(result, handle, indent=1)
    print(json.dumps(result, indent=1))
    return 0 if all(result["met"].values()) else 1


if __name__ == "__main__":
    raise SystemExit(main())
