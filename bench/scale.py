"""Claiming at scale (issue 13): the real ``Claimer`` and ``Ledger`` for 1 to 1,000 simulated
workers on a virtual clock, against an S3-like store that counts every request.

``python -m bench.scale [--quick]`` runs W = 1, 10, 100, 1000 over 100,000 shards (20,000 with
``--quick``) and writes ``bench/results/scale[-quick].json``, then docs/scale.md from it
(``bench.scale_report``).

Why simulated: one worker over 100,000 shards at S3 latencies takes days of wall-clock, and
1,000 worker processes do not fit 2 cores. Each worker here is a thread running the product's
own claiming code (``airflow_antbatch.worker.claims.Claimer``) over its own ``Ledger`` with
the clock ``SimClock.now`` (so leases expire in virtual time), plus a heartbeat thread beating
every TTL/4 as ``worker.heartbeat.Heartbeat`` does. The model is null: a shard takes a drawn
virtual time (``Work``: base 20 s, lognormal jitter sigma 0.1, 5% stragglers at 10x; seeded,
the same shards the same times for every W). After the work the worker does what
``worker.loop`` does: one output PUT (to a second store, counted apart), the fencing read,
the commit create, a heartbeat with fresh counts, then ``settle``. Store latency and pricing
are in ``bench/simstore.py``; the virtual clock in ``bench/simclock.py``.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime as dt
import hashlib
import inspect
import json
import math
import os
import random
import sys
import time
from collections import Counter
from typing import TYPE_CHECKING, Any

from airflow_antbatch import layout
from airflow_antbatch.ledger import Ledger, WorkerIdentity
from airflow_antbatch.worker.claims import Claimer
from bench.simclock import SimClock
from bench.simstore import GET_KINDS, S3_GET_PER_S, S3_PUT_PER_S, Latency, SimStore

if TYPE_CHECKING:
    from airflow_antbatch.ledger import Lease
    from airflow_antbatch.shards import JobPlan

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RESULTS = os.path.join(REPO, "bench", "results")
LEDGER_KINDS = ("create", "read", "put", "list", "delete")
# S3 Standard request prices (us-east-1): PUT, COPY, POST, LIST $0.005 per 1,000; GET $0.0004
# per 1,000; DELETE free.
USD_PER_PUT = 0.005 / 1000
USD_PER_GET = 0.0004 / 1000
ROWS_PER_SHARD = 1000


@dataclasses.dataclass(frozen=True)
class Work:
    """The null model: virtual seconds per shard, drawn once per shard from a fixed seed."""

    base_s: float = 20.0
    jitter_sigma: float = 0.1
    straggler_share: float = 0.05
    straggler_factor: float = 10.0

    def draw(self, shards: int, seed: int) -> list[float]:
        rng = random.Random(seed)
        out = []
        for _ in range(shards):
            t = self.base_s * rng.lognormvariate(0.0, self.jitter_sigma)
            out.append(t * self.straggler_factor if rng.random() < self.straggler_share else t)
        return out


@dataclasses.dataclass(frozen=True)
class Config:
    workers: tuple[int, ...]
    shards: int
    seed: int = 13
    lease_ttl_s: float = 60.0
    poll_interval_s: float = 5.0  # worker.loop's default for a 60 s lease: min(5, ttl/4)
    post_commit_beat: bool = True  # worker.loop beats after each commit
    work: Work = dataclasses.field(default_factory=Work)
    latency: Latency = dataclasses.field(default_factory=Latency)


def make_plan(shards: int, lease_ttl_s: float) -> JobPlan:
    """``shards`` one-file shards with ids of the planner's form (the ledger needs only ids and the spec)."""
    from airflow_antbatch.shards import JobPlan, Piece, Shard
    from airflow_antbatch.spec import JobSpec

    spec = JobSpec(
        input_uri="memory://scale/in",
        output_uri="memory://scale/out",
        model="bench.workloads:build_sleep_model",
        lease_ttl_s=lease_ttl_s,
        max_shard_rows=ROWS_PER_SHARD,
    )
    cut = tuple(
        Shard(
            f"{i:05d}-{hashlib.blake2b(str(i).encode(), digest_size=4).hexdigest()}",
            (Piece(f"memory://scale/in/part-{i:07d}.parquet", 4096, rows=ROWS_PER_SHARD, row_groups=(0,)),),
        )
        for i in range(shards)
    )
    return JobPlan(
        spec=spec,
        attempt=0,
        fingerprint="0" * 64,
        input_format="parquet",
        shards=cut,
        created_at="2026-01-01T00:00:00+00:00",
    )


def shard_ids(plan: JobPlan) -> list[str]:
    return list(plan.shard_ids)


@dataclasses.dataclass
class _Tally:
    """What the workers did, summed: tries, commits, waste, and when each worker exited."""

    leases: int = 0
    commits_won: int = 0
    commits_refused: int = 0
    fenced: int = 0
    wasted_s: float = 0.0
    last_commit_s: float = 0.0
    exits: list[float] = dataclasses.field(default_factory=list)
    committed: Counter[str] = dataclasses.field(default_factory=Counter)
    claimer: Counter[str] = dataclasses.field(default_factory=Counter)  # the Claimers' own stats, summed


class _Worker:
    """One simulated worker process: the claim loop thread and its heartbeat thread."""

    def __init__(self, run: _Run, index: int) -> None:
        self.run = run
        self.ledger = Ledger(run.state, run.plan, clock=run.sim.now)
        self.identity = WorkerIdentity(f"worker-{index}", incarnation=f"{run.cfg.seed:04x}{index:08x}")
        self.claimer = Claimer(
            self.ledger,
            self.identity,
            slot=(index, run.workers),
            poll_interval_s=run.cfg.poll_interval_s,
            rng=random.Random(run.cfg.seed * 1_000_003 + index),
        )
        self.beat_n = 0
        self.stopped = False
        self.shards_committed = 0
        self.rows_committed = 0

    def beat(self, state: str = "running") -> None:
        self.beat_n += 1
        elapsed = max(self.run.sim.now(), 1e-9)
        stats = {
            "shards_committed": self.shards_committed,
            "rows_committed": self.rows_committed,
            "rows_per_s": self.rows_committed / elapsed,
            **self.claimer.heartbeat_fields(),
        }
        self.ledger.heartbeat(self.identity, self.beat_n, state=state, stats=stats)

    def beats(self) -> None:
        """The heartbeat thread: every TTL/4 until the worker stops (``Heartbeat._loop``)."""
        interval = self.run.cfg.lease_ttl_s / 4
        while True:
            self.run.sim.sleep(interval)
            if self.stopped:
                return
            self.beat()

    def main(self) -> None:
        sim, tally = self.run.sim, self.run.tally
        self.beat()
        self.run.state.read(layout.PLAN_FILE)  # a real worker opens the plan: one GET
        while (lease := self.claimer.next_lease(sim.sleep)) is not None:
            tally.leases += 1
            self.process(lease)
        self.stopped = True
        self.beat(self.final_state())
        tally.exits.append(sim.now())
        stats = getattr(self.claimer, "stats", None)
        if stats is not None and hasattr(stats, "to_dict"):
            tally.claimer.update(stats.to_dict())

    def final_state(self) -> str:
        """The last heartbeat's state: a claimer with nothing left returns None only when finished."""
        return "finished"

    def process(self, lease: Lease) -> None:
        """One shard as ``worker.loop`` finishes it: output PUT, fencing read, commit, beat, settle.

        ``settle`` gets done=False only when the fencing read finds a later try (the loop then
        lets the claimer look at the shard again); a refused commit means another try committed.
        """
        run, tally = self.run, self.run.tally
        seconds = run.work[lease.shard_id]
        run.sim.sleep(seconds)
        name = layout.output_name(run.plan.attempt, lease.shard_id, lease.epoch)
        run.output.put(name, b"rows", kind="data")
        done = True
        if not self.ledger.holds(lease):
            tally.fenced += 1
            tally.wasted_s += seconds
            done = False
        elif self.ledger.commit(lease, file=name, rows=ROWS_PER_SHARD, **run.commit_extra(name)):
            tally.commits_won += 1
            tally.committed[lease.shard_id] += 1
            tally.last_commit_s = run.sim.now()
            self.shards_committed += 1
            self.rows_committed += ROWS_PER_SHARD
            if run.cfg.post_commit_beat:
                self.beat()
        else:
            tally.commits_refused += 1
            tally.wasted_s += seconds
        self.claimer.settle(lease, done=done)


class _Run:
    """One W: the clock, the two stores, the plan's drawn work, and the workers."""

    def __init__(self, cfg: Config, plan: JobPlan, work: dict[str, float], workers: int) -> None:
        self.cfg = cfg
        self.plan = plan
        self.work = work
        self.workers = workers
        self.sim = SimClock()
        self.state = SimStore(self.sim, latency=cfg.latency, seed=cfg.seed, name="state")
        self.output = SimStore(self.sim, latency=cfg.latency, seed=cfg.seed + 1, name="output")
        self.tally = _Tally()
        self._sha = "sha256" in inspect.signature(Ledger.commit).parameters

    def commit_extra(self, name: str) -> dict[str, Any]:
        return {"sha256": hashlib.sha256(name.encode()).hexdigest()} if self._sha else {}

    def execute(self) -> dict[str, Any]:
        self.state.preload(layout.PLAN_FILE, b"plan")  # the planner's write, before the workers
        for index in range(self.workers):
            worker = _Worker(self, index)
            self.sim.spawn(worker.main, name=f"worker-{index}")
            self.sim.spawn(worker.beats, name=f"beats-{index}")
        start = time.perf_counter()
        self.sim.run()
        return self.summary(time.perf_counter() - start)

    def summary(self, real_s: float) -> dict[str, Any]:
        s, tally, counts = len(self.work), self.tally, self.state.counts
        ledger = {k: counts.get(k, 0) for k in LEDGER_KINDS}
        heartbeats = counts.get("heartbeat", 0)
        data_puts = sum(self.output.counts.values())
        puts = sum(v for k, v in counts.items() if k not in GET_KINDS and k != "delete") + data_puts
        gets = sum(counts.get(k, 0) for k in GET_KINDS if k != "list")
        usd = (puts + counts.get("list", 0)) * USD_PER_PUT + gets * USD_PER_GET
        total_work = sum(self.work.values())
        ideal = total_work / self.workers
        makespan = max(tally.exits, default=0.0)
        peak_put, put_prefix, put_at = self.state.meter.peak_per_prefix("put")
        peak_get, get_prefix, get_at = self.state.meter.peak_per_prefix("get")
        self.output.meter.fold()
        out_put = self.output.meter.total_peak.get("put", (0, 0))[0]  # every output file is in one folder
        not_once = sorted(sh for sh in self.work if tally.committed.get(sh, 0) != 1)
        return {
            "workers": self.workers,
            "shards": s,
            "ledger_requests_per_shard": round(sum(ledger.values()) / s, 4),
            "ledger_requests_per_shard_by_kind": {k: round(v / s, 4) for k, v in ledger.items()},
            "heartbeats_per_shard": round(heartbeats / s, 4),
            "data_puts_per_shard": round(data_puts / s, 4),
            "requests": {**dict(counts), "data_put": data_puts},
            "requests_by_folder_per_shard": {
                f"{kind} {folder}": round(n / s, 4) for (kind, folder), n in sorted(self.state.by_folder.items())
            },
            "peak_put_per_s_per_prefix": peak_put,
            "peak_put_prefix": put_prefix,
            "peak_put_at_s": put_at,
            "peak_get_per_s_per_prefix": peak_get,
            "peak_get_prefix": get_prefix,
            "peak_get_at_s": get_at,
            "peak_put_per_s_all_prefixes": self.state.meter.total_peak.get("put", (0, 0))[0],
            "peak_get_per_s_all_prefixes": self.state.meter.total_peak.get("get", (0, 0))[0],
            "peak_output_put_per_s": out_put,
            "s3_limits_per_prefix": {"put": S3_PUT_PER_S, "get": S3_GET_PER_S},
            "usd_per_million_shards": round(usd * 1e6 / s, 2),
            "usd_per_million_shards_by_part": {
                "ledger": round(self._ledger_usd(ledger) * 1e6 / s, 2),
                "heartbeats": round(heartbeats * USD_PER_PUT * 1e6 / s, 2),
                "data_puts": round(data_puts * USD_PER_PUT * 1e6 / s, 2),
            },
            "makespan_over_ideal": round(makespan / ideal, 4),
            "makespan_s": round(makespan, 1),
            "ideal_s": round(ideal, 1),
            "last_commit_s": round(tally.last_commit_s, 1),
            "total_work_s": round(total_work, 1),
            "leases": tally.leases,
            "commits_won": tally.commits_won,
            "commits_refused": tally.commits_refused,
            "fenced": tally.fenced,
            "wasted_work_s": round(tally.wasted_s, 1),
            "shards_not_committed_once": len(not_once),
            "claimer_stats": dict(tally.claimer),
            "off_clock_requests": self.state.off_clock + self.output.off_clock,
            "sim_switches": self.sim.switches,
            "real_s": round(real_s, 1),
        }

    @staticmethod
    def _ledger_usd(ledger: dict[str, int]) -> float:
        puts = ledger["create"] + ledger["put"] + ledger["list"]
        return puts * USD_PER_PUT + ledger["read"] * USD_PER_GET


def run_scale(cfg: Config, *, log: Any = sys.stderr) -> list[dict[str, Any]]:
    """One run per W over the same plan and the same drawn work; a summary per run."""
    plan = make_plan(cfg.shards, cfg.lease_ttl_s)
    ids = shard_ids(plan)
    work = dict(zip(ids, cfg.work.draw(len(ids), cfg.seed), strict=True))
    out = []
    for workers in cfg.workers:
        result = _Run(cfg, plan, work, workers).execute()
        if log is not None:
            print(_line(result), file=log, flush=True)
        out.append(result)
    return out


def _line(r: dict[str, Any]) -> str:
    kinds = " ".join(f"{k} {v:.2f}" for k, v in r["ledger_requests_per_shard_by_kind"].items())
    return (
        f"W={r['workers']:>4} S={r['shards']}: ledger {r['ledger_requests_per_shard']:.2f}/shard ({kinds}); "
        f"heartbeats {r['heartbeats_per_shard']:.2f}/shard; peak/prefix PUT {r['peak_put_per_s_per_prefix']}/s "
        f"GET {r['peak_get_per_s_per_prefix']}/s; ${r['usd_per_million_shards']:.2f}/M shards; "
        f"makespan {r['makespan_s']:.0f} s = {r['makespan_over_ideal']:.3f}x ideal; "
        f"{r['real_s']:.0f} s real"
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.scale", description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="20,000 shards instead of 100,000")
    parser.add_argument("--workers", default="1,10,100,1000", help="comma-separated W values")
    parser.add_argument("--shards", type=int, help="override the shard count")
    parser.add_argument("--seed", type=int, default=13)
    parser.add_argument("--out", help="result JSON (default bench/results/scale[-quick].json)")
    parser.add_argument("--no-doc", action="store_true", help="do not rewrite docs/scale.md")
    args = parser.parse_args(argv)
    shards = args.shards or (20_000 if args.quick else 100_000)
    cfg = Config(workers=tuple(int(w) for w in args.workers.split(",")), shards=shards, seed=args.seed)
    command = "python -m bench.scale" + (" --quick" if args.quick else "")
    from bench.run import git_state

    started = time.time()
    load_before = os.getloadavg()
    git = git_state()  # before the runs: the code they import is the code of this moment
    runs = run_scale(cfg)
    report = {
        "command": command,
        "finished_at": dt.datetime.now(dt.UTC).strftime("%Y-%m-%d %H:%M:%S UTC"),
        "wall_s": round(time.time() - started, 1),
        "cpu_count": os.cpu_count(),
        "load_avg_before": [round(x, 1) for x in load_before],
        "load_avg_after": [round(x, 1) for x in os.getloadavg()],
        "git": git,
        "config": _config_dict(cfg),
        "runs": runs,
    }
    out = args.out or os.path.join(RESULTS, "scale-quick.json" if args.quick else "scale.json")
    with open(out, "w") as handle:
        json.dump(report, handle, indent=2)
        handle.write("\n")
    print(f"wrote {os.path.relpath(out, REPO)}", file=sys.stderr)
    if not args.no_doc:
        from bench import scale_report

        scale_report.main([out])
    return 0


def _config_dict(cfg: Config) -> dict[str, Any]:
    out = dataclasses.asdict(cfg)
    out["workers"] = list(cfg.workers)
    out["mean_work_s"] = (
        cfg.work.base_s
        * math.exp(cfg.work.jitter_sigma**2 / 2)
        * (1 + cfg.work.straggler_share * (cfg.work.straggler_factor - 1))
    )
    return out


if __name__ == "__main__":
    raise SystemExit(main())
