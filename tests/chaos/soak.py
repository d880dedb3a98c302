"""The soak: many workers over thousands of small shards on local files, no faults.

It shows that exactly-once holds when claims race hardest (every worker walks every shard)
and what the ledger costs per shard then, from the request counts the workers' stores kept.
"""

from __future__ import annotations

import dataclasses
import pathlib
import time
from collections import Counter
from typing import Any

from airflow_antbatch.planning import plan_job
from airflow_antbatch.spec import JobSpec
from airflow_antbatch.worker.local import run_local_workers
from tests.chaos.check import Verdict, check_job
from tests.conftest import TABULAR, write_transactions

INPUT_FILES = 4
LEASE_TTL_S = 30.0


@dataclasses.dataclass
class SoakResult:
    workers: int
    shards: int
    verdict: Verdict
    exit_codes: list[int]
    requests: dict[str, int]  # summed over the workers' summaries, by kind
    seconds: float

    @property
    def ledger_requests_per_shard(self) -> float:
        return sum(n for kind, n in self.requests.items() if kind != "heartbeat") / self.shards

    @property
    def ok(self) -> bool:
        return self.verdict.exactly_once and self.exit_codes == [0] * self.workers

    def to_dict(self) -> dict[str, Any]:
        doc = dataclasses.asdict(self)
        doc["ledger_requests_per_shard"] = round(self.ledger_requests_per_shard, 2)
        return doc


def run_soak(workdir: pathlib.Path, *, workers: int = 16, shards: int = 2000, rows_per_shard: int = 10) -> SoakResult:
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
        lease_ttl_s=LEASE_TTL_S,
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
    seconds = time.monotonic() - started
    requests: Counter[str] = Counter()
    for result in results:
        requests.update((result["summary"] or {}).get("requests", {}))
    return SoakResult(
        workers=workers,
        shards=shards,
        verdict=check_job(planned.plan_uri, {}, Counter(table.column("txn_id").to_pylist())),
        exit_codes=[r["exit_code"] for r in results],
        requests=dict(sorted(requests.items())),
        seconds=seconds,
    )
