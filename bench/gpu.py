"""The GPU check (``make gpu-check``): one prepared run for a lent GPU machine, at most 8 minutes.

Run from the source tree with the machine's own python3 (torch with CUDA, pyarrow, fsspec,
numpy; no Airflow, no project venv, no registry)::

    PYTHONPATH=. python3 -m bench.gpu            # results: $OUT/gpu.json if OUT is set, else bench/results/gpu.json
    PYTHONPATH=. python3 -m bench.gpu --dry-run  # CPU, toy models and data, a few seconds (tests/test_bench_gpu.py)

Two jobs whose preprocessing runs on the CPU and whose model runs on the GPU
(``bench.gpu_models``): a ResNet-50 on deflate-coded 224x224 images and a BERT-base encoder on
WordPiece-tokenised text. Each runs as the plain loop a user writes (read a batch, preprocess,
copy, score under bf16 autocast, write) and as an antbatch worker (``run_worker`` in this
process: preprocess processes, pinned host tensors copied with ``non_blocking`` on a stream of
the stage's own, bf16 autocast), then the worker again with ``torch.compile`` while the budget
allows. Rows are sized from a short calibration so that each plain loop takes about
``TARGET_S``. GPU utilisation is sampled every ``SAMPLE_S`` during each run. Ray Data is
compared only where it imports (the lent machine has no Ray, and nothing can be installed there).

Every step is guarded: a step that would not fit the budget is skipped with the reason, one
that fails records its error and the run goes on; the JSON is rewritten after every step, so a
run cut short still leaves what it measured; a step still running ``OVERRUN_S`` after the budget
is cut off by a watchdog, which saves first. Exit status: 0; 1 if a step failed; 2 if no CUDA
device is there (without ``--dry-run``); 3 if the watchdog cut the run off.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import datetime as dt
import importlib
import json
import logging
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
import traceback
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch

from bench import gpu_models

RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")
DEFAULT_BUDGET_S = 420.0  # the lent machine's 8 minutes, less start-up and copying back
OVERRUN_S = 45.0  # a step still running this long after the budget is cut off: results so far are kept
TARGET_S = 25.0  # each plain loop's length on the GPU
SAMPLE_S = 0.2
FILES = 8
SHARD_BATCHES = 4  # antbatch shards of 4 batches: several per worker to read ahead


@dataclasses.dataclass(frozen=True)
class Workload:
    name: str
    model: str
    preprocess: str
    batch_size: int
    max_rows: int  # disk and data-writing time on the lent machine
    compile_s: float  # what torch.compile is expected to take there, for the budget guard


WORKLOADS = (
    Workload("images", "bench.gpu_models:build_resnet50", "bench.gpu_models:decode_images", 256, 24_576, compile_s=90),
    # Text batches are padded to their longest row: torch.compile meets several shapes (and recompiles).
    Workload("text", "bench.gpu_models:build_bert_base", "bench.gpu_models:tokenize", 256, 65_536, compile_s=150),
)
POSTPROCESS = "bench.gpu_models:top1"
NOT_MODEL = {"read", "preprocess", "postprocess", "write"}  # the worker's other stage clocks


class Budget:
    """Seconds left of the run; a step that would not fit is skipped, not started."""

    def __init__(self, total_s: float) -> None:
        self.total_s = total_s
        self.started = time.monotonic()

    def left(self) -> float:
        return self.total_s - (time.monotonic() - self.started)

    def allows(self, need_s: float) -> bool:
        return self.left() >= need_s


class UtilSampler:
    """GPU utilisation (%) every ``SAMPLE_S`` from a thread: NVML through torch, else nvidia-smi."""

    def __init__(self, enabled: bool) -> None:
        self.enabled = enabled
        self.samples: list[float] = []
        self.source: str | None = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="gpu-util", daemon=True)

    def __enter__(self) -> UtilSampler:
        if self.enabled:
            self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join()

    def _read(self) -> float | None:
        if self.source in (None, "nvml"):
            try:
                value = float(torch.cuda.utilization())
                self.source = "nvml"
                return value
            except Exception:  # no pynvml: fall back to the command line
                self.source = "nvidia-smi"
        try:
            out = subprocess.run(
                ["nvidia-smi", "--query-gpu=utilization.gpu", "--format=csv,noheader,nounits", "-i", "0"],
                capture_output=True,
                text=True,
                timeout=5,
                check=True,
            ).stdout
            return float(out.strip().splitlines()[0])
        except (OSError, subprocess.SubprocessError, ValueError, IndexError):
            self.source = "unavailable"
            return None

    def _loop(self) -> None:
        while not self._stop.wait(SAMPLE_S):
            value = self._read()
            if value is None and self.source == "unavailable":
                return
            if value is not None:
                self.samples.append(value)

    def summary(self) -> dict[str, Any]:
        if not self.samples:
            return {"gpu_util_source": self.source or "not sampled"}
        return {
            "gpu_util_mean": round(float(np.mean(self.samples)), 1),
            "gpu_util_p50": round(float(np.median(self.samples)), 1),
            "gpu_util_samples": len(self.samples),
            "gpu_util_source": self.source,
        }


# -- data --------------------------------------------------------------------------------------


def write_images(directory: str, rows: int, batch_size: int) -> list[str]:
    """``rows`` images in FILES files, row groups of one batch; 256 distinct pictures, repeated."""
    rng = np.random.default_rng(3)
    side = gpu_models.image_side()
    distinct = [gpu_models.encode_image(rng, side) for _ in range(min(256, rows))]
    return _write(directory, rows, batch_size, lambda ids: pa.array([distinct[i % len(distinct)] for i in ids]))


def write_texts(directory: str, rows: int, batch_size: int) -> list[str]:
    from bench.data import TextData, write_text

    files = write_text(directory, TextData(rows=rows, files=FILES, row_group_rows=batch_size))
    return files


def _write(directory: str, rows: int, batch_size: int, column: Any) -> list[str]:
    os.makedirs(directory, exist_ok=True)
    per_file = -(-rows // FILES)
    paths = []
    for index in range(FILES):
        ids = np.arange(index * per_file, min(rows, (index + 1) * per_file), dtype=np.int64)
        path = os.path.join(directory, f"part-{index:03d}.parquet")
        table = pa.table({"id": ids, "image": column(ids.tolist())})
        pq.write_table(table, path, row_group_size=batch_size, compression="none")  # pixels are deflated already
        paths.append(path)
    return paths


WRITERS = {"images": write_images, "text": write_texts}


# -- the systems -------------------------------------------------------------------------------


def _hook(ref: str) -> Any:
    module, _, name = ref.partition(":")
    return getattr(importlib.import_module(module), name)


def naive(work: Workload, files: list[str], out_dir: str, device: str, *, limit: int | None = None) -> dict[str, Any]:
    """The plain loop a user writes, at its best setting: bf16 autocast on the GPU, every core for torch."""
    model = _hook(work.model)().to(device)
    preprocess, postprocess = _hook(work.preprocess), _hook(POSTPROCESS)
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if device == "cuda" else contextlib.nullcontext()
    os.makedirs(out_dir, exist_ok=True)
    rows = 0
    started = time.perf_counter()
    for index, path in enumerate(files):
        tables = []
        for batch in pq.ParquetFile(path).iter_batches(batch_size=work.batch_size):
            inputs = preprocess(batch)
            with torch.inference_mode(), autocast:
                if isinstance(inputs, dict):
                    output = model(**{k: v.to(device) for k, v in inputs.items()})
                else:
                    output = model(inputs.to(device))
            labels = postprocess(output.float().cpu(), batch)["label"]
            tables.append(pa.table({"id": batch.column("id"), "label": labels}))
            rows += batch.num_rows
            if limit is not None and rows >= limit:
                break
        if tables:
            pq.write_table(pa.concat_tables(tables), os.path.join(out_dir, f"part-{index:03d}.parquet"))
        if limit is not None and rows >= limit:
            break
    seconds = time.perf_counter() - started
    return {"rows": rows, "seconds": round(seconds, 3), "rows_s": round(rows / seconds, 1)}


def antbatch(
    work: Workload, files: list[str], out_dir: str, device: str, *, compile_backend: str | None
) -> dict[str, Any]:
    """One antbatch worker in this process, planned and run as ``antbatch run`` would, timed whole."""
    from airflow_antbatch.planning import plan_job
    from airflow_antbatch.spec import JobSpec
    from airflow_antbatch.worker.run import process_started, run_worker

    started = time.perf_counter()
    since_process_start = time.monotonic() - process_started()  # the summary counts from there
    spec = JobSpec(
        input_uri=tuple(files),
        output_uri=out_dir,
        model=work.model,
        preprocess=work.preprocess,
        postprocess=POSTPROCESS,
        id_column="id",
        batch_size=work.batch_size,
        max_shard_rows=SHARD_BATCHES * work.batch_size,
        device=device,
        autocast_dtype="bfloat16" if device == "cuda" else None,
        compile=compile_backend,
    )
    plan_uri = plan_job(spec).plan_uri
    with WindowLog() as windows:
        summary = run_worker(plan_uri, "gpu-0", cpu_budget=os.cpu_count() or 1, progress_interval_s=0)
    seconds = time.perf_counter() - started
    if summary.outcome != "finished":
        raise RuntimeError(f"the antbatch worker ended {summary.outcome!r}: {summary.failed_for_good}")
    model_busy_s = sum(clock.get("busy_s", 0.0) for name, clock in summary.stages.items() if name not in NOT_MODEL)
    first_batch = summary.time_to_first_batch_s
    resized = [d for d in summary.scaling if d["processes_from"] != d["processes_to"]]
    return {
        "rows": summary.rows_committed,
        "seconds": round(seconds, 3),
        "rows_s": round(summary.rows_committed / seconds, 1),
        "worker_rows_s": round(summary.rows_per_s, 1),
        # From the step's start: planning, the model's load and (with torch.compile) its compile.
        "first_batch_s": None if first_batch is None else round(first_batch - since_process_start, 3),
        # What the model stage could score if never starved: rows per second of its busy time.
        "model_bound_rows_s": round(summary.rows_committed / model_busy_s, 1) if model_busy_s else None,
        "preprocess_processes": summary.preprocess_processes,
        "pool_sizes": [(d["at_s"], d["processes_to"]) for d in resized],  # seconds from the pipeline's start
        "windows": windows.lines,  # every scaling window's figures, decided or not
        "stages": {
            name: {k: v for k, v in clock.items() if k.endswith("_s")} for name, clock in summary.stages.items()
        },
    }


class WindowLog(logging.Handler):
    """The scaler's window figures (its debug log), kept for the result: a pool that grows late
    on the lent machine cannot be asked why afterwards."""

    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.lines: list[str] = []
        self._logger = logging.getLogger("airflow_antbatch.worker.scaling")
        self._level = self._logger.level
        self._wall_start = time.time()  # log records carry wall-clock times

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(f"{record.created - self._wall_start:.2f} s: {record.getMessage()}")

    def __enter__(self) -> WindowLog:
        self._logger.addHandler(self)
        self._logger.setLevel(logging.DEBUG)
        return self

    def __exit__(self, *exc: object) -> None:
        self._logger.removeHandler(self)
        self._logger.setLevel(self._level)


def labels(directory: str) -> dict[int, int]:
    """id -> label of every Parquet file under ``directory`` (antbatch's state folder skipped)."""
    out: dict[int, int] = {}
    for name in sorted(os.listdir(directory)):
        if name.endswith(".parquet"):
            table = pq.read_table(os.path.join(directory, name), columns=["id", "label"])
            out.update(zip(table.column("id").to_pylist(), table.column("label").to_pylist(), strict=True))
    return out


def agreement(naive_dir: str, antbatch_dir: str) -> dict[str, Any]:
    """Both systems scored every row once; the share of equal labels (bf16 kernels may differ a little)."""
    expected, got = labels(naive_dir), labels(antbatch_dir)
    if set(expected) != set(got):
        raise RuntimeError(f"antbatch wrote {len(got)} ids, the plain loop {len(expected)}: not the same rows")
    same = sum(expected[i] == got[i] for i in expected)
    return {"same_ids": True, "label_agreement": round(same / max(1, len(expected)), 4)}


def ray_status() -> dict[str, Any]:
    try:
        importlib.import_module("ray.data")
    except ImportError:
        return {"skipped": "Ray Data does not import here (the lent machine has no registry to install it from)"}
    return {"skipped": "Ray Data imports, but this check has no Ray variant yet"}


# -- the run -----------------------------------------------------------------------------------


class Run:
    """The steps of one check, each guarded, the result file rewritten after each."""

    def __init__(self, args: argparse.Namespace) -> None:
        self.dry = args.dry_run
        self.device = "cpu" if self.dry else "cuda"
        self.budget = Budget(args.budget_s)
        self.out = args.out
        self.work = tempfile.mkdtemp(prefix="antbatch-gpu-", dir=args.work)
        self.failed = False
        self.result: dict[str, Any] = {
            "command": "python3 -m bench.gpu" + (" --dry-run" if self.dry else ""),
            "dry_run": self.dry,
            "machine": machine(self.device),
            "budget_s": args.budget_s,
            "workloads": {},
            "ray": ray_status(),
        }

    def step(self, workload: str, name: str, need_s: float, call: Any, *, timed: bool = True) -> Any:
        record = self.result["workloads"].setdefault(workload, {})
        if not self.budget.allows(need_s):
            record[name] = {"skipped": f"needs about {need_s:.0f} s, {self.budget.left():.0f} s of the budget left"}
            self.save()
            return None
        print(f"[{self.budget.total_s - self.budget.left():6.1f}s] {workload}: {name}", flush=True)
        try:
            with UtilSampler(timed and self.device == "cuda") as sampler:
                value = call()
        except Exception as exc:
            self.failed = True
            record[name] = {"error": f"{type(exc).__name__}: {exc}", "traceback": traceback.format_exc()[-2000:]}
            print(f"  FAILED: {type(exc).__name__}: {exc}", file=sys.stderr, flush=True)
            value = None
        else:
            record[name] = {**value, **sampler.summary()} if timed else value
        self.save()
        return value

    def save(self) -> None:
        self.result["wall_s"] = round(self.budget.total_s - self.budget.left(), 1)
        self.result["finished_at"] = dt.datetime.now(dt.UTC).isoformat(timespec="seconds")
        os.makedirs(os.path.dirname(os.path.abspath(self.out)), exist_ok=True)
        with open(self.out, "w") as handle:
            json.dump(self.result, handle, indent=1)
            handle.write("\n")

    def workload(self, work: Workload) -> None:
        batch = 8 if self.dry else work.batch_size
        work = dataclasses.replace(work, batch_size=batch)
        root = os.path.join(self.work, work.name)
        rows = 4 * batch if self.dry else self._sized(work, root)
        if rows is None:
            return
        record = self.result["workloads"].setdefault(work.name, {})
        record.update(rows=rows, batch_size=batch)
        files = WRITERS[work.name](os.path.join(root, "in"), rows, batch)
        record["files"] = len(files)
        loop = self.step(work.name, "naive", 1.5 * TARGET_S, lambda: naive(work, files, f"{root}/naive", self.device))
        ours = self.step(
            work.name,
            "antbatch",
            TARGET_S,
            lambda: antbatch(work, files, f"{root}/antbatch", self.device, compile_backend=None),
        )
        if loop and ours:
            record["speedup"] = round(ours["rows_s"] / loop["rows_s"], 3)
            self.step(work.name, "check", 10, lambda: agreement(f"{root}/naive", f"{root}/antbatch"), timed=False)
        # A dry run goes through torch.compile once, on the smaller graph, with the eager backend
        # (no C++ toolchain needed): the code path, not the speed.
        backend = "eager" if self.dry else "inductor"
        if self.dry and work.name != "text":
            record["antbatch_compile"] = {"skipped": "a dry run compiles the text job only"}
            shutil.rmtree(root, ignore_errors=True)
            return
        compiled = self.step(
            work.name,
            "antbatch_compile",
            work.compile_s + TARGET_S,
            lambda: antbatch(work, files, f"{root}/compiled", self.device, compile_backend=backend),
        )
        if loop and compiled:
            record["speedup_compile"] = round(compiled["rows_s"] / loop["rows_s"], 3)
        shutil.rmtree(root, ignore_errors=True)

    def _sized(self, work: Workload, root: str) -> int | None:
        """Rows for about TARGET_S of the plain loop, from three batches of it (the first a warm-up)."""

        def calibrate() -> dict[str, Any]:
            files = WRITERS[work.name](os.path.join(root, "calibrate"), 4 * work.batch_size, work.batch_size)
            naive(work, files[:1], f"{root}/calibrate-out", self.device, limit=work.batch_size)
            timed = naive(work, files, f"{root}/calibrate-out", self.device, limit=2 * work.batch_size)
            rows = int(timed["rows_s"] * TARGET_S) // (FILES * work.batch_size) * FILES * work.batch_size
            return {**timed, "rows": max(FILES * work.batch_size, min(work.max_rows, rows))}

        found = self.step(work.name, "calibrate", 60, calibrate)
        return None if found is None else int(found["rows"])

    def _cut_off(self) -> None:
        """The watchdog: a step (a compile, say) ran far past the budget. Save what was measured
        and exit, so that the lent machine's own time limit never takes the results with it."""
        budget = self.budget.total_s
        self.result["cut_off"] = f"a step was still running {OVERRUN_S:.0f} s after the {budget:.0f} s budget"
        with contextlib.suppress(Exception):  # the main thread may be changing the result right now
            self.save()
        print(f"bench.gpu: {self.result['cut_off']}; partial results in {self.out}", file=sys.stderr, flush=True)
        shutil.rmtree(self.work, ignore_errors=True)
        os._exit(3)

    def main(self, workloads: list[str]) -> int:
        watchdog = threading.Timer(self.budget.total_s + OVERRUN_S, self._cut_off)
        watchdog.daemon = True
        watchdog.start()
        try:
            for work in WORKLOADS:
                if work.name in workloads:
                    self.workload(work)
        finally:
            watchdog.cancel()
            shutil.rmtree(self.work, ignore_errors=True)
            self.save()
        print(f"wrote {self.out} in {self.result['wall_s']} s", flush=True)
        return 1 if self.failed else 0


def machine(device: str) -> dict[str, Any]:
    out: dict[str, Any] = {"python": sys.version.split()[0], "torch": torch.__version__, "cpus": os.cpu_count()}
    if device == "cuda":
        out.update(gpu=torch.cuda.get_device_name(0), cuda=torch.version.cuda)
    return out


def default_out(dry_run: bool) -> str:
    folder = os.environ.get("OUT") or RESULTS
    return os.path.join(folder, "gpu-dry-run.json" if dry_run else "gpu.json")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--dry-run", action="store_true", help="CPU, toy models and data: a few seconds")
    parser.add_argument("--budget-s", type=float, default=DEFAULT_BUDGET_S, help="stop starting steps after this")
    parser.add_argument("--workloads", default=",".join(w.name for w in WORKLOADS))
    parser.add_argument("--out", help="result JSON (default: $OUT/gpu.json, else bench/results/gpu.json)")
    parser.add_argument("--work", help="scratch folder (default: the system's temp folder)")
    args = parser.parse_args(argv)
    args.out = args.out or default_out(args.dry_run)
    if args.dry_run:
        os.environ[gpu_models.TINY_ENV] = "1"
    elif not torch.cuda.is_available():
        print(
            f"bench.gpu: torch {torch.__version__} sees no CUDA device; run it on a GPU machine, "
            "or with --dry-run to check the script on a CPU",
            file=sys.stderr,
        )
        return 2
    return Run(args).main(args.workloads.split(","))


if __name__ == "__main__":
    sys.exit(main())
