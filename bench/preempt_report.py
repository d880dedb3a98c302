"""From ``bench/results/preempt.json`` to docs/benchmarks.md's "Preemption" block
(``render``, the ``preempt`` renderer of ``bench.docgen``)."""

from __future__ import annotations

import json
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import pathlib

RUNS = (("release", "`--drain-s 0`: give back at once"), ("drain", "`--drain-s 30`: finish what fits"))


def render(results_dir: pathlib.Path) -> str:
    path = results_dir / "preempt.json"
    if not path.exists():
        return "No `bench/results/preempt.json` yet: run `make bench-preempt`."
    return markdown(json.loads(path.read_text()))


def markdown(r: dict[str, Any]) -> str:
    data, median = r["data"], r["median"]
    repeats = len(r["runs"]["release"])
    lines = [
        f"`{r['command']}`, finished {r['finished_at']} ({r['wall_s']:.0f} s), commit {r['git'].get('commit', '?')}; "
        f"{data['rows']:,} rows in shards of {data['max_shard_rows']:,} (batches of {data['batch_size']}), "
        f"medians of {repeats} interleaved repeats; load average before {r['load_avg_before'][0]}.",
        "",
        "| SIGTERM mid-shard | rows scored twice: median (each repeat) | SIGTERM to exit "
        "| job wall time (both workers) | duplicated / missing ids |",
        "|---|---:|---:|---:|---:|",
    ]
    for key, label in RUNS:
        m = median[key]
        each = ", ".join(f"{n:,}" for n in m["rows_scored_twice_each"])
        lines.append(
            f"| {label} | {m['rows_scored_twice']:,.0f} ({each}) | {m['exit_after_signal_s']:.2f} s "
            f"| {m['job_wall_s']:.2f} s | {m['duplicates']} / {m['missing']} |"
        )
    return "\n".join(lines)
