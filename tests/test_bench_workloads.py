"""bench/workloads.py's simulated devices: a device serves one call at a time, different devices
overlap, the wait uses no CPU, and every workload's models are built by one registry."""

from __future__ import annotations

import threading
import time

import pyarrow as pa
import pytest
import torch

from bench import workloads

PER_ROW_S = 0.002
ROWS = 100  # 0.2 s per call


@pytest.fixture
def device_time(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(workloads.DEVICE_S_PER_ROW_ENV, str(PER_ROW_S))


def _inputs() -> dict[str, torch.Tensor]:
    batch = pa.record_batch({"id": list(range(ROWS)), "text": ["a word or two, and more"] * ROWS})
    return workloads.tokenize(batch)


def _concurrently(calls: list[torch.nn.Module], inputs: dict[str, torch.Tensor]) -> tuple[float, float]:
    """Wall and CPU seconds of calling every model at once, one thread each."""
    threads = [threading.Thread(target=model, kwargs=inputs) for model in calls]
    wall, cpu = time.perf_counter(), time.process_time()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return time.perf_counter() - wall, time.process_time() - cpu


@pytest.mark.usefixtures("device_time")
def test_one_device_serves_one_call_at_a_time_without_cpu() -> None:
    inputs = _inputs()
    model = workloads.build_device_classifier()
    wall, cpu = _concurrently([model, model], inputs)
    assert wall >= 2 * ROWS * PER_ROW_S
    assert cpu < 0.5 * wall  # the device's hold is a sleep, not work


@pytest.mark.usefixtures("device_time")
def test_different_devices_overlap() -> None:
    inputs = _inputs()
    embed = workloads.build_device_embedder()
    head, reranker = workloads.build_device_head(), workloads.build_device_reranker()
    embedding = embed(**inputs)
    logits = head(embedding)["logits"]
    threads = [
        threading.Thread(target=head, args=(embedding,)),
        threading.Thread(target=reranker, args=(embedding, logits)),
    ]
    started = time.perf_counter()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert time.perf_counter() - started < 1.5 * ROWS * PER_ROW_S  # devices 1 and 2 at once (serially: 2x)


@pytest.mark.usefixtures("device_time")
def test_device_chain_scores_as_the_cpu_chain_is_called() -> None:
    inputs = _inputs()
    batch = pa.record_batch({"id": list(range(ROWS))})
    models = workloads.build_models("device_chain")
    out = workloads.top_k(workloads.run_chain(models, inputs, batch), batch)
    again = workloads.top_k(workloads.run_chain(workloads.build_models("device_chain"), inputs, batch), batch)
    assert out["top_class"].shape == (ROWS,)
    assert torch.equal(out["top3"], again["top3"])  # seeded weights: every system scores the same model


def test_an_unknown_workload_names_the_known_ones() -> None:
    with pytest.raises(ValueError, match="unknown workload 'gpu'; known: single, chain, device_single, device_chain"):
        workloads.build_models("gpu")
