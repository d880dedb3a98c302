"""The pipelined worker end to end in-process: chains, order, elastic scaling, dying preprocess processes.

A record that kills a process is quarantined by the pool, which only preprocesses a shard's
first try once its processes are ready (before that the worker preprocesses first tries itself,
and such a record kills the worker: test_pool_start). The tests that kill processes therefore
give the worker second tries (``retried=True``), all of which go to the pool."""

from __future__ import annotations

import pathlib
import time
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from airflow_antbatch.examples import tabular
from airflow_antbatch.finalize import finalize_job
from airflow_antbatch.ledger import Lease, Ledger, WorkerIdentity
from airflow_antbatch.planning import plan_job
from airflow_antbatch.spec import JobSpec, ModelStage
from airflow_antbatch.worker.inference import OutputAssembler
from airflow_antbatch.worker.job_code import JobCode
from airflow_antbatch.worker.loop import Worker, WorkerSummary
from airflow_antbatch.worker.model_stage import ModelRunner
from airflow_antbatch.worker.pipeline import PipelineOptions
from tests import chain_models
from tests.conftest import TABULAR, write_transactions

FAULTS = "tests.fault_hooks"
CHAIN = "tests.chain_models"


def _run(
    spec: JobSpec, code: JobCode | None = None, *, retried: bool = False, **options: Any
) -> tuple[WorkerSummary, Ledger]:
    plan_uri = plan_job(spec).plan_uri
    ledger = Ledger.open(plan_uri)
    if retried:
        second_tries(ledger, [s.shard_id for s in ledger.plan.shards])
    pipeline_options = PipelineOptions(**{"cpu_budget": 2, **options})
    summary = Worker(ledger, WorkerIdentity("w0"), code or JobCode.load(spec), options=pipeline_options).run()
    return summary, ledger


def second_tries(ledger: Ledger, shard_ids: list[str]) -> None:
    """Make the next claims of these shards second tries: another worker took the first and gave it back."""
    for shard_id in shard_ids:
        lease = ledger.try_claim(shard_id, WorkerIdentity("w-before"))
        assert isinstance(lease, Lease)
        ledger.release(lease, reason="preempted", failed=False)


def _output(ledger: Ledger) -> pa.Table:
    root = pathlib.Path(ledger.plan.spec.output_uri)
    return pa.concat_tables(pq.read_table(root / r.file) for r in ledger.commit_records())


def _spec(tmp_path: pathlib.Path, **fields: Any) -> JobSpec:
    base: dict[str, Any] = {
        "input_uri": str(tmp_path / "in"),
        "output_uri": str(tmp_path / "out"),
        "model": f"{TABULAR}:build_model",
        "preprocess": f"{FAULTS}:preprocess",
        "postprocess": f"{TABULAR}:postprocess",
        "id_column": "txn_id",
        "batch_size": 50,
        "max_shard_rows": 250,
        "lease_ttl_s": 30.0,
    }
    return JobSpec(**{**base, **fields})


def _poisoned_input(tmp_path: pathlib.Path, merchants: dict[int, str]) -> pa.Table:
    """2 files x 500 rows; the rows with the given ids get the given merchant."""
    table = write_transactions(tmp_path / "in", files=2, rows_per_file=500, row_group_size=250)
    for path in sorted((tmp_path / "in").glob("*.parquet")):
        part = pq.read_table(path)
        pairs = zip(part["txn_id"].to_pylist(), part["merchant"].to_pylist(), strict=True)
        names = [merchants.get(i, m) for i, m in pairs]
        part = part.set_column(part.schema.get_field_index("merchant"), "merchant", pa.array(names))
        pq.write_table(part, path, row_group_size=250)
    return table


@pytest.mark.parametrize("death", ["exit", "segv", "kill"])
def test_a_record_that_kills_preprocess_is_quarantined_and_nothing_else_is_lost(
    tmp_path: pathlib.Path, death: str
) -> None:
    table = _poisoned_input(tmp_path, {321: f"POISON-{death}"})
    summary, ledger = _run(_spec(tmp_path), retried=True)
    assert summary.outcome == "finished" and summary.shards_failed == 0
    ids = _output(ledger)["txn_id"].to_pylist()
    expected = [i for i in table["txn_id"].to_pylist() if i != 321]
    assert sorted(ids) == expected  # every other row exactly once
    assert summary.rows_quarantined == 1 and summary.preprocess_restarts >= 2
    [record] = [r for r in ledger.commit_records() if r.quarantined]
    quarantine = pathlib.Path(ledger.plan.spec.output_uri) / str(record.quarantine_file)
    bad = pq.read_table(quarantine)
    assert bad["txn_id"].to_pylist() == [321]
    reason = bad["_antbatch_reason"][0].as_py()
    assert {"exit": "exited with code 3", "segv": "SIGSEGV", "kill": "SIGKILL"}[death] in reason
    manifest = finalize_job(ledger.plan_uri)
    assert manifest["rows"] == 999 and manifest["quarantined_rows"] == 1
    assert manifest["quarantine_files"] == [str(quarantine)]


def test_a_process_that_dies_once_is_replaced_and_its_batch_retried(tmp_path: pathlib.Path) -> None:
    table = _poisoned_input(tmp_path, {77: f"FLAKY:{tmp_path / 'died-once'}"})
    summary, ledger = _run(_spec(tmp_path), retried=True)
    assert (tmp_path / "died-once").exists()
    assert summary.preprocess_restarts == 1 and summary.rows_quarantined == 0
    assert sorted(_output(ledger)["txn_id"].to_pylist()) == table["txn_id"].to_pylist()


def test_more_bad_records_than_the_limit_fail_the_shard(tmp_path: pathlib.Path) -> None:
    _poisoned_input(tmp_path, {10: "POISON-exit", 20: "POISON-exit"})
    summary, ledger = _run(_spec(tmp_path, quarantine_limit=1, max_shard_attempts=1), retried=True)
    assert len(summary.failed_for_good) == 1
    [(_, error)] = ledger.status().failures
    assert "2 bad records, more than quarantine_limit=1" in error and "exited with code 3" in error
    assert ledger.status().committed == len(ledger.plan.shards) - 1  # the other shards are not held back


@pytest.mark.parametrize("preprocess_workers", [None, 0], ids=["processes", "thread"])
def test_a_record_the_hook_raises_on_is_quarantined_and_the_shard_completes(
    tmp_path: pathlib.Path, preprocess_workers: int | None
) -> None:
    table = _poisoned_input(tmp_path, {620: "RAISE"})
    summary, ledger = _run(_spec(tmp_path, max_shard_attempts=1), preprocess_workers=preprocess_workers)
    assert summary.failed_for_good == [] and summary.rows_quarantined == 1
    assert summary.preprocess_restarts == 0  # an exception costs no process
    [record] = [r for r in ledger.commit_records() if r.quarantined]
    bad = pq.read_table(pathlib.Path(ledger.plan.spec.output_uri) / str(record.quarantine_file))
    assert bad["txn_id"].to_pylist() == [620]
    [reason] = bad["_antbatch_reason"].to_pylist()
    assert (
        "preprocess hook raised ValueError(\"cannot parse merchant 'RAISE'\")" in reason and "fault_hooks.py" in reason
    )
    assert sorted(_output(ledger)["txn_id"].to_pylist()) == [i for i in table["txn_id"].to_pylist() if i != 620]


@pytest.mark.parametrize("preprocess_workers", [None, 0], ids=["processes", "thread"])
def test_a_hook_that_raises_on_every_record_fails_the_shard_at_the_quarantine_limit(
    tmp_path: pathlib.Path, preprocess_workers: int | None
) -> None:
    _poisoned_input(tmp_path, {i: "RAISE" for i in range(250)})  # the whole first shard
    summary, ledger = _run(
        _spec(tmp_path, max_shard_attempts=1, quarantine_limit=3), preprocess_workers=preprocess_workers
    )
    assert len(summary.failed_for_good) == 1
    [(_, error)] = ledger.status().failures
    assert "bad records, more than quarantine_limit=3 (e.g. preprocess hook raised ValueError" in error
    assert ledger.status().committed == len(ledger.plan.shards) - 1


def test_rows_keep_their_order_when_processes_finish_out_of_order(tmp_path: pathlib.Path) -> None:
    table = write_transactions(tmp_path / "in", files=1, rows_per_file=1000, row_group_size=500)
    spec = _spec(tmp_path, preprocess=f"{FAULTS}:jittery_preprocess", batch_size=100, max_shard_rows=1000)
    summary, ledger = _run(spec, cpu_budget=3, preprocess_workers=3)
    assert summary.preprocess_processes == 3
    assert _output(ledger)["txn_id"].to_pylist() == table["txn_id"].to_pylist()


def test_preprocess_heavy_work_grows_the_pool_and_shrinks_torch_threads(
    tmp_path: pathlib.Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("OMP_WAIT_POLICY", raising=False)  # spinning threads: they make room (test_scaling)
    write_transactions(tmp_path / "in", files=2, rows_per_file=1500, row_group_size=500)
    spec = _spec(tmp_path, preprocess=f"{FAULTS}:slow_preprocess", max_shard_rows=500)
    summary, _ = _run(spec, cpu_budget=4, scale_interval_s=0.5)
    grew = [d for d in summary.scaling if d["processes_to"] > d["processes_from"]]
    assert grew, summary.scaling
    assert "preprocess is the bottleneck" in grew[0]["reason"]
    assert grew[0]["torch_threads"] == 4 - grew[0]["processes_to"]  # the model stage makes room
    assert summary.rows_committed == 3000


def test_model_heavy_work_keeps_one_preprocess_process(tmp_path: pathlib.Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("ANTBATCH_TEST_BATCH_DELAY", "0.06")  # read by the model, in this process
    write_transactions(tmp_path / "in", files=2, rows_per_file=1500, row_group_size=500)
    spec = _spec(tmp_path, model="tests.slow_model:build_slow_model", max_shard_rows=500)
    summary, _ = _run(spec, cpu_budget=4, scale_interval_s=0.5)
    assert summary.preprocess_processes == 1
    assert all(d["processes_to"] == 1 for d in summary.scaling), summary.scaling
    assert summary.rows_committed == 3000


def test_a_chain_with_its_own_batch_sizes_matches_the_models_run_by_hand(tmp_path: pathlib.Path) -> None:
    table = write_transactions(tmp_path / "in", files=2, rows_per_file=500, row_group_size=250)
    stages = [
        {"name": "embed", "model": f"{CHAIN}:build_embedder", "batch_size": 64, "output_column": "embedding"},
        {"name": "classify", "model": f"{CHAIN}:build_classifier", "batch_size": 100},
        {"name": "rerank", "model": f"{CHAIN}:build_reranker", "batch_size": 37, "adapter": f"{CHAIN}:rerank_input"},
    ]
    spec = _spec(
        tmp_path,
        model=None,
        stages=stages,
        preprocess=f"{TABULAR}:preprocess",
        postprocess=f"{CHAIN}:score_column",
    )
    summary, ledger = _run(spec)
    assert summary.rows_committed == 1000
    assert set(summary.stages) >= {"read", "preprocess", "embed", "classify", "rerank", "postprocess", "write"}
    out = _output(ledger).sort_by("txn_id")
    assert out.column_names == ["txn_id", "score", "embedding"]
    whole = table.combine_chunks().to_batches()[0]
    with torch.inference_mode():
        features = tabular.preprocess(whole)
        embedding = chain_models.build_embedder()(features)
        classified = chain_models.build_classifier()(embedding)
        expected = chain_models.build_reranker()(chain_models.rerank_input(classified, whole))
    assert out["txn_id"].to_pylist() == table["txn_id"].to_pylist()
    assert np.allclose(out["score"].to_numpy(), expected[:, 0].numpy(), atol=1e-5)
    got_embedding = np.array(out["embedding"].to_pylist(), dtype=np.float32)
    assert np.allclose(got_embedding, embedding.numpy(), atol=1e-5)


def test_preprocess_in_a_thread_when_asked(tmp_path: pathlib.Path) -> None:
    table = write_transactions(tmp_path / "in", files=1, rows_per_file=500, row_group_size=250)
    summary, ledger = _run(_spec(tmp_path), preprocess_workers=0)
    assert summary.preprocess_processes == 0 and summary.scaling == []
    assert _output(ledger)["txn_id"].to_pylist() == table["txn_id"].to_pylist()


class DeviceHold(torch.nn.Module):
    """A simulated device: holds each batch for a fixed time without using the CPU."""

    def __init__(self, hold_s: float) -> None:
        super().__init__()
        self.hold_s = hold_s

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        time.sleep(self.hold_s)
        return x[:, :1]


def test_a_chain_of_models_on_three_devices_scores_them_at_once(tmp_path: pathlib.Path) -> None:
    write_transactions(tmp_path / "in", files=1, rows_per_file=1500, row_group_size=1500)
    spec = _spec(tmp_path, batch_size=50, max_shard_rows=1500)  # one shard of 30 batches
    runners = [
        ModelRunner(ModelStage(name=f"device{i}", model="<in-process>", batch_size=50), DeviceHold(0.05))
        for i in range(3)
    ]
    code = JobCode(runners, OutputAssembler(id_column="txn_id"), tabular.preprocess)
    summary, _ = _run(spec, code)
    assert summary.rows_committed == 1500
    held = [summary.stages[f"device{i}"]["busy_s"] for i in range(3)]
    assert all(h >= 30 * 0.05 for h in held), held
    # One after the other the devices would take the sum of their busy times; each in its own
    # thread, about one device's time (plus two batches to fill the chain).
    assert summary.seconds < 0.6 * sum(held), (summary.seconds, held)
