"""From ``bench/results/elastic.json`` to docs/benchmarks.md's "Elastic pool" block and
docs/benchmarks-elastic.png.

``render(results_dir)`` is the ``elastic`` renderer of ``bench.docgen`` (``python -m
bench.docgen`` rewrites the block). ``python -m bench.elastic_report [RESULT_JSON]`` draws the
PNG (matplotlib lives in bench/.venv-ray: run there if it does not import here) and prints the
block.
"""

from __future__ import annotations

import json
import os
import pathlib
import subprocess
import sys
from typing import Any

REPO = pathlib.Path(__file__).resolve().parent.parent
RESULT = REPO / "bench" / "results" / "elastic.json"
PNG = REPO / "docs" / "benchmarks-elastic.png"
RAY_PYTHON = REPO / "bench" / ".venv-ray" / "bin" / "python"
RUNS = (
    ("mapped", "mapped fan-out (KPO defaults)"),
    ("mapped_patient", "mapped, startup timeout 24 h"),
    ("pool", "pool"),
)


def render(results_dir: pathlib.Path) -> str:
    """docgen block ``elastic``: the three runs, the reaction times and the bars."""
    path = results_dir / "elastic.json"
    if not path.exists():
        return "No `bench/results/elastic.json` yet: run `make bench-elastic`."
    return markdown(json.loads(path.read_text()))


def markdown(r: dict[str, Any]) -> str:
    trace, setup, d = r["trace"], r["setup"], r["deadline"]
    lines = [
        f"`{r['command']}`, finished {r['finished_at']} ({r['wall_s']:.0f} s), commit {r['git'].get('commit', '?')}. "
        f"{setup['shards']} shards ({_num(r['pool']['work_s'])} worker-seconds of work), at most "
        f"{trace['max_workers']} workers, pods start {trace['pod_start_s']:.0f} s after they are scheduled, "
        f"the pool ticks every {setup['tick_s']:.0f} s; simulated time.",
        "",
        "Pod-seconds count from a pod's binding to a node until it is gone (a pending pod holds no node); "
        "they split into starting (image and model), on tries that committed, on tries cut short "
        "(preempted, or deleted by the pool) or that lost the commit race (a backup), and idle while a "
        "shard was left to claim or with nothing left (`bench/elastic_usage.py`).",
        "",
        "| run | makespan | pod-seconds | starting | committed | cut short / lost race | idle: work left / none "
        "| pod starts | most pods | lost | duplicated |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for key, label in (*RUNS, ("deadline", f"pool, deadline {d['deadline_s']:.0f} s")):
        x = r[key]
        u = x["pod_seconds_by_use"]
        lines.append(
            f"| {label} | {x['makespan_s']:.0f} s | {_num(x['pod_seconds'])} | {_num(u['starting'])} "
            f"| {_num(u['committed'])} | {_num(u['preempted'])} / {_num(u['wasted'])} "
            f"| {_num(u['idle_with_work'])} / {_num(u['idle_no_work'])} | {x['pod_starts']} "
            f"| {x['max_pods']} | {x['lost']} | {x['duplicated']} |"
        )
    p, m, mp = r["pool"], r["mapped"], r["mapped_patient"]
    fl = r["floor"]
    lines += [
        "",
        f"Pool against mapped: makespan {p['makespan_s'] / m['makespan_s']:.2f}x, "
        f"pod-seconds {p['pod_seconds'] / m['pod_seconds']:.2f}x; against mapped with a patient "
        f"startup timeout: {p['makespan_s'] / mp['makespan_s']:.2f}x and "
        f"{p['pod_seconds'] / mp['pod_seconds']:.2f}x. "
        f"The work alone is {_num(fl['work_s'])} pod-seconds, so no launcher can go below "
        f"{fl['mapped']['least_pool_ratio']:.2f}x the mapped run's pod-seconds "
        f"({fl['mapped']['not_work_share']:.0%} of them are not work: it ran few pods, slowly) nor below "
        f"{fl['mapped_patient']['least_pool_ratio']:.2f}x the patient run's "
        f"({fl['mapped_patient']['not_work_share']:.0%} not work). "
        f"Deadline run: {'met' if d['met'] else 'missed'} ({d['makespan_s']:.0f} s of {d['deadline_s']:.0f} s) "
        f"with {d['pod_seconds'] / d['makespan_s']:.1f} pods on average and at most {d['max_pods']} "
        f"(min_workers {d['min_workers']}; "
        f"{d['workers_needed_at_full_speed']} would do at full speed).",
        *_seeds(r.get("seeds") or {}),
        *_drain(r.get("drain")),
        "",
        "| reaction | " + " | ".join(label for _, label in RUNS) + " |",
        "|---|" + "---:|" * len(RUNS),
        "| capacity freed -> a pod working on it (mean) | "
        + " | ".join(_freed(r[k]["capacity_freed_to_working_s"]) for k, _ in RUNS)
        + " |",
    ]
    for kind, label in (("reclaim", "spot reclaim"), ("shrink", "capacity drop")):
        cells = [_replacement(r[k]["preemption_to_replacement"][kind]) for k, _ in RUNS]
        lines.append(f"| {label} -> replacement created / working (max) | " + " | ".join(cells) + " |")
    lines += ["", "Bars: " + "; ".join(f"{name} {'yes' if ok else '**no**'}" for name, ok in r["bars"].items()) + "."]
    return "\n".join(lines)


def _seeds(seeds: dict[str, Any]) -> list[str]:
    """One row per seed (the work drawn and the preemption victims change, the trace does not)."""
    if len(seeds) < 2:
        return []
    lines = [
        "",
        "| seed | pool makespan | pool / mapped pod-s (least) | pool / patient pod-s (least) | deadline run "
        "| lost / duplicated |",
        "|---:|---:|---:|---:|---:|---:|",
    ]
    for seed, x in seeds.items():
        fl, ratio = x["floor"], x["pool_pod_seconds_ratio"]
        lines.append(
            f"| {seed} | {x['makespan_s']['pool']:.0f} s "
            f"| {ratio['mapped']:.2f}x ({fl['mapped']['least_pool_ratio']:.2f}x) "
            f"| {ratio['mapped_patient']:.2f}x ({fl['mapped_patient']['least_pool_ratio']:.2f}x) "
            f"| {x['makespan_s']['deadline']:.0f} s, {'met' if x['deadline_met'] else '**missed**'} "
            f"| {x['lost']} / {x['duplicated']} |"
        )
    return lines


def _drain(drain: dict[str, Any] | None) -> list[str]:
    """The drain's effect (NOTE [drain]): every launcher with and without it, means over seeds."""
    if not drain:
        return []
    seeds, budget = drain["seeds"], drain["budget_s"]
    lines = [
        "",
        f"Preempted workers drain in every run above: {budget['shrink']:.0f} s on a capacity drop, "
        f"{budget['reclaim']:.0f} s on a spot reclaim (NOTE [drain] in `worker/drain.py`). With and without "
        f"it, means over seeds {seeds[0]}-{seeds[-1]}:",
        "",
        "| run | cut short by preemption: off / on | pod-seconds: off / on | makespan: off / on | lost / duplicated |",
        "|---|---:|---:|---:|---:|",
    ]
    for key, label in RUNS:
        off, on = drain["off"][key], drain["on"][key]
        lines.append(
            f"| {label} | {_num(off['cut_short_s'])} / {_num(on['cut_short_s'])} "
            f"({on['cut_short_s'] / off['cut_short_s'] - 1:+.0%}) "
            f"| {_num(off['pod_seconds'])} / {_num(on['pod_seconds'])} "
            f"| {off['makespan_s']:.0f} / {on['makespan_s']:.0f} s "
            f"| {off['lost'] + on['lost']} / {off['duplicated'] + on['duplicated']} |"
        )
    return lines


def _num(x: float) -> str:
    return f"{x:,.0f}"


def _freed(events: list[dict[str, Any]]) -> str:
    delays = [e["delay_s"] for e in events if e["delay_s"] is not None]
    missed = len(events) - len(delays)
    text = f"{sum(delays) / len(delays):.0f} s" if delays else "never"
    return text + (f" ({missed} of {len(events)} never)" if delays and missed else "")


def _replacement(x: dict[str, Any]) -> str:
    if not x["count"]:
        return "-"
    working = f"{x['working_max_s']:.0f} s" if x["working_max_s"] is not None else "never"
    return f"{x['created_max_s']:.0f} s / {working} (n={x['count']})"


def plot(r: dict[str, Any], path: pathlib.Path = PNG) -> None:
    """Pods holding a slot over time against the slots, one panel per run."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    keys = [*(k for k, _ in RUNS), "deadline"]
    fig, axes = plt.subplots(len(keys), 1, figsize=(8, 2.1 * len(keys)), sharex=True)
    for ax, key in zip(axes, keys, strict=True):
        end = r[key]["makespan_s"]
        points = [p for p in r[key]["timeline"] if p[0] <= end]
        points.append([end, *points[-1][1:]])  # hold the last state up to the end
        ts = [p[0] for p in points]
        ax.step(ts, [p[1] for p in points], where="post", color="#999999", label="slots (capacity)")
        ax.step(ts, [p[2] for p in points], where="post", color="#1f77b4", label="pods holding a slot")
        ax.step(ts, [p[3] for p in points], where="post", color="#ff7f0e", alpha=0.6, label="pods pending")
        ax.axvline(end, color="#d62728", linestyle=":", label="done")
        title = dict(RUNS).get(key, f"pool, deadline {r['deadline']['deadline_s']:.0f} s")
        ax.set_title(f"{title}: {r[key]['makespan_s']:.0f} s, {r[key]['pod_seconds']:,.0f} pod-s", fontsize=9)
        ax.set_ylabel("pods")
        ax.grid(True, alpha=0.3)
    axes[0].legend(fontsize=7, loc="upper right")
    axes[-1].set_xlabel("simulated seconds")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def draw_png(source: str) -> str:
    """Draw the PNG here, or with bench/.venv-ray's Python; a line saying what happened."""
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        if not RAY_PYTHON.exists():
            return "matplotlib missing here and no bench/.venv-ray: docs/benchmarks-elastic.png not redrawn"
        subprocess.run([str(RAY_PYTHON), "-m", "bench.elastic_report", "--plot", source], cwd=REPO, check=True)
    else:
        plot(json.loads(pathlib.Path(source).read_text()))
    return f"drew {PNG.relative_to(REPO)}"


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if args[:1] == ["--plot"]:
        plot(json.loads(pathlib.Path(args[1]).read_text()))
        return 0
    source = os.path.abspath(args[0]) if args else str(RESULT)
    print(draw_png(source), file=sys.stderr)
    print(markdown(json.loads(pathlib.Path(source).read_text())))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
