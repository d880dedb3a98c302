"""A model stage's clock tells the scaler whether the stage computes or waits on a device."""

from __future__ import annotations

import threading
import time

import pyarrow as pa
import pytest
import torch

from airflow_antbatch.spec import ModelStage
from airflow_antbatch.worker.model_stage import ModelRunner, ScoringStage
from airflow_antbatch.worker.scaling import ON_CPU_SHARE, CpuSample, ElasticScaler
from airflow_antbatch.worker.stages import DONE, Channel, Chunk, Flow, ShardWork

BATCHES = 6


class OnDevice(torch.nn.Module):
    """Holds the thread 50 ms per batch without computing, as a stage waiting on an accelerator does."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        time.sleep(0.05)
        return x * 2


class OnCpu(torch.nn.Module):
    """Computes for about as long."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        started, y = time.thread_time(), x
        while time.thread_time() - started < 0.05:
            y = torch.tanh(y @ torch.eye(x.shape[1]))
        return y


def run_stage(model: torch.nn.Module, scaler: ElasticScaler) -> ScoringStage:
    flow = Flow(threading.Event(), quarantine_limit=0)
    flow.shards["s"] = ShardWork(lease=None, shard=None)  # type: ignore[arg-type]
    stage = ScoringStage(flow, ModelRunner(ModelStage(name="m", model="x"), model), 0, scaler)
    inbox, outbox = Channel(flow.abort, depth=BATCHES + 1), Channel(flow.abort, depth=BATCHES + 1)
    stage.wire(inbox, outbox)
    batch = pa.record_batch({"x": list(range(64))})
    for _ in range(BATCHES):
        inbox.put(Chunk("s", batch, torch.ones(64, 64)), stage.clock)
    inbox.put(DONE, stage.clock)
    thread = threading.Thread(target=stage.run)
    thread.start()
    thread.join(timeout=30)
    assert not thread.is_alive()
    assert stage.clock.rows == 64 * BATCHES
    return stage


@pytest.mark.parametrize(("model", "computes"), [(OnDevice(), False), (OnCpu(), True)])
def test_a_stage_that_waits_on_a_device_is_told_from_one_that_computes(model: torch.nn.Module, computes: bool) -> None:
    scaler = ElasticScaler(cpu_budget=2, cpu_model_stages=1)
    clock = run_stage(model, scaler).clock
    assert (clock.cpu_s >= ON_CPU_SHARE * clock.busy_s) is computes, clock
    # fed to the scaler over a window, the clock decides whether the stage holds cores
    scaler.observe(0.0, [type(clock)(rows=1)], now=0.0, cpu=CpuSample(0.0, 0.0))
    scaler.observe(0.0, [clock], now=1.0, cpu=CpuSample(clock.cpu_s, 0.0))
    assert scaler.on_cpu(0) is computes
