"""Progress lines in the worker's log: this worker's counts, its run, and an ETA, at no store cost."""

from __future__ import annotations

import logging
import re
import time

import pyarrow as pa
import pytest

from airflow_antbatch.examples import tabular
from airflow_antbatch.ledger import Ledger, WorkerIdentity
from airflow_antbatch.worker.job_code import JobCode
from airflow_antbatch.worker.loop import Worker

LINE = re.compile(
    r"progress: w0: (\d+) shards \((\d+) rows\) committed by this worker, [\d.]+ rows/s; "
    r"(\d+) shards left in its run, ETA (-|\d+s)"
)


def test_a_slow_job_logs_progress_lines_as_it_goes(plan_uri: str, caplog: pytest.LogCaptureFixture) -> None:
    ledger = Ledger.open(plan_uri)

    def slow_preprocess(batch: pa.RecordBatch) -> object:
        time.sleep(0.05)
        return tabular.preprocess(batch)

    code = JobCode.in_process(tabular.build_model(), preprocess=slow_preprocess, id_column="txn_id")
    with caplog.at_level(logging.INFO, logger="airflow_antbatch.worker.progress"):
        summary = Worker(ledger, WorkerIdentity("w0"), code, progress_interval_s=0.3).run()
    lines = [LINE.search(r.getMessage()) for r in caplog.records if r.name.endswith("progress")]
    assert len(lines) >= 3 and all(lines), [r.getMessage() for r in caplog.records]
    shards = [int(m.group(1)) for m in lines if m]
    assert shards == sorted(shards) and shards[-1] >= 1
    assert any(m.group(4) != "-" for m in lines if m)  # an ETA once something is committed
    # the roster and an idle poll (2 listings each) and the sweep (commits, releases): never a line's
    assert summary.requests.get("list", 0) <= 6
