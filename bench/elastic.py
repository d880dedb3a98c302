"""The elastic pool against the mapped fan-out (issue 14): ``make bench-elastic``, that is
``python -m bench.elastic``, writes ``bench/results/elastic.json`` and docs/benchmarks-elastic.png.

One plan, one committed capacity trace (``bench/elastic_trace.json``: GPU slots over a night,
compressed, with capacity drops that preempt pods and spot reclaims), three runs on a simulated
cluster (``bench/elastic_cluster.py``), each worker the product's own ``Claimer`` and ``Ledger``
over a simulated S3 (``bench.scale``'s model: a shard takes a drawn time, 5% stragglers at 10x):

- **mapped**: ``launcher="kubernetes"``: ``max_workers`` mapped tasks, one pod each, with the
  task group's defaults (``worker_retries=2``, ``worker_retry_delay`` 10 s) and the
  KubernetesPodOperator's ``startup_timeout_seconds`` (120 s: a pod still not started then fails
  the try). A failed or preempted pod comes back after the retry delay, if capacity allows;
  every pod lives until its worker sees the job done.
- **mapped_patient**: the same with ``startup_timeout_seconds`` raised past the night, as a DAG
  author on a shared cluster would set it: pods then wait in the queue for capacity instead of
  using up their tries while the evening's jobs hold the cluster.
- **pool**: ``launcher="kubernetes-pool"``: the real ``PoolController`` (and so ``decide``)
  ticking every ``tick_s`` over the simulated pods and the real ``Ledger.status()``.
- **deadline**: the pool with ``deadline_s``, which needs more workers than ``min_workers``.

Lost and duplicated shards are judged from the ledger's commit records; pod-seconds are split
by use (``bench.elastic_usage``), and ``floor`` says how low any launcher's ratio could go (the
work alone). ``--seed`` (14) is run in full; ``--seeds`` (15,16,17) run the same four and are
summed up a line each under ``seeds`` (the work drawn and the preemption victims change, the
trace does not).

A preempted worker drains (NOTE [drain] in worker/drain.py) in every run, both launchers
alike: 45 s on a capacity drop (priority preemption honours the pods' 60 s grace period), 15
s on a spot reclaim (GKE's 30 s notice). ``drain`` (``--drain-seeds``, 14-21) runs the three
launchers on each of those seeds with the drain and without it, and gives the means: what
preemption cut short, pod-seconds and makespans. Virtual time: the whole benchmark takes
about two minutes of real time.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime as dt
import json
import math
import os
import statistics
import sys
import time
from typing import TYPE_CHECKING, Any

from airflow_antbatch import layout
from airflow_antbatch.ledger import Ledger
from airflow_antbatch.pool import PoolController, PoolSettings
from bench import elastic_usage
from bench.elastic_cluster import Cluster, Fleet
from bench.scale import RESULTS, Config, Work, make_plan
from bench.simclock import SimClock
from bench.simstore import SimStore

if TYPE_CHECKING:
    from collections.abc import Iterable

    from bench.elastic_cluster import Pod

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TRACE = os.path.join(REPO, "bench", "elastic_trace.json")
MAPPED_POLL_S = 1.0  # how often a mapped task's operator looks at its pod


@dataclasses.dataclass(frozen=True)
class Trace:
    """Slots over time and spot reclaims: the same for every run."""

    max_workers: int
    pod_start_s: float  # from a pod bound to a node to its worker running (image, model)
    slots: tuple[tuple[float, int], ...]  # (t, slots from then on)
    preempt: tuple[tuple[float, int], ...] = ()  # (t, pods whose node is reclaimed and replaced at once)
    description: str = ""

    @classmethod
    def load(cls, path: str) -> Trace:
        with open(path) as handle:
            doc = json.load(handle)
        return cls(
            max_workers=int(doc["max_workers"]),
            pod_start_s=float(doc["pod_start_s"]),
            slots=tuple((float(t), int(n)) for t, n in doc["slots"]),
            preempt=tuple((float(t), int(n)) for t, n in doc.get("preempt", ())),
            description=str(doc.get("description", "")),
        )

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


@dataclasses.dataclass(frozen=True)
class Setup:
    """The plan and both launchers' settings."""

    shards: int = 480
    seed: int = 14
    work: Work = dataclasses.field(default_factory=lambda: Work(base_s=30.0))
    tick_s: float = 10.0  # the pool controller's tick
    min_workers: int = 2
    retries: int = 2  # task_group's worker_retries
    retry_delay_s: float = 10.0  # task_group's worker_retry_delay
    startup_timeout_s: float = 120.0  # KubernetesPodOperator's startup_timeout_seconds
    deadline_s: float = 3000.0
    patient_startup_timeout_s: float = 24 * 3600.0  # mapped_patient: what a shared cluster's DAG author sets
    # What a preempted worker may drain (NOTE [drain]), both launchers alike: priority preemption
    # (a shrink) honours the pods' grace period (60 s: drain_budget(60)); a spot reclaim gives
    # the node's notice (30 s on GKE: drain_budget(30)).
    drain_s: float = 45.0
    reclaim_drain_s: float = 15.0


class _Job:
    """One run's clock, stores, cluster and workers; a launcher drives it."""

    def __init__(self, trace: Trace, setup: Setup) -> None:
        self.trace, self.setup = trace, setup
        self.sim = SimClock()
        # PodWorker beats after a commit itself, once the try is settled (as worker.loop does)
        self.cfg = Config(
            workers=(trace.max_workers,), shards=setup.shards, seed=setup.seed, work=setup.work, post_commit_beat=False
        )
        self.plan = make_plan(setup.shards, self.cfg.lease_ttl_s)
        self.work = dict(zip(self.plan.shard_ids, setup.work.draw(setup.shards, setup.seed), strict=True))
        self.state = SimStore(self.sim, seed=setup.seed, name="state")
        self.output = SimStore(self.sim, seed=setup.seed + 1, name="output")
        self.state.preload(layout.PLAN_FILE, b"plan")
        self.fleet = Fleet(self.sim, self.cfg, self.plan, self.work, (self.state, self.output))
        self.cluster = Cluster(self.sim, trace.pod_start_s, setup.seed, (setup.drain_s, setup.reclaim_drain_s))
        self.end_s = 0.0
        self.decisions: list[tuple[float, int, str]] = []  # (t, wanted, reason) where the wanted count changed

    def run(self, launcher: Any, *args: Any) -> dict[str, Any]:
        self.fleet.spawn(self.cluster, self.trace.max_workers)
        self.sim.spawn(self._capacity, name="capacity")
        self.sim.spawn(self._launch, launcher, *args, name="launcher")
        started = time.perf_counter()
        self.sim.run()
        return self.measure(time.perf_counter() - started)

    def _launch(self, launcher: Any, *args: Any) -> None:
        try:
            launcher(self, *args)
        finally:  # a launcher that raised must not leave the hosts polling forever
            self.fleet.over = True

    def finish(self) -> None:
        self.end_s = self.sim.now()
        self.fleet.over = True

    def _capacity(self) -> None:
        events = sorted(
            [(t, "slots", n) for t, n in self.trace.slots] + [(t, "preempt", n) for t, n in self.trace.preempt]
        )
        for t, kind, n in events:
            if self.fleet.over:
                return
            self.sim.sleep(max(0.0, t - self.sim.now()))
            if kind == "slots":
                self.cluster.set_capacity(n)
            else:
                self.cluster.preempt(n)

    def measure(self, real_s: float) -> dict[str, Any]:
        pods = self.cluster.every
        held = {
            p.name: (p.ended_s if p.ended_s is not None else self.end_s) - p.scheduled_s
            for p in pods
            if p.scheduled_s is not None
        }
        committed = Ledger(self.state, self.plan).sweep().committed
        wins = self.fleet.tally.committed
        return {
            "makespan_s": round(self.end_s, 1),
            "pod_seconds": round(sum(held.values()), 1),
            # what the pods held their slots for (bench.elastic_usage), and pending time apart
            "pod_seconds_by_use": elastic_usage.breakdown(pods, self.end_s),
            "lost": len(set(self.plan.shard_ids) - committed),
            "duplicated": sum(n - 1 for n in wins.values() if n > 1),
            "pod_starts": sum(1 for p in pods if p.started_s is not None and p.started_s >= 0),
            "pods_created": len(pods),
            "max_pods": max((n for _, _, n, _ in self.cluster.timeline), default=0),
            "work_s": round(sum(self.work.values()), 1),
            "wasted_work_s": round(self.fleet.tally.wasted_s, 1),  # tries fenced or refused at commit
            "backups": self.fleet.tally.claimer.get("backups", 0),
            "capacity_freed_to_working_s": self._freed_to_working(),
            "preemption_to_replacement": self._replacements(),
            "decisions": [[round(t, 1), n, why] for t, n, why in self.decisions],
            "timeline": [[round(t, 1), c, n, q] for t, c, n, q in _changes(self.cluster.timeline)],
            "real_s": round(real_s, 1),
        }

    def _freed_to_working(self) -> list[dict[str, Any]]:
        """For each rise in slots: how long until a pod scheduled after it ran a worker."""
        out = []
        for t, kind, slots in self.cluster.events:
            if kind != "freed" or t >= self.end_s:
                continue
            starts = [
                p.started_s
                for p in self.cluster.every
                if p.started_s is not None and _started(p) and p.scheduled_s is not None and p.scheduled_s >= t
            ]
            out.append({"t": t, "slots": slots, "delay_s": round(min(starts) - t, 1) if starts else None})
        return out

    def _replacements(self) -> dict[str, Any]:
        """For each preempted pod, the next pod of its slot: when it was created and when it worked.
        Split by whether the slot came back at once (a spot reclaim) or the cluster shrank."""
        reclaims = {t for t, kind, _ in self.cluster.events if kind == "preempt"}
        rows: dict[str, list[tuple[float, float | None]]] = {"reclaim": [], "shrink": []}
        for pod in self.cluster.every:
            taken = pod.taken_s  # its SIGTERM: a drain (NOTE [drain]) goes on beside its heir
            if pod.reason != "DisruptionTarget" or taken is None or taken >= self.end_s:
                continue
            after = [p for p in self.cluster.every if p.slot == pod.slot and p.created_s >= taken]
            if not after:
                continue
            nxt = min(after, key=lambda p: p.created_s)
            working = nxt.started_s - taken if _started(nxt) and nxt.started_s is not None else None
            rows["reclaim" if taken in reclaims else "shrink"].append((nxt.created_s - taken, working))
        return {kind: _spread(pairs) for kind, pairs in rows.items()}


def _started(pod: Pod) -> bool:
    return pod.started_s is not None and pod.started_s >= 0


def _spread(pairs: list[tuple[float, float | None]]) -> dict[str, Any]:
    created = [c for c, _ in pairs]
    working = [w for _, w in pairs if w is not None]
    return {
        "count": len(pairs),
        "created_mean_s": round(statistics.fmean(created), 1) if created else None,
        "created_max_s": round(max(created), 1) if created else None,
        "working_mean_s": round(statistics.fmean(working), 1) if working else None,
        "working_max_s": round(max(working), 1) if working else None,
    }


def _changes(timeline: list[tuple[float, int, int, int]]) -> list[tuple[float, int, int, int]]:
    """The timeline's points where something changed (the last state at each instant)."""
    out: list[tuple[float, int, int, int]] = []
    for point in timeline:
        if out and out[-1][0] == point[0]:
            out[-1] = point
        elif not out or out[-1][1:] != point[1:]:
            out.append(point)
    return out


@dataclasses.dataclass
class _Task:
    """One mapped worker task: its tries and its pod."""

    tries: int = 0
    pod: Pod | None = None
    retry_at: float = 0.0
    ended: bool = False


def mapped(job: _Job, startup_timeout_s: float) -> None:
    """``launcher="kubernetes"``: one mapped task per slot, each a pod with Airflow retries."""
    setup, cluster, sim = job.setup, job.cluster, job.sim
    tasks = [_Task() for _ in range(job.trace.max_workers)]
    while not all(t.ended for t in tasks):
        now = sim.now()
        for slot, task in enumerate(tasks):
            if task.ended:
                continue
            if task.pod is None:
                if now >= task.retry_at:
                    task.pod, task.tries = cluster.create(slot), task.tries + 1
                continue
            pod = task.pod
            late = pod.started_s is None and now - pod.created_s >= startup_timeout_s
            if pod.phase == "Succeeded" or pod.phase == "Failed" or late:
                cluster.delete(pod.name)  # the operator deletes its pod however the try ended
                task.pod = None
                task.ended = pod.phase == "Succeeded" or task.tries > setup.retries
                task.retry_at = now + setup.retry_delay_s
        sim.sleep(MAPPED_POLL_S)
    job.finish()


def pool(settings: PoolSettings) -> Any:
    """``launcher="kubernetes-pool"``: the real controller, one tick every ``tick_s``."""

    def drive(job: _Job) -> None:
        sim, cluster = job.sim, job.cluster
        ledger = Ledger(job.state, job.plan, clock=sim.now)
        controller = PoolController(settings)
        while True:
            now = sim.now()
            plan = controller.tick([p.view(now) for p in cluster.pods.values()], ledger.status(idle=True), now, now)
            if not job.decisions or job.decisions[-1][1] != plan.decision.wanted:
                job.decisions.append((now, plan.decision.wanted, plan.decision.reason))
            for name in plan.delete:
                cluster.delete(name)
            if plan.fail is not None:
                raise RuntimeError(f"the pool failed: {plan.fail}")
            if plan.done:
                break
            for slot in plan.create:
                cluster.create(slot)
            sim.sleep(job.setup.tick_s)
        job.finish()

    return drive


def _launcher_runs(trace: Trace, setup: Setup) -> dict[str, dict[str, Any]]:
    """Both launchers, mapped twice (KPO defaults, a patient startup timeout), on one setup."""
    return {
        "mapped": _Job(trace, setup).run(mapped, setup.startup_timeout_s),
        "mapped_patient": _Job(trace, setup).run(mapped, setup.patient_startup_timeout_s),
        "pool": _Job(trace, setup).run(
            pool(PoolSettings(min_workers=setup.min_workers, max_workers=trace.max_workers))
        ),
    }


def drain_effect(trace: Trace, setup: Setup, seeds: Iterable[int]) -> dict[str, Any]:
    """NOTE [drain]: each launcher over the same seeds with preempted workers draining and with
    them giving their try back at once: means of what preemption cut short, and of the totals.
    Seeds, because one run's timing is chaotic (a kept shard moves every later claim)."""
    seeds = list(seeds)
    out: dict[str, Any] = {"seeds": seeds, "budget_s": {"shrink": setup.drain_s, "reclaim": setup.reclaim_drain_s}}
    for label, drains in (("off", (0.0, 0.0)), ("on", (setup.drain_s, setup.reclaim_drain_s))):
        rows: dict[str, list[dict[str, Any]]] = {}
        for seed in seeds:
            run = dataclasses.replace(setup, seed=seed, drain_s=drains[0], reclaim_drain_s=drains[1])
            for name, r in _launcher_runs(trace, run).items():
                rows.setdefault(name, []).append(r)
        out[label] = {
            name: {
                "makespan_s": round(statistics.fmean(r["makespan_s"] for r in runs), 1),
                "pod_seconds": round(statistics.fmean(r["pod_seconds"] for r in runs), 1),
                "cut_short_s": round(statistics.fmean(r["pod_seconds_by_use"]["preempted"] for r in runs), 1),
                "lost": sum(r["lost"] for r in runs),
                "duplicated": sum(r["duplicated"] for r in runs),
            }
            for name, runs in rows.items()
        }
    return out


def run_all(trace: Trace, setup: Setup, *, log: Any = sys.stderr) -> dict[str, Any]:
    """The three runs over the same plan, work and trace; the result document's body."""
    runs = _launcher_runs(trace, setup)
    settings = PoolSettings(min_workers=setup.min_workers, max_workers=trace.max_workers, deadline_s=setup.deadline_s)
    deadline = _Job(trace, setup).run(pool(settings))
    work_s = deadline["work_s"]
    runs["deadline"] = {
        "deadline_s": setup.deadline_s,
        "met": deadline["makespan_s"] <= setup.deadline_s,
        "min_workers": setup.min_workers,
        "workers_needed_at_full_speed": math.ceil(work_s / setup.deadline_s),
        **deadline,
    }
    if log is not None:
        for name, r in runs.items():
            print(
                f"{name:>8}: makespan {r['makespan_s']:.0f} s, {r['pod_seconds']:.0f} pod-s, "
                f"{r['pod_starts']} pod starts, max {r['max_pods']} pods, lost {r['lost']}, "
                f"duplicated {r['duplicated']} ({r['real_s']:.0f} s real)",
                file=log,
                flush=True,
            )
    return {"trace": trace.to_dict(), **runs, "floor": floor(runs), "bars": bars(runs, setup, trace)}


def floor(runs: dict[str, Any]) -> dict[str, Any]:
    """The least pod-seconds ratio any launcher could reach against each mapped run: every run
    holds pods for at least the job's work, so pool / mapped >= work / mapped's pod-seconds.
    Above 0.9, the 0.9x bar is out of reach on this trace, whatever the pool does."""
    work = runs["pool"]["work_s"]
    out: dict[str, Any] = {"work_s": work}
    for key in ("mapped", "mapped_patient"):
        r = runs[key]
        out[key] = {
            "not_work_share": round(1 - work / r["pod_seconds"], 3),
            "least_pool_ratio": round(work / r["pod_seconds"], 3),
            "pool_ratio": round(runs["pool"]["pod_seconds"] / r["pod_seconds"], 3),
        }
    return out


def seed_summary(body: dict[str, Any]) -> dict[str, Any]:
    """One seed's runs in a line: what ``--seeds`` reports beside the full run."""
    p, m, mp, d = body["pool"], body["mapped"], body["mapped_patient"], body["deadline"]
    return {
        "makespan_s": {k: body[k]["makespan_s"] for k in ("mapped", "mapped_patient", "pool", "deadline")},
        "pod_seconds": {k: body[k]["pod_seconds"] for k in ("mapped", "mapped_patient", "pool", "deadline")},
        "pool_pod_seconds_ratio": {
            "mapped": round(p["pod_seconds"] / m["pod_seconds"], 3),
            "mapped_patient": round(p["pod_seconds"] / mp["pod_seconds"], 3),
        },
        "floor": body["floor"],
        "pool_pod_seconds_by_use": p["pod_seconds_by_use"],
        "deadline_met": d["met"],
        "deadline_max_pods": d["max_pods"],
        "lost": sum(body[k]["lost"] for k in ("mapped", "mapped_patient", "pool", "deadline")),
        "duplicated": sum(body[k]["duplicated"] for k in ("mapped", "mapped_patient", "pool", "deadline")),
        "bars": body["bars"],
    }


def bars(runs: dict[str, Any], setup: Setup, trace: Trace) -> dict[str, bool]:
    """Issue 14's bars on this trace."""
    m, mp, p, d = runs["mapped"], runs["mapped_patient"], runs["pool"], runs["deadline"]
    reclaim = p["preemption_to_replacement"]["reclaim"]
    within = setup.tick_s + trace.pod_start_s + 1.0  # + the host's 1 s look for a scheduled pod
    return {
        "pool_makespan_le_mapped": p["makespan_s"] <= m["makespan_s"],
        "pool_pod_seconds_le_0.9x_mapped": p["pod_seconds"] <= 0.9 * m["pod_seconds"],
        "pool_makespan_le_mapped_patient": p["makespan_s"] <= mp["makespan_s"],
        "pool_pod_seconds_le_0.9x_mapped_patient": p["pod_seconds"] <= 0.9 * mp["pod_seconds"],
        "no_lost_or_duplicated": all(r["lost"] == 0 and r["duplicated"] == 0 for r in (m, mp, p, d)),
        "deadline_met": bool(d["met"]),
        "deadline_needs_more_than_min_workers": d["max_pods"] > setup.min_workers,
        "replacement_within_tick_plus_start": reclaim["count"] > 0
        and (reclaim["created_max_s"] or 0) <= setup.tick_s
        and reclaim["working_max_s"] is not None
        and reclaim["working_max_s"] <= within,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.elastic", description=__doc__.split("\n\n")[0])
    parser.add_argument("--trace", default=TRACE, help="capacity trace JSON (default bench/elastic_trace.json)")
    parser.add_argument("--shards", type=int, default=Setup.shards)
    parser.add_argument("--deadline-s", type=float, default=Setup.deadline_s)
    parser.add_argument(
        "--seed", type=int, default=Setup.seed, help="the full run's seed (work drawn, preemption victims)"
    )
    parser.add_argument(
        "--seeds",
        default="15,16,17",
        help="more seeds, run whole and summed up under 'seeds' (comma-separated; '' for none)",
    )
    parser.add_argument(
        "--drain-seeds",
        default="14-21",
        help="seeds FIRST-LAST for the drain's effect: every launcher with and without it ('' for none)",
    )
    parser.add_argument("--out", default=os.path.join(RESULTS, "elastic.json"))
    parser.add_argument("--no-plot", action="store_true", help="do not redraw docs/benchmarks-elastic.png")
    args = parser.parse_args(argv)
    from bench.run import git_state

    setup = Setup(shards=args.shards, deadline_s=args.deadline_s, seed=args.seed)
    started, git, load = time.time(), git_state(), os.getloadavg()
    trace = Trace.load(args.trace)
    body = run_all(trace, setup)
    seeds = {str(setup.seed): seed_summary(body)}
    for seed in (int(x) for x in args.seeds.split(",") if x.strip()):
        if str(seed) not in seeds:
            print(f"seed {seed}:", file=sys.stderr)
            seeds[str(seed)] = seed_summary(run_all(trace, dataclasses.replace(setup, seed=seed)))
    if args.drain_seeds:
        first, _, last = args.drain_seeds.partition("-")
        print(f"drain on and off, seeds {args.drain_seeds}", file=sys.stderr)
        body["drain"] = drain_effect(trace, setup, range(int(first), int(last or first) + 1))
    report = {
        "command": "python -m bench.elastic",
        "finished_at": dt.datetime.now(dt.UTC).strftime("%Y-%m-%d %H:%M:%S UTC"),
        "wall_s": round(time.time() - started, 1),
        "load_avg_before": [round(x, 1) for x in load],
        "git": git,
        "setup": dataclasses.asdict(setup),
        **body,
        "seeds": seeds,
    }
    with open(args.out, "w") as handle:
        json.dump(report, handle, indent=1)
        handle.write("\n")
    print(f"wrote {os.path.relpath(args.out, REPO)}; bars: {report['bars']}", file=sys.stderr)
    if not args.no_plot:
        from bench import elastic_report

        print(elastic_report.draw_png(args.out), file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
