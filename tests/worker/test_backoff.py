"""A store that is unreachable for a while: the worker waits and carries on, losing nothing."""

from __future__ import annotations

import collections
import pathlib
import threading
import time
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from airflow_antbatch.errors import StoreError
from airflow_antbatch.examples import tabular
from airflow_antbatch.ledger import Ledger, WorkerIdentity
from airflow_antbatch.store import AtomicStore, is_transport_error
from airflow_antbatch.worker import backoff
from airflow_antbatch.worker.backoff import retry_store
from airflow_antbatch.worker.job_code import JobCode
from airflow_antbatch.worker.loop import Worker


def test_retry_store_waits_out_an_outage_and_gives_up_past_its_patience(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(backoff, "FIRST_DELAY_S", 0.01)
    calls = collections.Counter[str]()

    def flaky() -> str:
        calls["n"] += 1
        if calls["n"] < 4:
            raise StoreError("connection refused")
        return "ok"

    assert retry_store(flaky, what="reading", patience_s=5, stop=threading.Event()) == "ok" and calls["n"] == 4
    with pytest.raises(StoreError, match=r"connection refused \(gave up after"):
        retry_store(
            lambda: (_ for _ in ()).throw(StoreError("connection refused")),
            what="x",
            patience_s=0.05,
            stop=threading.Event(),
        )
    stopping = threading.Event()
    stopping.set()
    with pytest.raises(StoreError):  # a stopping worker does not wait
        retry_store(lambda: (_ for _ in ()).throw(StoreError("down")), what="x", patience_s=60, stop=stopping)


def test_client_errors_that_are_not_oserrors_count_as_store_errors() -> None:
    from botocore.exceptions import EndpointConnectionError

    assert is_transport_error(EndpointConnectionError(endpoint_url="http://127.0.0.1:1"))
    assert is_transport_error(ConnectionRefusedError())
    assert not is_transport_error(KeyError("a bug"))


def test_a_worker_rides_out_a_store_outage_and_commits_every_shard_once(
    plan_uri: str, transactions: tuple[pathlib.Path, pa.Table], monkeypatch: pytest.MonkeyPatch
) -> None:
    _, table = transactions
    ledger = Ledger.open(plan_uri)
    monkeypatch.setattr(backoff, "FIRST_DELAY_S", 0.05)
    down: list[float] = []  # the outage: 1.5 s from the first commit on, every request fails
    failures = collections.Counter[str]()

    def outage(real: Any, kind: str) -> Any:
        def call(self: AtomicStore, rel: str, *args: Any, **kwargs: Any) -> Any:
            if down and down[0] <= time.monotonic() < down[0] + 1.5:
                failures[kind] += 1
                raise StoreError(f"{kind} of {rel}: connection refused")
            result = real(self, rel, *args, **kwargs)
            if not down and kind == "create" and rel.startswith("commits/"):
                down.append(time.monotonic())
            return result

        return call

    for kind in ("create", "read", "put"):
        monkeypatch.setattr(AtomicStore, kind, outage(getattr(AtomicStore, kind), kind))

    def slow_preprocess(batch: pa.RecordBatch) -> Any:
        time.sleep(0.1)  # a job long enough for the outage to fall in its middle
        return tabular.preprocess(batch)

    code = JobCode.in_process(tabular.build_model(), preprocess=slow_preprocess, id_column="txn_id")
    summary = Worker(ledger, WorkerIdentity("w0"), code).run()
    assert failures["create"] > 0 and failures["put"] > 0 and summary.outcome == "finished"
    assert summary.shards_committed == 6 and summary.shards_failed == 0
    out = pathlib.Path(ledger.plan.spec.output_uri)
    ids = [i for r in ledger.commit_records() for i in pq.read_table(out / r.file)["txn_id"].to_pylist()]
    assert collections.Counter(ids) == collections.Counter(table["txn_id"].to_pylist())
