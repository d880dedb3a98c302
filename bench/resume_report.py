"""The resume benchmark's table, bars and doc section, from its result files.

``render(results_dir)`` is the ``resume`` renderer of ``bench.docgen``: ``python -m
bench.docgen`` rewrites the block from ``bench/results/resume*.json`` (``bench.resume`` runs it
after every run). ``python -m bench.resume_report RESULT_JSON`` prints one result's table and bars.
"""

from __future__ import annotations

import json
import os
from typing import TYPE_CHECKING, Any

from bench.report import REPO, result_argument

if TYPE_CHECKING:
    import pathlib

PRIMARY = "resume.json"  # the full profile's result: the section's main table
SYSTEMS = {"antbatch": "antbatch", "ray": "Ray Data"}
RERUNS = {"resume": "resume", "scratch": "from scratch"}


def lines(report: dict[str, Any]) -> list[dict[str, Any]]:
    """One flat row per system and rerun: what the table shows and the bars judge."""
    rows = report["data"]["rows"]
    out = []
    for system in SYSTEMS:
        if system not in report:
            continue
        committed = report[system]["at_kill"]["rows_committed"]
        for rerun in RERUNS:
            r = report[system][rerun]
            scored = r["rows_committed"] if system == "antbatch" else r["rows_scored"]
            out.append(
                {
                    "system": system,
                    "rerun": rerun,
                    "rows_committed_at_kill": committed,
                    "wall_s": r["wall_s"],
                    "rows_scored": scored,
                    "tries_wasted": r.get("tries_wasted"),
                    # Any rerun must score the rows not committed at the kill; the rest was done already.
                    "committed_rows_scored_again": scored - (rows - committed),
                    **r["reads"],
                    **r["output"],
                }
            )
    return out


def bars(report: dict[str, Any]) -> dict[str, bool]:
    """Issue 6's bars for antbatch's resumed rerun, and exactly-once output for every rerun."""
    by = {(x["system"], x["rerun"]): x for x in lines(report)}
    out = {}
    ours = by.get(("antbatch", "resume"))
    if ours is not None:
        out["antbatch_recomputes_at_most_in_flight"] = (
            ours["committed_rows_scored_again"] <= 0 and not ours["tries_wasted"]
        )
        out["antbatch_asks_for_no_committed_input"] = ours["gets_starting_in_committed"] == 0
        out["antbatch_reads_no_committed_bytes"] = ours["committed_bytes_reread"] == 0
    out.update({f"{s}_{r}_exactly_once": x["duplicates"] == 0 and x["missing"] == 0 for (s, r), x in by.items()})
    return out


def _mb(n: int) -> str:
    return f"{n / 1e6:.2f}"


def table(report: dict[str, Any]) -> list[str]:
    out = [
        "| system | rerun | rows committed at kill | rerun wall | rows scored in rerun | committed rows scored again "
        "| input MB read (footers) | committed input MB re-read | GETs starting in committed input "
        "| duplicates | missing |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    out.extend(
        f"| {SYSTEMS[x['system']]} | {RERUNS[x['rerun']]} | {x['rows_committed_at_kill']:,} | {x['wall_s']:.1f} s "
        f"| {x['rows_scored']:,} | {x['committed_rows_scored_again']:,} "
        f"| {_mb(x['bytes_read'])} ({_mb(x['footer_bytes'])}) | {_mb(x['committed_bytes_reread'])} "
        f"| {x['gets_starting_in_committed']} | {x['duplicates']} | {x['missing']} |"
        for x in lines(report)
    )
    return out


def text_table(report: dict[str, Any]) -> str:
    return "\n".join([*table(report), "", *(f"{k}: {'met' if v else 'NOT met'}" for k, v in report["bars"].items())])


def _kills(report: dict[str, Any]) -> list[str]:
    out = []
    if "antbatch" in report:
        a = report["antbatch"]["at_kill"]
        out.append(
            f"- *antbatch*: the worker's tree ({a['processes_killed']} processes) was killed {a['killed_after_s']} s "
            f"after it started, with {a['shards_committed']} of {a['shards']} shards committed "
            f"({a['rows_committed']:,} rows) and {a['shards_in_flight']} shard(s) in flight "
            f"({a['rows_in_flight']:,} rows); the committed shards' row groups hold "
            f"{_mb(a['committed_input_bytes'])} MB of input."
        )
    if "ray" in report:
        r = report["ray"]["at_kill"]
        out.append(
            f"- *Ray Data*: the driver's tree ({r['processes_killed']} processes: raylet, GCS, workers) was killed "
            f"{r['killed_after_s']} s after it started, with {r['rows_committed']:,} rows in committed "
            f"checkpoints and {r['rows_scored_uncommitted']:,} more scored but not committed; "
            f"{r['row_groups_committed']} input row groups were wholly committed "
            f"({_mb(r['committed_input_bytes'])} MB)."
        )
    return out


def _splits(report: dict[str, Any]) -> list[str]:
    out = []
    for rerun, label in RERUNS.items():
        if "antbatch" in report:
            a = report["antbatch"][rerun]
            out.append(
                f"- *antbatch*, {label}: `antbatch plan` {a['plan_wall_s']} s, `antbatch worker` "
                f"{a['worker_wall_s']} s (of which the worker's own shard loop, as its summary counts it, "
                f"{a['worker_reported_s']} s; the rest is starting Python, importing torch, loading the code and "
                "starting the preprocess processes); "
                f"{a['shards_skipped']} shards skipped as committed."
            )
        if "ray" in report:
            r = report["ray"][rerun]
            loading = " (loading the checkpoint, itself a Ray Data job, and the filter actor's start included)"
            out.append(
                f"- *Ray Data*, {label}: `import ray` + `ray.init` {r['startup_s']} s, the job {r['job_s']} s"
                f"{loading if rerun == 'resume' else ''}, the rest process start and shutdown."
            )
    return out


def resume_reports(results_dir: pathlib.Path) -> list[tuple[str, dict[str, Any]]]:
    """(file name, report) of every resume result in ``results_dir``, the primary first."""
    paths = sorted(results_dir.glob("resume*.json"), key=lambda p: (p.name != PRIMARY, p.name))
    return [(path.name, json.loads(path.read_text())) for path in paths]


def render(results_dir: pathlib.Path) -> str:
    """docgen block ``resume``: the primary result in full, every other one's table, kill and bars."""
    reports = resume_reports(results_dir)
    if not reports:
        return "No result file of `python -m bench.resume` yet."
    (name, report), others = reports[0], reports[1:]
    return markdown(report, os.path.relpath(results_dir / name, REPO), others)


def _rereads(report: dict[str, Any]) -> list[str]:
    """Why antbatch's resumed rerun read committed bytes, or why it read none."""
    ours = report.get("antbatch", {}).get("resume")
    if ours is None:
        return []
    if ours["reads"]["committed_bytes_reread"] == 0:
        return [
            "antbatch's resumed rerun reads no byte of committed input: a shard fetches exactly its",
            "row groups' column chunks, in one GET where they lie together (pyarrow's pre-buffering",
            "coalesces them; the file is opened with no read-ahead, `reader.open_piece`), besides each",
            "file's footer: its last 64 KiB, read as every Parquet reader reads it, counted apart above",
            "(where the footer read holds bytes of a committed last row group, they are metadata reads).",
        ]
    return [
        "Where committed bytes are re-read, the cause is the transfer unit, not a re-scored shard:",
        "this run's reader (before issue 16) read a shard's Parquet file through fsspec's read-ahead",
        "(5 MiB blocks here, 50 MiB in s3fs), which runs on past the last row group asked for into",
        "the next ones, committed or not. Readers since then fetch only the planned row groups.",
    ]


def markdown(report: dict[str, Any], source: str, others: list[tuple[str, dict[str, Any]]]) -> str:
    data = report["data"]
    git = report["git"]
    load = [" / ".join(f"{x:.1f}" for x in report[k]) for k in ("load_avg_before", "load_avg_after")]
    changed = " with local changes to airflow_antbatch/" if git.get("airflow_antbatch_modified") else ""
    parts = [
        "## Resume after a kill (issue 6)",
        "",
        "```bash",
        "make bench-resume               # python -m bench.resume         -> bench/results/resume.json",
        "python -m bench.resume --quick  # a quarter of the rows          -> bench/results/resume-quick.json",
        "python -m bench.docgen          # rewrite this section from bench/results/resume*.json",
        "```",
        "",
        "How long each took on its last run: the table at the top of this page.",
        "",
        "**What runs.** The *single* workload (tokenize -> the small transformer -> top_k), its",
        "generated Parquet input read through `latency://`. Each system runs the job, and the harness",
        "SIGKILLs the whole process tree as soon as half the rows are committed, then reruns the job to",
        "completion. *antbatch*: `antbatch plan` and one `antbatch worker --worker-id w0 --cpu-budget 2`",
        "through the CLI, one shard per row group; committed rows are read from the ledger's",
        "`commits/`; the rerun is what an Airflow rerun does, the plan step (the plan is reused) and",
        "the worker with the same id (it takes over its dead predecessor's leases without waiting out",
        "the TTL). *Ray Data*: the pipeline of the throughput benchmark (read, preprocess tasks at 0.5",
        "CPU, one scoring actor, `write_parquet`; `bench/systems/ray_resume.py`) with",
        '`DataContext.checkpoint_config = CheckpointConfig(id_column="id", checkpoint_path=<local dir>)`;',
        "committed rows are the ids in committed (not `.pending`) checkpoint files; the rerun is the",
        "same driver again. Ray 2.60 writes a pending checkpoint of a write task's ids, then the data",
        "file, then renames the checkpoint to committed; a rerun deletes data files whose checkpoint is",
        "still pending, reads the whole input again and drops committed ids in a filter actor after",
        "the read. *From scratch*: the same job into an empty output (Ray without a checkpoint): what",
        "a rerun costs without resume.",
        "",
        "**Ray settings that differ from the throughput benchmark**, both needed for Ray to resume at",
        "all here. `RAY_DATA_PARQUET_BIN_PACKING_BYTES` is set to the largest row group's size: by",
        "default Ray 2.60 packs row groups into read tasks of up to 128 MiB, so this input is one read",
        "task, one block, one write task and one checkpoint, committed at the very end (no kill at",
        "half is possible); with it, a read, write task and checkpoint per row group, antbatch's",
        "shard. `ray.init(num_cpus=4)` on the 2 cores: the rerun's checkpoint filter actor holds a",
        "logical CPU for the whole job, and with 2 the resumed run hung before reading anything (the",
        "ListFiles task waited for a FooterReader actor that could not be scheduled; seen twice).",
        "Every Ray run here uses 4, so resume and from scratch differ in the checkpoint alone.",
        "",
        "**Measures.** *Rerun wall*: process start to exit, planning, imports and `ray.init`",
        "included. *Rows scored*: antbatch's worker summary (`rows_committed`; tries wasted are",
        "counted apart), Ray's scoring actor's own count. *Committed rows scored again*: rows scored",
        "beyond those not committed at the kill. *Input read*: every GET of every process, logged by",
        "`bench/latencyfs.py` (`ANTBATCH_BENCH_READ_LOG`), footers included; *committed input",
        "re-read*: the bytes of those GETs that fall inside the row groups of work committed before",
        "the kill (for Ray, the row groups all of whose ids were committed); *GETs starting in",
        "committed input*: requests whose first byte lies there, i.e. reads aimed at committed work",
        "rather than read-ahead past the end of a pending row group. *Duplicates / missing*: the",
        "output directory as a reader sees it (bookkeeping under `_` left out), joined on `id`.",
        "",
        f"Generated by `python -m bench.docgen` from `{source}`, a run of `{report['command']}` finished "
        f"{report['finished_at']} in {report['wall_s']:.0f} s, antbatch at commit `{git['commit']}`{changed}. "
        f"{data['rows']:,} rows in {data['files']} files of {data['row_group_rows']}-row row groups "
        f"({_mb(data['input_bytes'])} MB); antbatch shards of {report['max_shard_rows']} rows, batches of "
        f"{report['batch_size']}. Load average (1 / 5 / 15 min) before {load[0]}, after {load[1]}: the machine "
        "(2 cores) was shared with other work, so wall times are noisy; row and byte counts are not.",
        "",
        *table(report),
        "",
        *_rereads(report),
        "Ray reads every row group again and filters afterwards.",
        "",
        "At the kill:",
        "",
        *_kills(report),
        "",
        "Where the rerun time goes:",
        "",
        *_splits(report),
        "",
        "Bars (issue 6: the rerun recomputes at most the shards in flight at the kill and re-reads no",
        "committed shard's input; every rerun's output has every row once):",
        "",
        *(f"- `{k}`: {'met' if v else '**not met**'}" for k, v in report["bars"].items()),
        "",
        *_others(others),
    ]
    return "\n".join(parts)


def _others(others: list[tuple[str, dict[str, Any]]]) -> list[str]:
    """Every other resume result file's table and bars, so the doc shows each layout measured."""
    out = []
    for name, other in others:
        data = other["data"]
        out += [
            f"### Also: `{name}` (`{other['command']}`, finished {other['finished_at']}, antbatch at "
            f"`{other['git']['commit']}`)",
            "",
            f"{data['rows']:,} rows in {data['files']} files of {data['row_group_rows']}-row row groups; antbatch "
            f"shards of {other['max_shard_rows']} rows; load average before "
            f"{' / '.join(f'{x:.1f}' for x in other['load_avg_before'])}.",
            "",
            *table(other),
            "",
            *_kills(other),
            "",
            *_rereads(other),
            "",
            "Bars: " + ", ".join(f"`{k}` {'met' if v else '**not met**'}" for k, v in other["bars"].items()) + ".",
            "",
        ]
    return out


def main(argv: list[str] | None = None) -> int:
    _, report = result_argument(argv, "bench.resume_report")
    print(text_table(report))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
