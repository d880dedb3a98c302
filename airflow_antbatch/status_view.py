"""``antbatch status``: a job's progress as a terminal table (rich), once or live with ``--watch``.

Rendering is a pure function of a :class:`~airflow_antbatch.progress.Snapshot`, so that the
one-shot table, the live view and the tests draw the same thing; ``--json`` prints the
snapshot's dict for scripts.
"""

from __future__ import annotations

import json
import time
from typing import TYPE_CHECKING

from rich.console import Console, Group
from rich.live import Live
from rich.progress_bar import ProgressBar
from rich.table import Table
from rich.text import Text

from airflow_antbatch.failure_report import shard_failures
from airflow_antbatch.progress import JobProgress, is_stale

if TYPE_CHECKING:
    from rich.console import RenderableType

    from airflow_antbatch.progress import Snapshot


def duration(seconds: float | None) -> str:
    """``1h02m``, ``3m05s``, ``42s``; ``-`` when unknown."""
    if seconds is None:
        return "-"
    s = round(seconds)
    if s >= 3600:
        return f"{s // 3600}h{s % 3600 // 60:02d}m"
    if s >= 60:
        return f"{s // 60}m{s % 60:02d}s"
    return f"{s}s"


def job_state(snap: Snapshot) -> str:
    status = snap.status
    if status.succeeded:
        return "succeeded"
    if status.finished:
        return "failed"
    return "running"


def render(snap: Snapshot) -> RenderableType:
    """The whole view: progress bar, shards by state, rows and throughput, workers, failures."""
    status = snap.status
    state = job_state(snap)
    color = {"succeeded": "green", "failed": "red", "running": "yellow"}[state]
    head = Text.assemble(("job ", "bold"), (snap.plan_uri, "cyan"), "  ", (state, f"bold {color}"))
    percent = 100 * status.committed / max(1, status.planned)
    bar = Table.grid(padding=(0, 1))
    bar.add_row(
        ProgressBar(total=max(1, status.planned), completed=status.committed, width=40),
        f"{status.committed}/{status.planned} shards committed ({percent:.0f}%)",
    )
    rows = f"{status.rows_committed:,}" + (f" / {status.rows_planned:,}" if status.rows_planned is not None else "")
    summary = Table(title="Shards", title_justify="left", show_edge=False)
    for name in ("committed", "leased", "pending", "failed", "rows", "rows/s", "ETA", "quarantined"):
        summary.add_column(name, justify="right")
    summary.add_row(
        str(status.committed),
        str(status.leased),
        str(status.pending),
        Text(str(status.failed), style="red" if status.failed else ""),
        rows,
        f"{status.rows_per_s:,.1f}",
        duration(status.eta_s),
        Text(f"{snap.quarantined_rows:,} rows", style="yellow" if snap.quarantined_rows else ""),
    )
    parts: list[RenderableType] = [head, bar, summary, _workers_table(snap)]
    if status.failures:
        failures = Table(title="Failed shards", title_justify="left", show_edge=False)
        failures.add_column("shard")
        failures.add_column("tries", justify="right")
        failures.add_column("last error", style="red")
        for failure in shard_failures(status, max_attempts=snap.max_shard_attempts):
            failures.add_row(failure.shard, str(failure.tries), failure.last_error)
        parts.append(failures)
    parts.append(Text(f"output {snap.output_uri}  manifest {snap.manifest_uri}", style="dim"))
    return Group(*parts)


def _workers_table(snap: Snapshot) -> Table:
    table = Table(title="Workers", title_justify="left", show_edge=False)
    for name, justify in (("worker", "left"), ("state", "left"), ("shards", "right"), ("rows", "right")):
        table.add_column(name, justify=justify)  # type: ignore[arg-type]
    table.add_column("rows/s", justify="right")
    table.add_column("last heartbeat", justify="right")
    table.add_column("shard in hand")
    for w in sorted(snap.status.workers, key=lambda w: (w.worker_id, w.token)):
        stale = is_stale(w, snap.lease_ttl_s)
        table.add_row(
            w.worker_id,
            Text("STALE", style="bold red") if stale else w.state,
            str(w.shards_committed),
            f"{w.rows_committed:,}",
            f"{w.rows_per_s:,.1f}",
            Text(f"{duration(w.last_beat_age_s)} ago", style="red" if stale else ""),
            w.current_shard or "-",
        )
    return table


def show(progress: JobProgress, *, as_json: bool, console: Console | None = None) -> Snapshot:
    """Print the job's status once, as a table or as JSON."""
    snap = progress.snapshot()
    console = console or Console()
    if as_json:
        console.out(json.dumps(snap.to_dict(), indent=1), highlight=False)
    else:
        console.print(render(snap))
    return snap


def watch(progress: JobProgress, *, interval_s: float, console: Console | None = None) -> Snapshot:
    """Redraw the view every ``interval_s`` until every shard is settled; Ctrl-C stops it early."""
    snap = progress.snapshot()
    with Live(render(snap), console=console, auto_refresh=False) as live:
        try:
            while not snap.status.finished:
                time.sleep(interval_s)
                snap = progress.snapshot()
                live.update(render(snap), refresh=True)
        except KeyboardInterrupt:
            pass
    return snap
