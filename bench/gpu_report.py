"""docs/benchmarks.md's "gpu" block, from bench/results/gpu.json (``make gpu-check`` on a lent GPU)."""

from __future__ import annotations

import json
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import pathlib

SYSTEMS = (("naive", "plain loop"), ("antbatch", "antbatch"), ("antbatch_compile", "antbatch + torch.compile"))


def _cell(entry: dict[str, Any] | None) -> str:
    if not entry:
        return "-"
    if "skipped" in entry:
        return f"skipped: {entry['skipped']}"
    if "error" in entry:
        return f"failed: {entry['error'].splitlines()[0][:80]}"
    first = f", first batch at {entry['first_batch_s']:.1f} s" if entry.get("first_batch_s") is not None else ""
    util = f", GPU {entry['gpu_util_mean']:.0f}% busy" if "gpu_util_mean" in entry else ""
    processes = entry.get("preprocess_processes")
    pool = "" if processes is None else f", {processes} preprocess process{'es' if processes != 1 else ''}"
    return f"{entry['rows_s']:,.0f} rows/s ({entry['seconds']:.1f} s{first}{util}{pool})"


def _ceilings(workloads: dict[str, Any]) -> list[str]:
    """Where each antbatch run's time went: what its model stage could score unstarved, and the pool's growth."""
    lines = []
    for name, record in workloads.items():
        entry = record.get("antbatch", {})
        if not entry.get("model_bound_rows_s"):
            continue
        grew = ", ".join(f"{size} at {at:.1f} s" for at, size in entry.get("pool_sizes", [])) or "none"
        lines.append(
            f"- {name}: the model stage, never starved, would score {entry['model_bound_rows_s']:,.0f} rows/s "
            f"(rows over its busy time); the preprocess pool's sizes: 1 at the start, then {grew}."
        )
    return [*lines, ""] if lines else []


def render(results_dir: pathlib.Path) -> str:
    """A table per workload, or a line saying that the check has not run on a GPU yet."""
    path = results_dir / "gpu.json"
    if not path.exists():
        return (
            "Not run yet: no GPU has been lent to a session since `make gpu-check` was written. "
            "On a GPU machine, `make gpu-check` (at most 8 minutes) writes `bench/results/gpu.json`, "
            "and `python -m bench.docgen` fills this section from it."
        )
    result = json.loads(path.read_text())
    box = result.get("machine", {})
    lines = [
        f"Measured on {box.get('gpu', 'a GPU')} ({box.get('cpus', '?')} CPUs, torch {box.get('torch', '?')}, "
        f"CUDA {box.get('cuda', '?')}), `{result.get('command', 'python3 -m bench.gpu')}` with a budget of "
        f"{result.get('budget_s', 0):.0f} s: {result.get('wall_s', 0):.0f} s, "
        f"finished {result.get('finished_at', '?')}.",
        "",
        "| workload | rows | " + " | ".join(label for _, label in SYSTEMS) + " | antbatch / loop | labels equal |",
        "|---|---:|" + "---|" * len(SYSTEMS) + "---:|---:|",
    ]
    for name, record in result.get("workloads", {}).items():
        speedup = f"{record['speedup']:.2f}x" if "speedup" in record else "-"
        agreement = record.get("check", {}).get("label_agreement")
        lines.append(
            f"| {name} | {record.get('rows', 0):,} | "
            + " | ".join(_cell(record.get(key)) for key, _ in SYSTEMS)
            + f" | {speedup} | {'-' if agreement is None else f'{agreement:.1%}'} |"
        )
    lines += ["", *_ceilings(result.get("workloads", {})), f"Ray Data: {result.get('ray', {}).get('skipped', 'run')}."]
    return "\n".join(lines)
