"""The "newuser" block of docs/benchmarks.md, from bench/results/newuser.json (``bench/newuser.py``)."""

from __future__ import annotations

import json
import statistics
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import pathlib

NAMES = {"antbatch": "`antbatch run`", "loop": "plain loop", "ray": "Ray Data"}


def render_newuser(results_dir: pathlib.Path) -> str:
    """docgen's renderer: the tables and bars of the new-user benchmark."""
    path = results_dir / "newuser.json"
    if not path.exists():
        return "_No result yet: run `make bench-newuser`._\n"
    return render(json.loads(path.read_text()))


def render(doc: dict[str, Any]) -> str:
    bars = doc["bars"]
    lines = [
        f"Whole-process seconds, medians of {doc['repeats']} interleaved run(s) ({doc['profile']} profile), "
        f"{doc['machine']['cpu_count']} CPUs, load average {doc['load_avg_before'][0]} before and "
        f"{doc['load_avg_after'][0]} after, at {doc['git']['commit']}{_modified(doc)}. "
        "A bare `import torch` was timed in every repeat beside the systems.",
        "",
        "| rows | " + " | ".join(NAMES[s] for s in doc["systems"]) + " | vs loop | vs Ray | first batch | bar |",
        "|---|" + "---|" * (len(doc["systems"]) + 4),
    ]
    for index, size in enumerate(doc["sizes"]):
        bar = bars["short_vs_loop"] if index == 0 else bars["long_vs_loop"]
        ratios = size["ratios"]
        cells = [f"{size['median_s'][s]:.2f} s" for s in doc["systems"]]
        vs_ray = ratios.get("antbatch_vs_ray")
        lines.append(
            f"| {size['rows']:,} | "
            + " | ".join(cells)
            + f" | {_judge(ratios['antbatch_vs_loop'], bar)} | "
            + (_judge(vs_ray, bars["vs_ray"]) if vs_ray is not None else "not run")
            + f" | {size['time_to_first_batch_s']:.2f} s | {_first_batch_bar(size, bars)} |"
        )
    lines += [
        "",
        f"Ratios are the other system's seconds over antbatch's (bars: {bars['short_vs_loop']}x the loop on the short "
        f"job, {bars['long_vs_loop']}x on the long one, {bars['vs_ray']}x Ray Data). *First batch*: from "
        f"`antbatch run`'s start to its first scored batch; its bar is {bars['first_batch_over_torch_import_s']} s "
        "plus one torch import (the median bare import of the same repeats).",
        "",
        "Where antbatch's worker spent its time (busy seconds per stage, median run):",
        "",
        "| rows | worker s | " + " | ".join(_stage_names(doc)) + " | preprocess processes |",
        "|---|---|" + "---|" * (len(_stage_names(doc)) + 1),
    ]
    for size in doc["sizes"]:
        run = _median_run(size["runs"]["antbatch"])
        stages = " | ".join(f"{run['stages'][name]['busy_s']:.2f}" for name in _stage_names(doc))
        lines.append(f"| {size['rows']:,} | {run['worker_s']:.2f} | {stages} | {run['preprocess_processes']} |")
    return "\n".join(lines) + "\n"


def _modified(doc: dict[str, Any]) -> str:
    return " (with uncommitted changes to airflow_antbatch)" if doc["git"]["airflow_antbatch_modified"] else ""


def _first_batch_bar(size: dict[str, Any], bars: dict[str, float]) -> str:
    limit = size["torch_import_s"] + bars["first_batch_over_torch_import_s"]
    return f"{limit:.2f} s ({'meets' if size['time_to_first_batch_s'] <= limit else 'misses'})"


def _judge(ratio: float, bar: float) -> str:
    return f"{ratio:.2f}x {'(meets ' if ratio >= bar else '(misses '}{bar}x)"


def _stage_names(doc: dict[str, Any]) -> list[str]:
    return list(doc["sizes"][0]["runs"]["antbatch"][0]["stages"])


def _median_run(runs: list[dict[str, Any]]) -> dict[str, Any]:
    middle = statistics.median_low(r["seconds"] for r in runs)
    return next(r for r in runs if r["seconds"] == middle)
