"""The soak: many real worker processes over thousands of small shards on local files, no faults.

It shows that exactly-once holds with many workers claiming side by side (each walks its slot's
run of the plan, then steals halves of others' runs), what the ledger costs per shard then, from
the request counts the workers' stores kept, and how long the job's end takes: from the last
commit until ``done.json``, until every worker's final heartbeat (it saw ``done.json``), and
until every process has exited.
"""

from __future__ import annotations

import dataclasses
import pathlib
import time
from collections import Counter
from typing import Any

from airflow_antbatch import layout
from airflow_antbatch.ledger import Ledger
from airflow_antbatch.planning import plan_job
from airflow_antbatch.spec import JobSpec
from airflow_antbatch.worker.local import run_local_workers
from tests.chaos.check import Verdict, check_job, modified_times
from tests.conftest import TABULAR, write_transactions

INPUT_FILES = 4
LEASE_TTL_S = 30.0
# Issue 13's bar: ledger requests per shard, heartbeats aside, at 24 real workers.
MAX_REQUESTS_PER_SHARD = 6.0


@dataclasses.dataclass
class SoakResult:
    workers: int
    shards: int
    verdict: Verdict
    exit_codes: list[int]
    requests: dict[str, int]  # summed over the workers' summaries, by kind
    claiming: dict[str, int]  # the workers' claim statistics, summed: claims, collisions, steals, ...
    seconds: float
    done_s: float  # from the last commit until done.json was written
    tail_s: float  # from the last commit until the last worker's final heartbeat (it saw done.json)
    exit_s: float  # from the last commit until the last process exited (teardown on busy cores included)
    lease_ttl_s: float

    @property
    def ledger_requests_per_shard(self) -> float:
        return sum(n for kind, n in self.requests.items() if kind != "heartbeat") / self.shards

    @property
    def ok(self) -> bool:
        return (
            self.verdict.exactly_once
            and self.exit_codes == [0] * self.workers
            and self.ledger_requests_per_shard <= MAX_REQUESTS_PER_SHARD
        )

    def to_dict(self) -> dict[str, Any]:
        doc = dataclasses.asdict(self)
        doc["ledger_requests_per_shard"] = round(self.ledger_requests_per_shard, 2)
        return doc


def run_soak(
    workdir: pathlib.Path,
    *,
    workers: int = 16,
    shards: int = 2000,
    rows_per_shard: int = 10,
    lease_ttl_s: float = LEASE_TTL_S,
) -> SoakResult:
    """``workers`` local worker processes over ``shards`` shards; the checker verifies the output."""
    table = write_transactions(
        workdir / "in",
        files=INPUT_FILES,
        rows_per_file=shards // INPUT_FILES * rows_per_shard,
        row_group_size=rows_per_shard,
    )
    spec = JobSpec(
        input_uri=str(workdir / "in"),
        output_uri=str(workdir / "out"),
        model=f"{TABULAR}:build_model",
        preprocess=f"{TABULAR}:preprocess",
        postprocess=f"{TABULAR}:postprocess",
        id_column="txn_id",
        batch_size=rows_per_shard,
        max_shard_rows=rows_per_shard,
        lease_ttl_s=lease_ttl_s,
    )
    planned = plan_job(spec)
    assert len(planned.plan.shards) == shards, len(planned.plan.shards)
    started = time.monotonic()
    results = run_local_workers(
        planned.plan_uri,
        [f"worker-{i}" for i in range(workers)],
        cpu_budget=1,
        preprocess_workers=0,  # 16 preprocess pools on a small machine would measure the pools, not the ledger
        torch_threads=1,
    )
    ended = time.time()
    seconds = time.monotonic() - started
    requests: Counter[str] = Counter()
    claiming: Counter[str] = Counter()
    for result in results:
        requests.update((result["summary"] or {}).get("requests", {}))
        claiming.update((result["summary"] or {}).get("claiming", {}))
    ledger = Ledger.open(planned.plan_uri)
    last_commit = max(modified_times(ledger.store, layout.COMMITS_DIR).values(), default=ended)
    done_at = modified_times(ledger.store, "", recursive=False).get(layout.DONE_FILE, ended)
    beats = [ledger.read_heartbeat(token) for token in ledger.worker_versions()]
    last_beat = max((float(beat["time"]) for beat in beats if beat is not None), default=ended)
    return SoakResult(
        workers=workers,
        shards=shards,
        verdict=check_job(planned.plan_uri, {}, Counter(table.column("txn_id").to_pylist())),
        exit_codes=[r["exit_code"] for r in results],
        requests=dict(sorted(requests.items())),
        claiming=dict(sorted(claiming.items())),
        seconds=seconds,
        done_s=done_at - last_commit,
        tail_s=last_beat - last_commit,
        exit_s=ended - last_commit,
        lease_ttl_s=lease_ttl_s,
    )
