"""docs/benchmarks.md's "straggler" block: the straggler job with and without speculative backups.

Figures come from ``bench/results/straggler.json`` (``make bench-straggler``: the quick job and
the same with a 5x straggler) and from the ``straggler`` entries of quick.json and full.json
(``bench.run``), whichever exist.
"""

from __future__ import annotations

import json
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import pathlib

SOURCES = (
    ("straggler.json", "straggler", "`make bench-straggler`"),
    ("straggler.json", "straggler_harsh", "`make bench-straggler`, harsh"),
    ("quick.json", "straggler", "`make bench-quick`"),
    ("full.json", "straggler", "`make bench`"),
)


def _ratio(entry: dict[str, Any], key: str) -> str:
    return f"{entry[key]:.3f}x" if key in entry else "-"


def _row(label: str, entry: dict[str, Any]) -> str:
    setup = entry.get("setup", {})
    job = f"{setup.get('workers', '?')} workers, {setup.get('shards', '?')} shards, w0 {setup.get('slowdown', '?')}x"
    wasted = f"{entry['rows_wasted']:,}" if "rows_wasted" in entry else "-"
    # A result from before backups existed: its dynamic run had none.
    keys = ("dynamic_over_ideal", "no_backup_over_ideal") if "backups" in entry else ("-", "dynamic_over_ideal")
    ratios = " | ".join(_ratio(entry, k) for k in (*keys, "static_over_ideal"))
    load = f"{entry['load_avg_before']:.1f}" if "load_avg_before" in entry else "-"
    return (
        f"| {label} | {job} | {ratios} | {entry.get('backups', '-')} | {wasted} | {entry.get('ideal_s', 0):.2f} s "
        f"| {load} |"
    )


def render(results_dir: pathlib.Path) -> str:
    """One row per result found: makespan over the ideal with backups, without, and static."""
    rows = []
    for name, key, label in SOURCES:
        path = results_dir / name
        if path.exists():
            entry = json.loads(path.read_text()).get(key)
            if entry:
                rows.append(_row(label, entry))
    if not rows:
        return "No straggler result yet: `make bench-straggler` writes `bench/results/straggler.json`."
    return "\n".join(
        [
            "Makespan over the ideal (total rows over the workers' summed speeds, each measured in the static "
            "run), median of the repeats; *backups* and *rows wasted* (rows scored by tries that lost the race "
            "to commit) are summed over the repeats of the run with backups. On 2 cores, a load average "
            "above 2 means the figures are noisy.",
            "",
            "| run | job (w0: the throttled worker's slowdown) | dynamic, backups | dynamic, no backups | static "
            "| backups | rows wasted | ideal | load average before |",
            "|---|---|---:|---:|---:|---:|---:|---:|---:|",
            *rows,
        ]
    )
