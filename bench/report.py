"""From the throughput result files to the printed table, docs/benchmarks.md's blocks and the PNG.

The ``render_*`` functions are bench/docgen.py's renderers: each reads ``bench/results`` (quick.json
in full, the other files of this harness summarised) and returns one generated block of
docs/benchmarks.md. ``python -m bench.report bench/results/quick.json`` prints the table and
draws docs/benchmarks.png; it needs matplotlib (which lives in bench/.venv-ray, never in the
product's dependencies).
"""

from __future__ import annotations

import json
import os
import pathlib
import sys
from typing import Any

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DOC = os.path.join(REPO, "docs", "benchmarks.md")
PNG = os.path.join(REPO, "docs", "benchmarks.png")
PRIMARY = "quick.json"  # the profile the doc quotes in full; the others are summarised beside it
SYSTEMS = ("naive", "antbatch", "ray", "bound")
LABELS = {"naive": "naive loop", "antbatch": "antbatch", "ray": "Ray Data", "bound": "bound (model only)"}
CPU_WORKLOADS = ("single", "chain")
DEVICE_WORKLOADS = ("device_single", "device_chain")
WORKLOADS = CPU_WORKLOADS + DEVICE_WORKLOADS


PIPELINE_STAGES = ("read", "preprocess", "postprocess", "write")


def _fmt(value: Any, spec: str = ".0f", suffix: str = "") -> str:
    if value is None:
        return "n/a"
    return f"{value:{spec}}{suffix}"


def _rate(r: dict[str, Any], key: str) -> float | None:
    """A workload's rows/s for ``key`` (naive, antbatch, ray, ray_steady, bound, ceiling)."""
    if key == "ray_steady":
        return r.get("ray_rows_s_after_actor_ready")
    if key == "ceiling":  # files written before ceiling_rows_s was recorded hold it in the ceiling's details
        return r.get("ceiling_rows_s") or (r.get("ceiling") or {}).get("rows_s")
    return r.get(f"{key}_rows_s")


def _ratio(r: dict[str, Any], key: str) -> float | None:
    """antbatch's rate over ``key``'s (see ``_rate``)."""
    ours, other = r.get("antbatch_rows_s"), _rate(r, key)
    return ours / other if ours and other else None


def _workloads(report: dict[str, Any]) -> list[str]:
    return [w for w in WORKLOADS if w in report]


def text_table(report: dict[str, Any]) -> str:
    """The headline table for the terminal."""
    lines = [
        f"{'workload':14s} {'naive':>8s} {'antbatch':>8s} {'ray':>8s} {'ceiling':>8s} "
        f"{'ant/naive':>9s} {'ant/ray':>8s} {'ant/ray-steady':>14s} {'ant/ceiling':>11s}   (rows/s, medians)"
    ]
    for w in _workloads(report):
        r = report[w]
        lines.append(
            f"{w:14s} "
            + " ".join(f"{_fmt(_rate(r, s)):>8s}" for s in ("naive", "antbatch", "ray", "ceiling"))
            + " "
            + " ".join(
                f"{_fmt(_ratio(r, k), '.2f', 'x'):>{width}s}"
                for k, width in (("naive", 9), ("ray", 8), ("ray_steady", 14), ("ceiling", 11))
            )
        )
    if "straggler" in report:
        s = report["straggler"]
        lines.append(
            f"straggler: dynamic {s['dynamic_over_ideal']:.2f}x ideal, static {s['static_over_ideal']:.2f}x ideal "
            f"(ideal {s['ideal_s']:.2f}s)"
        )
    if report.get("peak_rss_mb") is not None:
        lines.append(f"antbatch peak RSS (process tree): {report['peak_rss_mb']:.0f} MB")
    return "\n".join(lines)


def _headline(report: dict[str, Any], workloads: tuple[str, ...] = CPU_WORKLOADS) -> list[str]:
    """Each system at its best (the variant that won in brackets), the ceiling, and antbatch's ratios."""
    device = workloads == DEVICE_WORKLOADS
    if not any(w in report for w in workloads):
        return []
    rows = [
        "| workload | naive loop (best) | antbatch (best) | Ray Data (best) | Ray Data, steady state | "
        + ("" if device else "bound | ")
        + "ceiling | antbatch / naive | antbatch / Ray | antbatch / Ray steady | antbatch / ceiling |",
        "|---|---:|---:|---:|---:|" + ("" if device else "---:|") + "---:|---:|---:|---:|---:|",
    ]
    for w in (w for w in workloads if w in report):
        r = report[w]
        bound = "" if device else f"{_fmt(r.get('bound_rows_s'))} | "
        antbatch = r.get("antbatch_best_variant", "antbatch")
        rows.append(
            f"| {w} | {_fmt(r['naive_rows_s'])} ({r['naive_best_variant']}) | {_fmt(r['antbatch_rows_s'])} "
            f"({antbatch}) | {_fmt(r['ray_rows_s'])} ({r['ray_best_variant'] or '-'}) "
            f"| {_fmt(_rate(r, 'ray_steady'))} | {bound}{_fmt(_rate(r, 'ceiling'))} | "
            + " | ".join(_fmt(_ratio(r, k), ".2f", "x") for k in ("naive", "ray", "ray_steady", "ceiling"))
            + " |"
        )
    return rows


def _per_system(report: dict[str, Any]) -> list[str]:
    rows = [
        "| workload | system | rows/s | CPU use (of all cores) | peak RSS, process tree | startup (excluded) | "
        "threads |",
        "|---|---|---:|---:|---:|---:|---|",
    ]
    for w in _workloads(report):
        r = report[w]
        for s in SYSTEMS:
            if s not in r["cpu_util"]:
                continue
            rows.append(
                f"| {w} | {LABELS[s]} | {_fmt(r[f'{s}_rows_s'])} | {r['cpu_util'][s]:.0%} | "
                f"{r['peak_rss_mb'][s]:.0f} MB | {r['startup_s'][s]:.1f} s | {_threads(s, r['threads'][s])} |"
            )
    return rows


def _threads(system: str, threads: dict[str, Any] | None) -> str:
    if not threads:
        return "-"
    if system == "antbatch":
        moves = [f"{d['processes_to']}p/{d['torch_threads']}t" for d in threads.get("scaling", [])]
        processes = threads.get("preprocess_processes_at_end")
        text = f"cpu_budget {threads.get('cpu_budget')}, preprocess processes at end {processes}"
        return text + (f", scaling: {' -> '.join(moves)}" if moves else "")
    if system == "ray":
        return (
            f"ray.init(num_cpus={threads['ray_num_cpus']}), model actor {threads['actor_cpus']} CPU with "
            f"{threads['torch_in_actor']} torch thread(s), preprocess tasks {threads['pre_cpus']} CPU, "
            f"chain {threads['chain_mode']}"
        )
    return f"torch {threads.get('torch')} thread(s), OMP_WAIT_POLICY={threads.get('omp_wait_policy') or 'unset'}"


def _variants(report: dict[str, Any]) -> list[str]:
    rows = ["| workload | variant | rows/s (median) | runs | CPU use | peak RSS |", "|---|---|---:|---|---:|---:|"]
    for w in _workloads(report):
        for name, v in report[w]["variants"].items():
            runs = ", ".join(f"{x:.0f}" for x in v["rows_s_runs"])
            extra = ""
            if "rows_s_by_threads" in v:
                extra = " (by threads: " + ", ".join(f"{k}: {x:.0f}" for k, x in v["rows_s_by_threads"].items()) + ")"
            rows.append(
                f"| {w} | {name} | {v['rows_s']:.0f}{extra} | {runs} | {v['cpu_util']:.0%} | "
                f"{v['peak_rss_mb']:.0f} MB |"
            )
    return rows


def _stages(report: dict[str, Any]) -> list[str]:
    out: list[str] = []
    for w in _workloads(report):
        r = report[w]
        naive = r.get("naive_stages_s_per_batch") or {}
        if naive:
            parts = ", ".join(f"{k} {v * 1000:.0f} ms" for k, v in naive.items())
            out.append(
                f"- *{w}*, naive loop ({r['naive_best_variant']}), per batch of "
                f"{report['config']['batch_size']}: {parts}."
            )
        stages = r["variants"].get(r.get("antbatch_best_variant", "antbatch"), {}).get("stages") or {}
        if stages:
            parts = ", ".join(
                f"{k} busy {v.get('busy_s', 0):.1f} s / waiting for input {v.get('wait_in_s', 0):.1f} s"
                for k, v in stages.items()
            )
            out.append(f"- *{w}*, antbatch worker stages (last run): {parts}.")
        ant = r["variants"].get(r.get("antbatch_best_variant", "antbatch"), {})
        if stages and ant.get("worker_reported_s"):
            busiest = max(stages, key=lambda k: stages[k].get("busy_s", 0))
            out.append(
                f"- *{w}*, antbatch's busiest stage (last run): {busiest}, busy "
                f"{stages[busiest]['busy_s']:.1f} s of the worker's {ant['worker_reported_s']:.1f} s."
            )
        share = _model_share(w, r, report["config"]["batch_size"])
        if share:
            out.append(share)
        if "code_load_and_pool_start_s" in ant:
            out.append(
                f"- *{w}*, antbatch before its first shard (last run): planning {ant['plan_s']:.2f} s, loading the "
                f"code and starting the preprocess processes {ant['code_load_and_pool_start_s']:.2f} s (of which "
                f"building the models, excluded, {ant['model_load_s']:.2f} s). Leaving the preprocess processes' "
                f"start out as well, as the worker's own summary does: "
                f"{r.get('antbatch_rows_s_excluding_pool_start') or 0:.0f} rows/s."
            )
        ray = r.get("ray_best_variant")
        if r.get("ray_rows_s_after_actor_ready"):
            out.append(
                f"- *{w}*, Ray Data counted only from its model actor's first batch (optimistic: the reads and "
                f"preprocessing done before then are not charged): {r['ray_rows_s_after_actor_ready']:.0f} rows/s."
            )
        actors = (r["variants"].get(ray, {}).get("actors") or []) if ray else []
        out.extend(
            f"- *{w}*, Ray Data ({ray}) model actor `{a['actor']}` (last run): created {a['start_after_s']:.1f} s "
            f"into the job, {a['init_s']:.1f} s to import torch and build the model, first batch "
            f"{a['first_batch_after_s']:.1f} s into the job, busy {a['busy_s']:.1f} s over {a['batches']} batches."
            for a in actors
        )
    return out


def _model_share(w: str, r: dict[str, Any], batch_size: int) -> str | None:
    """How near the worker's model stages came to the model alone on one core: the rate a 2-core
    machine gives the model while preprocessing holds the other core."""
    ant = r["variants"].get(r.get("antbatch_best_variant", "antbatch"), {})
    stages = ant.get("stages") or {}
    one_thread = (r.get("ceiling") or {}).get("core_s_per_batch", {}).get("model_1_thread")
    if not (stages and ant.get("worker_reported_s") and ant.get("rows") and one_thread):
        return None
    models = [k for k in stages if k not in PIPELINE_STAGES]
    busy = sum(stages[k].get("busy_s", 0) for k in models)
    batches = ant["rows"] / batch_size
    worker_s = ant["worker_reported_s"]
    one_thread_rows_s = batch_size / one_thread
    return (
        f"- *{w}*, antbatch's model stage(s) (last run): busy {busy:.1f} s of the worker's {worker_s:.1f} s "
        f"({busy / worker_s:.0%}), {busy / batches * 1000:.0f} ms per batch against {one_thread * 1000:.0f} ms "
        f"for the model(s) alone on one thread; the worker scored {ant['rows'] / worker_s:.0f} rows/s, "
        f"{ant['rows'] / worker_s / one_thread_rows_s:.2f}x the one-thread model rate ({one_thread_rows_s:.0f} rows/s)."
    )


def _ceilings(report: dict[str, Any]) -> list[str]:
    out = []
    cores = report["machine"]["cpu_count"]
    for w in _workloads(report):
        c = report[w].get("ceiling")
        if not c:
            continue
        if "s_per_batch" in c:  # simulated devices
            per = c["s_per_batch"]
            out.append(
                f"- *{w}*: a batch holds each simulated device {per['one_device'] * 1000:.0f} ms (off the CPU) and "
                f"costs {per['read_preprocess_post_write'] * 1000:.0f} core-ms of read + preprocess + postprocess + "
                f"write; with the busier of one device and {cores} cores never idle that is {c['rows_s']:.0f} rows/s, "
                f"{c['over_naive']:.2f}x the naive loop."
            )
            continue
        core = c["core_s_per_batch"]
        out.append(
            f"- *{w}*: a batch costs {core['model_1_thread'] * 1000:.0f} core-ms of model (1 thread, the most "
            f"efficient setting per core) and {core['read_preprocess_post_write'] * 1000:.0f} core-ms of "
            f"read + preprocess + postprocess + write; with every one of {cores} cores "
            f"busy on nothing else that is {c['rows_s']:.0f} rows/s, {c['over_naive']:.2f}x the best naive loop"
            + (f" and {c['over_bound']:.2f}x the bound." if "over_bound" in c else ".")
        )
    return out


def _agreement(report: dict[str, Any]) -> list[str]:
    out = []
    for w in _workloads(report):
        checked = report[w].get("outputs")
        if not checked:
            continue
        systems = {k: v for k, v in checked.items() if isinstance(v, dict)}
        verdict = "agree" if checked["all_agree"] else "DISAGREE"
        worst = max(v["max_top_score_diff"] for v in systems.values())
        out.append(
            f"- *{w}*: {', '.join(systems)} {verdict}: every input row written once, the same top class for "
            f"every id as the naive loop, top scores within {worst:.1e}."
            if checked["all_agree"]
            else f"- *{w}*: the outputs {verdict}: {systems}"
        )
    return out


def _straggler(report: dict[str, Any]) -> list[str]:
    if "straggler" not in report:
        return []
    s = report["straggler"]
    setup = s["setup"]
    return [
        f"{setup['workers']} workers, {setup['shards']} shards of {setup['rows_per_shard']} rows, a sleep model of "
        f"{setup['sleep_per_row_s'] * 1000:.0f} ms per row, worker {setup['throttled_worker']} throttled "
        f"{setup['slowdown']:.0f}x (medians of {len(s['runs'])} run(s)):",
        "",
        "| dispatch | makespan | over ideal |",
        "|---|---:|---:|",
        f"| dynamic (one plan, the ledger) | {s['dynamic_makespan_s']:.2f} s | {s['dynamic_over_ideal']:.2f}x |",
        f"| static (a fixed 1/{setup['workers']} of the shards each) | {s['static_makespan_s']:.2f} s | "
        f"{s['static_over_ideal']:.2f}x |",
        f"| ideal (total rows / sum of measured worker speeds) | {s['ideal_s']:.2f} s | 1.00x |",
        "",
        f"Nominal ideal from the sleep figures alone: {s['nominal_ideal_s']:.2f} s. Shards committed per worker "
        f"under dynamic dispatch: {s['dynamic_shards_by_worker']}; worker speeds in the static run (rows/s): "
        f"{s['static_rows_s_by_worker']}.",
    ]


def markdown(report: dict[str, Any], source: str, others: list[tuple[str, dict[str, Any]]]) -> str:
    """The results block: ``report`` (read from ``source``) in full, then ``others`` summarised."""
    m = report["machine"]
    lat = report["latency"]
    git = report.get("git", {})
    lines = [
        f"Generated by `python -m bench.docgen` from `{source}`, a run of `{report['command']}` finished "
        f"{report.get('finished_at', '?')} in {report['wall_s']:.0f} s; profile `{report['profile']}`, "
        f"{report['config']['repeats']} interleaved repeat(s), medians. Machine: {m['cpu_count']} CPUs, "
        f"{m['memory_gb']} GB, {m['platform']}, Python {m['python']}. Load average before/after: "
        f"{report['load_avg_before']} / {report['load_avg_after']}. antbatch at commit `{git.get('commit', '?')}`"
        f"{' with local changes to airflow_antbatch/' if git.get('airflow_antbatch_modified') else ''}"
        + (f"; last worker change: `{git['worker_commit']}`." if git.get("worker_commit") else "."),
        f"Input through `latency://`: {lat['first_byte_s'] * 1000:.0f} ms to first byte per request, "
        f"{lat['bandwidth_mbs']:.0f} MB/s per request stream, {lat['block_mb']:.0f} MiB blocks; "
        f"output: {lat['output']}.",
        "",
        "![rows/s per system and workload, straggler ratios](benchmarks.png)",
        "",
        *_headline(report),
        "",
        *_devices(report),
        f"Peak RSS of the antbatch worker's process tree (`peak_rss_mb`): {_fmt(report.get('peak_rss_mb'))} MB.",
        "",
        "### Per system",
        "",
        *_per_system(report),
        "",
        "### Where the time goes",
        "",
        *_stages(report),
        "",
        "### Do the systems agree?",
        "",
        "The last repeat's output of every system, joined on `id` (`bench/verify.py`):",
        "",
        *_agreement(report),
        "",
        "### The ceiling on this machine",
        "",
        *_ceilings(report),
        "",
        "### Stragglers",
        "",
        *_straggler(report),
        "",
        "### Every variant",
        "",
        *_variants(report),
        "",
        *_other_results(others),
    ]
    return "\n".join(lines)


def _devices(report: dict[str, Any]) -> list[str]:
    """The simulated-device workloads' headline, labelled as the simulation it is."""
    if not any(w in report for w in DEVICE_WORKLOADS):
        return []
    per_row = report.get("device_s_per_row") or 0
    return [
        "**Simulated devices (a simulation, not hardware).** Each model holds its own simulated device "
        f"for {per_row * 1000:.3f} ms per row (`time.sleep` under a lock per device: no CPU used, the GIL "
        "released), the tokenizer's time per row as the harness measured it before the runs, so "
        "preprocessing a batch and each device's work on it cost about the same:",
        "",
        *_headline(report, DEVICE_WORKLOADS),
        "",
    ]


def _other_results(others: list[tuple[str, dict[str, Any]]]) -> list[str]:
    """Headline tables of the other result files in bench/results (e.g. full beside quick)."""
    out: list[str] = []
    for name, other in others:
        out += [
            f"### Also: `bench/results/{name}` (profile `{other['profile']}`)",
            "",
            f"Run of `{other['command']}` finished {other.get('finished_at', '?')} at commit "
            f"`{other.get('git', {}).get('commit', '?')}`, {other['config']['repeats']} repeat(s), "
            f"{other['config']['single']['rows']} rows single, {other['config']['chain']['rows']} chain; load average "
            f"before/after {other['load_avg_before']} / {other['load_avg_after']}.",
            "",
            *_headline(other),
            "",
            *_devices(other),
        ]
        for w in _workloads(other):
            c, r = other[w].get("ceiling"), other[w]
            if c:
                out.append(
                    f"- *{w}*: ceiling {c['rows_s']:.0f} rows/s ({c['over_naive']:.2f}x the naive loop); antbatch "
                    f"without its preprocess processes' start {r.get('antbatch_rows_s_excluding_pool_start') or 0:.0f} "
                    f"rows/s; Ray from its actor's first batch {r.get('ray_rows_s_after_actor_ready') or 0:.0f} rows/s."
                )
            share = _model_share(w, r, other["config"]["batch_size"])
            if share:
                out.append(share)
        if "straggler" in other:
            s = other["straggler"]
            out += [
                f"- Stragglers: dynamic {s['dynamic_over_ideal']:.2f}x ideal, "
                f"static {s['static_over_ideal']:.2f}x ideal.",
            ]
        out.append("")
    return out


def replace_section(path: str, begin: str, end: str, section: str, *, append: bool = False) -> None:
    """Replace the doc's text from ``begin`` to ``end`` (``section`` holds both markers); with
    ``append``, a doc without the markers gets the section at its end."""
    with open(path) as handle:
        text = handle.read()
    if begin in text and end in text:
        head, rest = text.split(begin, 1)
        _, tail = rest.split(end, 1)
        text = head + section + tail
    elif append:
        text = text.rstrip("\n") + "\n\n" + section + "\n"
    else:
        raise SystemExit(f"{path} lacks the {begin} / {end} markers")
    with open(path, "w") as handle:
        handle.write(text)


def harness_reports(results_dir: pathlib.Path) -> list[tuple[str, dict[str, Any]]]:
    """(file name, report) for this harness's result files in ``results_dir``, the primary first."""
    found = []
    for path in sorted(results_dir.glob("*.json"), key=lambda p: (p.name != PRIMARY, p.name)):
        report = json.loads(path.read_text())
        # Only this harness's results: smallfiles*.json, resume*.json, ... have reports of their own.
        if "config" in report and any(w in report for w in WORKLOADS):
            found.append((path.name, report))
    return found


def render_results(results_dir: pathlib.Path) -> str:
    """docgen block ``results``: the primary result file in full, the others' headlines."""
    reports = harness_reports(results_dir)
    if not reports:
        return f"No result file of `python -m bench.run` in `{_rel(results_dir)}` yet."
    (name, report), others = reports[0], reports[1:]
    return markdown(report, f"{_rel(results_dir)}/{name}", others)


# Issue 16's bars on the throughput bench: (workload, antbatch over which rate (see _rate), at least, label).
BARS = (
    ("single", "ceiling", 0.85, "the ceiling"),
    ("single", "ray", 1.2, "Ray Data, end to end"),
    ("single", "ray_steady", 1.1, "Ray Data's steady-state rate"),
    ("chain", "ceiling", 0.85, "the ceiling"),
    ("chain", "ray", 1.2, "Ray Data, end to end"),
    ("chain", "ray_steady", 1.1, "Ray Data's steady-state rate"),
    ("device_single", "naive", 1.8, "the naive loop"),
    ("device_single", "ray", 1.2, "Ray Data, end to end"),
    ("device_chain", "naive", 3.0, "the naive loop"),
    ("device_chain", "ray", 1.2, "Ray Data, end to end"),
)


def render_standing(results_dir: pathlib.Path) -> str:
    """docgen block ``standing``: every bar against every result file of this harness."""
    reports = harness_reports(results_dir)
    if not reports:
        return "No result file of `python -m bench.run` yet."
    files = " | ".join(f"`{name}` ({report['git'].get('commit', '?')})" for name, report in reports)
    rows = [
        f"| workload | antbatch against | bar | {files} |",
        "|---|---|---:|" + "---:|" * len(reports),
    ]
    for workload, key, bar, against in BARS:
        cells = []
        for _, report in reports:
            value = _ratio(report[workload], key) if workload in report else None
            cells.append("not run" if value is None else f"{value:.2f}x{'' if value >= bar else ' (**not met**)'}")
        rows.append(f"| {workload} | {against} | {bar:.2f}x | " + " | ".join(cells) + " |")
    return "\n".join(rows) + '\n\n"not run": that result file has no such figure (an older harness).'


# The benchmarks this page documents (others, e.g. bench.scale and bench.elastic, have docs of their own).
PAGE_BENCHES = ("bench.run", "bench.resume", "bench.smallfiles", "bench.newuser", "bench.elastic")


def render_durations(results_dir: pathlib.Path) -> str:
    """docgen block ``durations``: how long each of this page's benchmarks took on its last recorded run."""
    rows = ["| command | result file | finished | took | load average before |", "|---|---|---|---:|---:|"]
    for path in sorted(results_dir.glob("*.json")):
        report = json.loads(path.read_text())
        module = str(report.get("command", "")).removeprefix("python -m ").split(" ")[0]
        if module not in PAGE_BENCHES or report.get("wall_s") is None:
            continue
        load = report.get("load_avg_before")
        load_text = f"{load[0] if isinstance(load, list) else load}" if load is not None else "?"
        rows.append(
            f"| `{report['command']}` | `{path.name}` | {report.get('finished_at', '?')} | "
            f"{report['wall_s'] / 60:.1f} min | {load_text} |"
        )
    return "\n".join(rows)


def _rel(path: pathlib.Path) -> str:
    try:
        return str(path.resolve().relative_to(REPO))
    except ValueError:
        return str(path)


def plot(reports: list[dict[str, Any]], path: str = PNG) -> None:
    """Rows/s per system, one group per workload and profile; straggler ratios per profile."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    groups = [(r, w) for r in reports for w in _workloads(r)]
    fig, (left, right) = plt.subplots(1, 2, figsize=(14, 4.6), gridspec_kw={"width_ratios": [3.5, 1.2]})
    width = 0.2
    colours = {"naive": "#999999", "antbatch": "#1f77b4", "ray": "#ff7f0e", "bound": "#2ca02c"}
    for i, system in enumerate(SYSTEMS):
        values = [r[w].get(f"{system}_rows_s") or 0 for r, w in groups]
        xs = [j + (i - 1.5) * width for j in range(len(groups))]
        bars = left.bar(xs, values, width, label=LABELS[system], color=colours[system])
        left.bar_label(bars, fmt="%.0f", fontsize=7)
    for j, (r, w) in enumerate(groups):
        if r[w].get("ceiling_rows_s"):
            left.hlines(r[w]["ceiling_rows_s"], j - 2 * width, j + 2 * width, colors="black", linestyles="dashed")
    left.plot([], [], color="black", linestyle="dashed", label="ceiling")
    left.set_xticks(range(len(groups)), [f"{w}\n({r['profile']})" for r, w in groups], fontsize=8)
    left.set_ylabel("rows/s (median)")
    left.set_title(f"Throughput on {reports[0]['machine']['cpu_count']} CPUs")
    top = max((r[w].get(f"{system}_rows_s") or 0) for r, w in groups for system in (*SYSTEMS, "ceiling"))
    left.set_ylim(0, top * 1.2)
    left.legend(fontsize=8, ncol=5, loc="upper left")
    stragglers = [r for r in reports if "straggler" in r]
    if stragglers:
        labels, values, colors = [], [], []
        for r in stragglers:
            s = r["straggler"]
            labels += [f"dynamic\n({r['profile']})", f"static\n({r['profile']})"]
            values += [s["dynamic_over_ideal"], s["static_over_ideal"]]
            colors += ["#1f77b4", "#999999"]
        bars = right.bar(labels, values, color=colors)
        right.bar_label(bars, fmt="%.2fx", fontsize=8)
        right.axhline(1.0, color="black", linewidth=0.8)
        right.axhline(1.15, color="red", linewidth=0.8, linestyle="--", label="goal 1.15x")
        right.set_ylim(0, max(values) * 1.25)
        right.set_ylabel("makespan / ideal")
        right.set_title("One worker of 4 at half speed")
        right.tick_params(axis="x", labelsize=8)
        right.legend(fontsize=8, loc="upper left")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def result_argument(argv: list[str] | None, prog: str) -> tuple[str, dict[str, Any]]:
    """A report command's one argument, a result JSON: its path from the repository root (the doc
    quotes it) and what it holds."""
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 1:
        raise SystemExit(f"usage: python -m {prog} RESULT_JSON")
    with open(args[0]) as handle:
        return os.path.relpath(os.path.abspath(args[0]), REPO), json.load(handle)


def main(argv: list[str] | None = None) -> int:
    """Print a result file's table and draw docs/benchmarks.png from its folder's result files
    (the doc's text is bench.docgen's job)."""
    source, report = result_argument(argv, "bench.report")
    print(text_table(report))
    plot([r for _, r in harness_reports(pathlib.Path(REPO, source).parent)])
    print(f"drew {os.path.relpath(PNG, REPO)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
