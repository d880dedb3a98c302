"""``antbatch``: plan, run workers, watch and finalize jobs without Airflow.

Errors print one line and exit non-zero; ``--debug`` shows the traceback instead.
"""

from __future__ import annotations

import argparse
import atexit
import dataclasses
import json
import logging
import os
import signal
import sys
import threading
from typing import TYPE_CHECKING, Any, NoReturn

from airflow_antbatch import exit_codes
from airflow_antbatch.errors import AntBatchError
from airflow_antbatch.object_reader import READERS
from airflow_antbatch.options import add_flags, flag_help, from_args
from airflow_antbatch.options import count_at_least as _count
from airflow_antbatch.spec import JobSpec, ModelStage

if TYPE_CHECKING:
    from collections.abc import Sequence
    from types import FrameType

    from airflow_antbatch.worker.loop import WorkerSummary

log = logging.getLogger("airflow_antbatch.cli")


def _storage_options(text: str | None) -> dict[str, Any]:
    raw = text if text is not None else os.environ.get("ANTBATCH_STORAGE_OPTIONS")
    if not raw:
        return {}
    try:
        value = json.loads(raw)
    except json.JSONDecodeError as exc:
        raise argparse.ArgumentTypeError(f"--storage-options is not JSON: {exc}") from exc
    if not isinstance(value, dict):
        raise argparse.ArgumentTypeError("--storage-options must be a JSON object")
    return value


_STAGE_KEYS = tuple(f.name for f in dataclasses.fields(ModelStage))
_INT_STAGE_KEYS = frozenset({"batch_size", "threads"})


def parse_stage(text: str) -> ModelStage:
    """``name=embed,model=pkg.mod:fn,batch_size=64`` as a stage; JobSpec checks the values.

    Only the syntax is checked here, so that a bad value is reported once, by JobSpec, with
    the stage's place in the chain.
    """
    fields: dict[str, Any] = {}
    for item in text.split(","):
        key, sep, value = (part.strip() for part in item.partition("="))
        if not sep or not key:
            raise argparse.ArgumentTypeError(f"expected key=value, got {item!r} in {text!r}")
        if key not in _STAGE_KEYS:
            raise argparse.ArgumentTypeError(f"unknown key {key!r} in {text!r}; known keys: {', '.join(_STAGE_KEYS)}")
        if key in fields:
            raise argparse.ArgumentTypeError(f"key {key!r} given twice in {text!r}")
        try:
            fields[key] = int(value) if key in _INT_STAGE_KEYS else value
        except ValueError:
            raise argparse.ArgumentTypeError(f"{key}={value!r} is not an integer in {text!r}") from None
    missing = [key for key in ("name", "model") if key not in fields]
    if missing:
        raise argparse.ArgumentTypeError(f"missing {' and '.join(missing)} in {text!r} (name=N,model=pkg.mod:fn,...)")
    return ModelStage(**fields)


def _add_spec_args(p: argparse.ArgumentParser) -> None:
    """The job options' flags: made from JobSpec's fields, but for the few spelt here."""
    p.add_argument("--input", required=True, nargs="+", help=flag_help("input_uri"))
    p.add_argument("--output", required=True, help=flag_help("output_uri"))
    models = p.add_mutually_exclusive_group(required=True)
    models.add_argument("--model", help=flag_help("model"))
    models.add_argument(
        "--stage",
        dest="stages",
        action="append",
        type=parse_stage,
        metavar="name=N,model=M[,KEY=VALUE...]",
        help=f"one model of a chain, in chain order (repeatable); keys: {', '.join(_STAGE_KEYS)}",
    )
    p.add_argument("--keep-column", action="append", default=[], help=flag_help("keep_columns") + " (repeatable)")
    add_flags(p)
    p.add_argument("--force", action="store_true", help="start a fresh attempt even if a plan exists")


def _spec_from_args(args: argparse.Namespace) -> JobSpec:
    return JobSpec(
        input_uri=args.input[0] if len(args.input) == 1 else tuple(args.input),
        output_uri=args.output,
        model=args.model,
        stages=tuple(args.stages or ()),
        keep_columns=tuple(args.keep_column),
        storage_options=args.storage_options,
        **from_args(args),
    )


def _add_worker_args(p: argparse.ArgumentParser, *, budget_default: str) -> None:
    p.add_argument("--cpu-budget", type=_count(1), help=f"cores each worker may use (default: {budget_default})")
    p.add_argument(
        "--preprocess-workers",
        type=_count(0),
        help="fixed preprocess pool size, 0 = in a thread (default: scaled to keep the model busy)",
    )
    p.add_argument("--torch-threads", type=_count(1), help="model intra-op threads (default: from the CPU budget)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="antbatch", description=__doc__)
    parser.add_argument("--debug", action="store_true", help="show tracebacks")
    parser.add_argument(
        "--storage-options",
        type=_storage_options,
        default=None,
        help="fsspec options as JSON (no credentials: use the environment); default $ANTBATCH_STORAGE_OPTIONS",
    )
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("plan", help="list the input, cut shards and write the plan (once)")
    _add_spec_args(p)
    p.add_argument("--json", action="store_true")

    p = sub.add_parser("run", help="plan, run local workers (one by default, in this process), finalize")
    _add_spec_args(p)
    p.add_argument(
        "--workers",
        type=_count(1),
        default=1,
        help="workers side by side (default 1: it runs in this process and scales its own preprocess "
        "processes and torch threads to the cores; more split the cores between worker subprocesses)",
    )
    _add_worker_args(p, budget_default="the CPUs available divided by --workers")
    p.add_argument("--json", action="store_true")

    p = sub.add_parser("worker", help="process shards of a planned job until none is left")
    p.add_argument("--spec", required=True, help="plan URI (printed by 'antbatch plan')")
    p.add_argument("--worker-id", required=True, help="stable id of this worker slot (e.g. worker-3)")
    p.add_argument(
        "--slot",
        type=_slot,
        help="I/N: this worker's share of the plan to claim first (e.g. 3/16); default: a point hashed from the id",
    )
    _add_worker_args(p, budget_default="the CPUs available")
    p.add_argument("--summary-file", help="also write the summary JSON here (e.g. /airflow/xcom/return.json)")
    p.add_argument(
        "--cache-mb",
        type=float,
        default=256.0,
        help="near cache for a shard's small input files, fetched many at a time (default 256; 0: off)",
    )
    p.add_argument("--cache-dir", help="keep the near cache on this local disk (default: in memory)")
    p.add_argument(
        "--progress-interval", type=float, default=30.0, help="seconds between progress lines in the log (0: none)"
    )
    p.add_argument(
        "--drain-s",
        type=_seconds_or_zero,
        default=0.0,
        help="on SIGTERM, seconds to keep scoring the shards in hand that finish in time before giving the "
        "rest back (default 0: give all back at once; launchers pass the pod's grace period less 15)",
    )

    p = sub.add_parser("merge", help="pack many small objects into large Parquet packs (once; reruns resume)")
    p.add_argument("sources", nargs="*", help="prefixes, globs or objects to pack")
    p.add_argument("--output", required=True, help="where the packs and _merge/manifest.json go")
    p.add_argument("--list-file", help="a text file naming one object URL per line (# comments allowed)")
    p.add_argument("--target-pack-mb", type=float, default=128.0, help="pack size to aim for (default 128)")
    p.add_argument("--concurrency", type=_count(1), default=64, help="objects read at once (default 64)")
    p.add_argument(
        "--max-unreadable", type=_count(0), default=100, help="objects that may vanish or fail to read (default 100)"
    )
    p.add_argument(
        "--reader",
        choices=READERS,
        default="auto",
        help="what reads the objects: obstore (S3, a tenth of the CPU), s3fs, or auto (obstore where it applies)",
    )
    p.add_argument("--json", action="store_true")

    p = sub.add_parser("status", help="shards by state, rows, throughput, ETA, workers and quarantined records")
    p.add_argument("uri", help="plan URI, state root or output URI")
    view = p.add_mutually_exclusive_group()
    view.add_argument("--json", action="store_true", help="print the status as JSON, for scripts")
    view.add_argument(
        "--watch",
        nargs="?",
        const=2.0,
        type=_seconds,
        metavar="SECONDS",
        help="redraw every SECONDS (default 2) until every shard is settled; Ctrl-C stops",
    )

    p = sub.add_parser("finalize", help="check every shard is committed and write the _SUCCESS manifest")
    p.add_argument("--spec", required=True, help="plan URI")
    p.add_argument("--json", action="store_true")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run one command; returns its exit code.

    Called without ``argv`` it is the process's entry point (the ``antbatch`` script, ``python
    -m airflow_antbatch``): once a ``run`` or ``worker`` command has finished and its output is
    flushed, it ends the process itself (see :func:`_exit_now`).
    """
    if argv is None:
        # The process's entry point, before torch loads (the ``antbatch`` script and ``python -m
        # airflow_antbatch`` alike): OpenMP threads that spin while they wait steal the cores the
        # preprocess processes need (docs/operations.md, "Performance notes"); waiting passively
        # costs little. An explicit setting in the environment wins.
        os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.storage_options is None:
        args.storage_options = _storage_options(None)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        code = int(_COMMANDS[args.command](args))
    except (AntBatchError, FileNotFoundError) as exc:
        if args.debug:
            raise
        print(f"antbatch {args.command}: error: {exc}", file=sys.stderr)
        code = exit_codes.ERROR
    if argv is None and args.command in ("run", "worker"):
        _exit_now(code)
    return code


def _exit_now(code: int) -> NoReturn:
    """End the process without tearing the interpreter down: with torch loaded, freeing every
    module and object one by one takes about a second on a small machine, after the job's last
    byte is written. Exit handlers still run first (logging's, multiprocessing's, user code's)."""
    atexit._run_exitfuncs()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def _print(args: argparse.Namespace, doc: dict[str, Any], text: str) -> None:
    print(json.dumps(doc, indent=1, default=str) if getattr(args, "json", False) else text)


def _cmd_plan(args: argparse.Namespace) -> int:
    from airflow_antbatch.planning import plan_job

    result = plan_job(_spec_from_args(args), force=args.force)
    verb = "reused" if result.reused else "wrote"
    doc = {"plan_uri": result.plan_uri, "shards": len(result.plan.shards), "reused": result.reused}
    _print(args, doc, f"{verb} plan {result.plan_uri}: {len(result.plan.shards)} shards")
    return exit_codes.OK


def _slot(text: str) -> tuple[int, int]:
    from airflow_antbatch.worker.claims import parse_slot

    try:
        return parse_slot(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"--{exc}") from exc


def _cmd_worker(args: argparse.Namespace) -> int:
    from airflow_antbatch.worker.near_cache import CacheOptions

    summary = _worker_here(
        args,
        args.spec,
        args.worker_id,
        cache=CacheOptions(max_bytes=int(args.cache_mb * 2**20), directory=args.cache_dir),
        progress_interval_s=args.progress_interval,
        slot=args.slot,
        drain_s=args.drain_s,
    )
    doc = summary.to_dict()
    if args.summary_file:
        os.makedirs(os.path.dirname(os.path.abspath(args.summary_file)), exist_ok=True)
        with open(args.summary_file, "w") as handle:
            json.dump(doc, handle)
    else:
        print(json.dumps(doc))
    return _worker_exit_code(summary)


def _worker_here(args: argparse.Namespace, plan_uri: str, worker_id: str, **options: Any) -> WorkerSummary:
    """Run one worker in this process; SIGTERM stops its claims and gives back what it holds."""
    from airflow_antbatch.worker.run import run_worker

    stop = threading.Event()

    def on_term(signum: int, _frame: FrameType | None) -> None:
        log.warning("signal %d: no new claims; finishing or releasing the shards in hand", signum)
        stop.set()

    signal.signal(signal.SIGTERM, on_term)
    return run_worker(
        plan_uri,
        worker_id,
        storage_options=args.storage_options,
        stop=stop,
        cpu_budget=args.cpu_budget,
        preprocess_workers=args.preprocess_workers,
        torch_threads=args.torch_threads,
        **options,
    )


def _worker_exit_code(summary: WorkerSummary) -> int:
    if summary.outcome == "preempted":
        return exit_codes.PREEMPTED
    return exit_codes.SHARDS_FAILED if summary.failed_for_good or summary.stopped_job else exit_codes.OK


def _cmd_run(args: argparse.Namespace) -> int:
    from airflow_antbatch.finalize import finalize_job
    from airflow_antbatch.planning import SHARDS_PER_WORKER, plan_job
    from airflow_antbatch.worker.local import available_cpus, run_local_workers
    from airflow_antbatch.worker.run import first_batch_text, pool_size, start_preprocess_server

    spec = _spec_from_args(args)
    in_process = args.workers == 1
    if in_process:
        # Its torch import runs on another core while this process plans and loads the model.
        pool = pool_size(args.cpu_budget or available_cpus(), args.preprocess_workers)
        start_preprocess_server(spec.preprocess, pool)
    result = plan_job(spec, force=args.force, min_shards=SHARDS_PER_WORKER * args.workers)
    # Progress goes to stderr so that stdout holds only the result (plain JSON with --json).
    verb = "reused" if result.reused else "wrote"
    print(f"{verb} plan {result.plan_uri}: {len(result.plan.shards)} shards", file=sys.stderr)
    if in_process:
        # One worker per machine: no second process to start, no second torch import, and the
        # worker's scaler shares the cores between preprocess processes and torch threads. This
        # process is the user's command, so every record goes through the preprocess processes:
        # one that crashes the hook is quarantined instead of ending the command (their start
        # overlapped planning and the torch import above).
        summary = _worker_here(args, result.plan_uri, "worker-0", preprocess_while_pool_starts=False)
        code = _worker_exit_code(summary)
        results: list[dict[str, Any]] = [{"worker_id": "worker-0", "exit_code": code, "summary": summary.to_dict()}]
    else:
        # Workers that share the machine each get their share: spinning OpenMP threads of one
        # worker on another's cores make inference many times slower.
        results = run_local_workers(
            result.plan_uri,
            [f"worker-{i}" for i in range(args.workers)],
            storage_options=args.storage_options,
            cpu_budget=args.cpu_budget or max(1, available_cpus() // args.workers),
            preprocess_workers=args.preprocess_workers,
            torch_threads=args.torch_threads,
        )
    for r in results:
        s = r["summary"] or {}
        print(
            f"{r['worker_id']}: exit {r['exit_code']}, committed {s.get('shards_committed', '?')} shards "
            f"({s.get('rows_committed', '?')} rows), skipped {s.get('shards_skipped', '?')} already committed; "
            + first_batch_text(s.get("time_to_first_batch_s")),
            file=sys.stderr,
        )
    manifest = finalize_job(result.plan_uri, args.storage_options)
    doc = {"plan_uri": result.plan_uri, "workers": results, "manifest": manifest}
    _print(
        args,
        doc,
        f"done: {manifest['rows']} rows in {manifest['shards']} files; manifest "
        f"{result.plan.spec.output_uri.rstrip('/')}/_SUCCESS",
    )
    return exit_codes.OK


def _cmd_merge(args: argparse.Namespace) -> int:
    from airflow_antbatch.merge import merge_small_files

    result = merge_small_files(
        args.sources,
        args.output,
        list_file=args.list_file,
        target_pack_bytes=int(args.target_pack_mb * 2**20),
        concurrency=args.concurrency,
        max_unreadable=args.max_unreadable,
        storage_options=args.storage_options,
        reader=args.reader,
    )
    text = (
        f"{result.objects} objects ({result.bytes} bytes) in {result.packs} packs under {result.output_uri} "
        f"({result.packs_written} written, {result.packs_skipped} already there, read with {result.reader}), "
        f"{len(result.unreadable)} unreadable; "
        f"manifest {result.output_uri.rstrip('/')}/_merge/manifest.json"
    )
    _print(args, result.to_dict(), text)
    return exit_codes.OK


def _seconds(text: str) -> float:
    """An argparse type: a positive number of seconds."""
    value = _seconds_or_zero(text)
    if value == 0:
        raise argparse.ArgumentTypeError(f"must be > 0, got {text}")
    return value


def _seconds_or_zero(text: str) -> float:
    """An argparse type: a number of seconds, 0 included."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number of seconds") from None
    if not value >= 0:  # NaN too
        raise argparse.ArgumentTypeError(f"must be >= 0, got {text}")
    return value


def _cmd_status(args: argparse.Namespace) -> int:
    from airflow_antbatch.planning import resolve_plan_uri
    from airflow_antbatch.progress import JobProgress
    from airflow_antbatch.status_view import show, watch

    progress = JobProgress(resolve_plan_uri(args.uri, args.storage_options), args.storage_options)
    if args.watch:
        watch(progress, interval_s=args.watch)
    else:
        show(progress, as_json=args.json)
    return exit_codes.OK


def _cmd_finalize(args: argparse.Namespace) -> int:
    from airflow_antbatch.finalize import finalize_job

    manifest = finalize_job(args.spec, args.storage_options)
    _print(args, manifest, f"manifest: {manifest['rows']} rows in {manifest['shards']} files")
    return exit_codes.OK


_COMMANDS = {
    "plan": _cmd_plan,
    "run": _cmd_run,
    "worker": _cmd_worker,
    "merge": _cmd_merge,
    "status": _cmd_status,
    "finalize": _cmd_finalize,
}
