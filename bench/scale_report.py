"""From the scale benchmark's result JSON to docs/scale.md's results section and docs/scale.png.

``python -m bench.scale_report bench/results/scale.json`` rewrites what lies between
``<!-- scale:begin -->`` and ``<!-- scale:end -->`` in docs/scale.md (appended if the markers
are missing): that file's table first, then every other ``bench/results/scale*.json``, the
before/after comparison and what a 1M-shard, 1,000-worker night costs. The PNG needs
matplotlib, which lives in bench/.venv-ray only: it is drawn here if matplotlib imports, else by
that environment's Python if it exists, else left as it is (and the command says so).
"""

from __future__ import annotations

import glob
import json
import os
import subprocess
import sys
from typing import Any

from bench.report import REPO, replace_section, result_argument

DOC = os.path.join(REPO, "docs", "scale.md")
PNG = os.path.join(REPO, "docs", "scale.png")
RAY_PYTHON = os.path.join(REPO, "bench", ".venv-ray", "bin", "python")
BEGIN, END = "<!-- scale:begin -->", "<!-- scale:end -->"
KINDS = ("create", "read", "put", "list", "delete")
# The old protocol (ADR 0002 before issue 13): every worker walks every shard, so a shard costs
# its own 3 requests plus a failed create and a commit read from each other worker.
# Measured with real worker processes on the old protocol (issue 13; 16 is the chaos soak, 2,000 shards).
MEASURED_BEFORE = {4: 10.8, 16: 35.5, 24: 48.8}
NIGHT_SHARDS, NIGHT_WORKERS = 1_000_000, 1000
S3_PUT_PER_S, S3_GET_PER_S = 3500, 5500


def before(workers: int) -> int:
    """Requests per shard of the old protocol: 3 + 2(W - 1)."""
    return 3 + 2 * (workers - 1)


def _hms(seconds: float) -> str:
    if seconds >= 86400:
        return f"{seconds / 86400:.1f} d"
    if seconds >= 3600:
        return f"{seconds / 3600:.1f} h"
    return f"{seconds / 60:.1f} min" if seconds >= 60 else f"{seconds:.0f} s"


def text_table(report: dict[str, Any]) -> str:
    lines = [
        f"{'W':>5} {'S':>7} {'ledger/shard':>12} {'beats/shard':>11} {'PUT/s/prefix':>12} {'GET/s/prefix':>12} "
        f"{'$/M shards':>10} {'makespan':>9} {'/ideal':>7} {'real s':>7}"
    ]
    lines += [
        f"{r['workers']:>5} {r['shards']:>7} {r['ledger_requests_per_shard']:>12.2f} "
        f"{r['heartbeats_per_shard']:>11.2f} "
        f"{r['peak_put_per_s_per_prefix']:>12} {r['peak_get_per_s_per_prefix']:>12} "
        f"{r['usd_per_million_shards']:>10.2f} {_hms(r['makespan_s']):>9} {r['makespan_over_ideal']:>7.3f} "
        f"{r['real_s']:>7.0f}"
        for r in report["runs"]
    ]
    return "\n".join(lines)


def table(report: dict[str, Any]) -> list[str]:
    out = [
        "| W | shards | ledger requests / shard | create | read | put | list | delete | heartbeats / shard "
        "| data PUTs / shard | peak PUT/s per prefix (of 3,500) | peak GET/s per prefix (of 5,500) | $ per M shards "
        "| makespan (virtual) | ideal | makespan / ideal | real time |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in report["runs"]:
        k = r["ledger_requests_per_shard_by_kind"]
        out.append(
            f"| {r['workers']:,} | {r['shards']:,} | **{r['ledger_requests_per_shard']:.2f}** "
            + " ".join(f"| {k.get(kind, 0):.2f}" for kind in KINDS)
            + f" | {r['heartbeats_per_shard']:.2f} | {r['data_puts_per_shard']:.2f} "
            f"| {r['peak_put_per_s_per_prefix']:,} (`{r['peak_put_prefix']}` at {r['peak_put_at_s']} s) "
            f"| {r['peak_get_per_s_per_prefix']:,} (`{r['peak_get_prefix']}` at {r['peak_get_at_s']} s) "
            f"| {r['usd_per_million_shards']:.2f} | {_hms(r['makespan_s'])} | {_hms(r['ideal_s'])} "
            f"| **{r['makespan_over_ideal']:.3f}** | {r['real_s']:.0f} s |"
        )
    return out


def _detail(report: dict[str, Any]) -> list[str]:
    """Where the requests go and what the tries and the claimers did, per run."""
    out = [
        "| W | requests / shard by kind and folder (those of at least 0.005) | claimers' steals / collisions / "
        "shards skipped, per shard | tries (leases) | commits refused | fenced | wasted work "
        "| shards not committed exactly once | $ ledger / heartbeats / output per M shards |",
        "|---:|---|---|---:|---:|---:|---:|---:|---|",
    ]
    for r in report["runs"]:
        folders = ", ".join(f"{name} {v:.3g}" for name, v in r["requests_by_folder_per_shard"].items() if v >= 0.005)
        c, n = r.get("claimer_stats", {}), r["shards"]
        claimers = " / ".join(f"{c.get(k, 0) / n:.2f}" for k in ("steals", "collisions", "skipped"))
        usd = r["usd_per_million_shards_by_part"]
        out.append(
            f"| {r['workers']:,} | {folders} | {claimers} | {r['leases']:,} | {r['commits_refused']} | {r['fenced']} "
            f"| {_hms(r['wasted_work_s'])} | {r['shards_not_committed_once']} "
            f"| {usd['ledger']:.2f} / {usd['heartbeats']:.2f} / {usd['data_puts']:.2f} |"
        )
    return out


def _comparison(reports: list[dict[str, Any]]) -> list[str]:
    after: dict[int, list[str]] = {}
    for report in reports:
        for r in report["runs"]:
            after.setdefault(r["workers"], []).append(f"{r['ledger_requests_per_shard']:.2f} ({r['shards']:,} shards)")
    ws = sorted({*after, *MEASURED_BEFORE})
    out = [
        "| W | before: 3 + 2(W-1) | before: measured (real processes) | after: this benchmark (simulated) |",
        "|---:|---:|---:|---:|",
    ]
    out += [f"| {w:,} | {before(w):,} | {MEASURED_BEFORE.get(w, '')} | {', '.join(after.get(w, []))} |" for w in ws]
    return out


def _at(reports: list[dict[str, Any]], workers: int) -> list[dict[str, Any]]:
    """The runs with ``workers`` workers, one per shard count, fewest shards first."""
    runs = {r["shards"]: r for report in reports for r in report["runs"] if r["workers"] == workers}
    return [runs[s] for s in sorted(runs)]


def _scaled(runs: list[dict[str, Any]], total: Any, shards: int) -> float:
    """``total(run)`` at ``shards`` shards: linear through the two largest runs (a cost per shard
    plus a fixed part, e.g. the end of the job, which grows with W but not with S), or, with one
    run, proportional to its shard count (an upper bound when the fixed part dominates)."""
    if len(runs) == 1:
        return float(total(runs[0])) * shards / runs[0]["shards"]
    small, big = runs[-2], runs[-1]
    per_shard = (total(big) - total(small)) / (big["shards"] - small["shards"])
    return float(total(big) + per_shard * (shards - big["shards"]))


def night(reports: list[dict[str, Any]]) -> dict[str, Any] | None:
    """A 1M-shard, 1,000-worker job from the runs with W = 1,000: requests and dollars fitted as
    a cost per shard plus a fixed part when two shard counts were run (else scaled per shard);
    the makespan as the ideal (mean drawn work x 1M / 1,000) plus the largest run's measured
    excess over its ideal (the tail: the last stragglers, the end of the job)."""
    runs = _at(reports, NIGHT_WORKERS)
    if not runs:
        return None
    big = runs[-1]
    ideal = big["total_work_s"] / big["shards"] * NIGHT_SHARDS / NIGHT_WORKERS

    def requests(kind: str) -> float:
        key = {"ledger": "ledger_requests_per_shard", "beats": "heartbeats_per_shard", "data": "data_puts_per_shard"}
        return _scaled(runs, lambda r: r[key[kind]] * r["shards"], NIGHT_SHARDS)

    def usd(part: str | None) -> float:
        if part is None:
            return _scaled(runs, lambda r: r["usd_per_million_shards"] * r["shards"] / 1e6, NIGHT_SHARDS)
        return _scaled(runs, lambda r: r["usd_per_million_shards_by_part"][part] * r["shards"] / 1e6, NIGHT_SHARDS)

    return {
        "from": [r["shards"] for r in runs[-2:]],
        "ledger_requests": requests("ledger"),
        "heartbeats": requests("beats"),
        "data_puts": requests("data"),
        "usd": usd(None),
        "usd_parts": {part: usd(part) for part in ("ledger", "heartbeats", "data_puts")},
        "ideal_s": ideal,
        "makespan_s": ideal + (big["makespan_s"] - big["ideal_s"]),
        "peak_put": max(r["peak_put_per_s_per_prefix"] for r in runs),
        "peak_get": max(r["peak_get_per_s_per_prefix"] for r in runs),
    }


def _night_lines(reports: list[dict[str, Any]]) -> list[str]:
    n = night(reports)
    if n is None:
        return [f"(No result file has a run with W = {NIGHT_WORKERS:,}.)"]
    parts = n["usd_parts"]
    fit = (
        f"fitted through the W = {NIGHT_WORKERS:,} runs over {n['from'][0]:,} and {n['from'][1]:,} shards as a "
        "cost per shard plus a fixed part (what the end of the job costs, which grows with W, not with the "
        "shard count)"
        if len(n["from"]) == 2
        else f"scaled per shard from the W = {NIGHT_WORKERS:,} run over {n['from'][0]:,} shards (an upper bound: "
        "what the end of the job costs does not grow with the shard count)"
    )
    put_share, get_share = n["peak_put"] / S3_PUT_PER_S, n["peak_get"] / S3_GET_PER_S
    return [
        f"Requests and dollars {fit}; the time is the ideal plus the largest run's measured excess over its ideal.",
        "",
        f"- **Requests**: {n['ledger_requests'] / 1e6:.2f} M ledger requests, {n['heartbeats'] / 1e6:.2f} M "
        f"heartbeat PUTs, {n['data_puts'] / 1e6:.2f} M output PUTs.",
        f"- **Store bill**: **${n['usd']:.2f}** (ledger ${parts['ledger']:.2f}, heartbeats "
        f"${parts['heartbeats']:.2f}, output PUTs ${parts['data_puts']:.2f}; S3 Standard request prices; storage "
        "and transfer not included).",
        f"- **Time**: **{_hms(n['makespan_s'])}**: the ideal {_hms(n['ideal_s'])} (the drawn work over 1,000 "
        f"workers) plus {_hms(n['makespan_s'] - n['ideal_s'])} of tail.",
        f"- **Rates**: at most {n['peak_put']:,} PUT/s ({put_share:.0%} of S3's 3,500) and {n['peak_get']:,} GET/s "
        f"({get_share:.0%} of 5,500) in any one prefix; per-prefix rates grow with W, not with the shard count.",
    ]


def _config(report: dict[str, Any]) -> str:
    c = report["config"]
    w, lat = c["work"], c["latency"]
    return (
        f"Work per shard: base {w['base_s']:g} s times a lognormal factor (sigma {w['jitter_sigma']:g}), "
        f"{w['straggler_share']:.0%} of shards {w['straggler_factor']:g}x (mean {c['mean_work_s']:.1f} s); "
        f"seed {c['seed']}. Lease TTL {c['lease_ttl_s']:g} s (heartbeat every {c['lease_ttl_s'] / 4:g} s), "
        f"poll interval {c['poll_interval_s']:g} s, a heartbeat after each commit: "
        f"{'yes' if c['post_commit_beat'] else 'no'}. Store latency medians: PUT {lat['put_s'] * 1000:g} ms, "
        f"GET {lat['get_s'] * 1000:g} ms, LIST page {lat['list_page_s'] * 1000:g} ms, DELETE "
        f"{lat['delete_s'] * 1000:g} ms (lognormal sigma {lat['sigma']:g})."
    )


def _load(report: dict[str, Any], key: str) -> str:
    return " / ".join(f"{x:.1f}" for x in report.get(key, [])) or "?"


def _others(source: str) -> list[tuple[str, dict[str, Any]]]:
    out = []
    for path in sorted(glob.glob(os.path.join(REPO, "bench", "results", "scale*.json"))):
        rel = os.path.relpath(path, REPO)
        if rel != source:
            with open(path) as handle:
                out.append((rel, json.load(handle)))
    return out


def _file_section(report: dict[str, Any], source: str) -> list[str]:
    git = report["git"]
    changed = " with local changes to airflow_antbatch/" if git.get("airflow_antbatch_modified") else ""
    off = sum(r["off_clock_requests"] for r in report["runs"])
    return [
        f"### `{source}`",
        "",
        f"`{report['command']}`, finished {report['finished_at']} in {report['wall_s']:.0f} s real, antbatch at "
        f"commit `{git['commit']}`{changed}, on {report.get('cpu_count', '?')} CPUs shared with other work (load "
        f"average {_load(report, 'load_avg_before')} before, {_load(report, 'load_avg_after')} after: real times "
        f"are noisy, virtual times and counts are not). {_config(report)}"
        + (f" {off} requests came from threads off the virtual clock (no latency charged)." if off else ""),
        "",
        *table(report),
        "",
        *_detail(report),
        "",
    ]


def markdown(report: dict[str, Any], source: str, png_note: str) -> str:
    others = _others(source)
    reports = [report, *(r for _, r in others)]
    parts = [
        BEGIN,
        "",
        f"Generated by `python -m bench.scale_report {source}` from the result files in `bench/results/`, never by "
        "hand.",
        "",
        "### Requests per shard against W, before and after",
        "",
        *_comparison(reports),
        "",
        png_note,
        "",
        "### What a 1M-shard, 1,000-worker night costs and takes",
        "",
        *_night_lines(reports),
        "",
        *_file_section(report, source),
    ]
    for rel, other in others:
        parts += _file_section(other, rel)
    parts.append(END)
    return "\n".join(parts)


def plot(reports: list[dict[str, Any]], path: str = PNG) -> None:
    """Ledger requests per shard against W (log-log): the old protocol's formula and measured
    points, and every run of this benchmark."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7.5, 4.6))
    ws = [1, 2, 4, 10, 16, 24, 100, 1000]
    ax.plot(ws, [before(w) for w in ws], "--", color="#999999", label="before: 3 + 2(W-1) (old ADR 0002)")
    ax.plot(
        list(MEASURED_BEFORE),
        list(MEASURED_BEFORE.values()),
        "s",
        color="#d62728",
        label="before: measured, real worker processes",
    )
    for index, (report, marker) in enumerate(zip(reports, "ovD^", strict=False)):
        runs = sorted(report["runs"], key=lambda r: r["workers"])
        profile = "quick" if "--quick" in report["command"] else "full"
        label = f"after: {runs[0]['shards']:,} shards, simulated ({profile})"
        ax.plot([r["workers"] for r in runs], [r["ledger_requests_per_shard"] for r in runs], f"-{marker}", label=label)
        for r in runs:
            ax.annotate(
                f"{r['ledger_requests_per_shard']:.2f}",
                (r["workers"], r["ledger_requests_per_shard"]),
                textcoords="offset points",
                xytext=(4, 6 if index % 2 == 0 else -12),
                fontsize=7,
            )
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("workers W")
    ax.set_ylabel("ledger requests per shard (heartbeats apart)")
    ax.set_title("Store requests per shard against the number of workers")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def draw_png(sources: list[str]) -> str:
    """Draw the PNG here, or in bench/.venv-ray; the sentence the doc shows for it."""
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        if not os.path.exists(RAY_PYTHON):
            print("matplotlib missing here and no bench/.venv-ray: docs/scale.png not redrawn", file=sys.stderr)
        else:
            subprocess.run([RAY_PYTHON, "-m", "bench.scale_report", "--plot", *sources], cwd=REPO, check=True)
    else:
        reports = []
        for source in sources:
            with open(os.path.join(REPO, source)) as handle:
                reports.append(json.load(handle))
        plot(reports)
    if os.path.exists(PNG):
        return "![ledger requests per shard against W, before and after (log-log)](scale.png)"
    return (
        "(No plot: docs/scale.png is drawn with matplotlib from bench/.venv-ray, which did not exist here; "
        "`make bench-venv`, then rerun this command.)"
    )


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if args[:1] == ["--plot"]:
        reports = []
        for source in args[1:]:
            with open(os.path.join(REPO, source)) as handle:
                reports.append(json.load(handle))
        plot(reports)
        return 0
    source, report = result_argument(args, "bench.scale_report")
    png_note = draw_png([source, *(rel for rel, _ in _others(source))])
    replace_section(DOC, BEGIN, END, markdown(report, source, png_note), append=True)
    print(text_table(report))
    print(f"rewrote {os.path.relpath(DOC, REPO)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
