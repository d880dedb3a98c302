"""bench/run.py's choices: which variants run where (baselines at their best, OpenMP's wait policy
both ways), and the flat figures the bars are judged on (each system's best, the ceiling, Ray's
steady state)."""

from __future__ import annotations

from typing import Any

import pytest

from bench import run
from bench.config import PROFILES


def names(workload: str) -> list[str]:
    return [v.name for v in run.variants(PROFILES["full"], workload, with_ray=True)]


def test_cpu_workloads_run_the_baselines_with_and_without_a_passive_wait() -> None:
    single = names("single")
    assert {"naive-t1", "naive-t2", "naive-t2-ompdefault", "bound", "bound-ompdefault", "antbatch"} <= set(single)
    assert "antbatch-pre-thread" in single
    assert "naive-t1-ompdefault" not in single  # one thread: nothing waits
    assert "ray-split-chain" not in single and "ray-split-chain" in names("chain")
    envs = {v.name: v.env({"OMP_WAIT_POLICY": "PASSIVE"}) for v in run.variants(PROFILES["full"], "single", True)}
    assert envs["naive-t2"]["OMP_WAIT_POLICY"] == "PASSIVE"
    assert "OMP_WAIT_POLICY" not in envs["naive-t2-ompdefault"]


def test_device_workloads_have_no_bound_and_try_preprocess_in_a_thread() -> None:
    device = names("device_chain")
    assert device[:1] == ["naive-t1"] and not any(n.startswith(("bound", "naive-t2")) for n in device)
    assert {"antbatch", "antbatch-pre-thread", "ray-split-chain"} <= set(device)
    quick = [v.name for v in run.variants(PROFILES["quick"], "device_chain", with_ray=True)]
    assert [n for n in quick if n.startswith("ray")] == ["ray-split-chain"]  # the form that overlaps devices
    cpu_chain = [v.name for v in run.variants(PROFILES["quick"], "chain", with_ray=True)]
    assert [n for n in cpu_chain if n.startswith("ray")] == ["ray"]


def variant(rows_s: float, **extra: Any) -> dict[str, Any]:
    return {
        "rows_s": rows_s,
        "cpu_util": 0.5,
        "peak_rss_mb": 100.0,
        "startup_s": 1.0,
        "threads": {},
        "rows": 2048,
        "batch_size": 256,
        "run_s": 2048 / rows_s,
        **extra,
    }


def test_each_system_counts_at_its_best_against_the_ceiling() -> None:
    stages = {"read": 0.02, "preprocess": 0.2, "model": 0.25, "postprocess": 0.01, "write": 0.02}
    out = run.summarise_workload(
        "single",
        {
            "naive-t1": variant(400, stages_s_per_batch=stages),
            "naive-t2-ompdefault": variant(500, stages_s_per_batch=stages),
            "antbatch": variant(600),
            "ray": variant(200, actors=[{"first_batch_after_s": 5.24}]),
            "bound": variant(900, rows_s_by_threads={"1": 500.0, "2": 900.0}),
            "bound-ompdefault": variant(1000, rows_s_by_threads={"1": 512.0, "2": 1000.0}),
        },
        None,
    )
    assert (out["naive_best_variant"], out["bound_best_variant"]) == ("naive-t2-ompdefault", "bound-ompdefault")
    assert out["bound_rows_s"] == 1000
    # 2 cores / (256 / 512 s of model + 0.25 s of the rest per batch) = 2 * 256 / 0.75
    assert out["ceiling_rows_s"] == pytest.approx(682.7, abs=0.1)
    assert out["antbatch_over_ceiling"] == pytest.approx(600 / 682.7, abs=1e-3)
    assert out["ray_rows_s_after_actor_ready"] == pytest.approx(2048 / (10.24 - 5.24), abs=0.1)
    assert out["antbatch_over_ray_steady"] == pytest.approx(600 / 409.6, abs=1e-3)


def test_the_device_ceiling_is_one_device_or_the_cores() -> None:
    # A chain of 3 devices at 0.2 s each per batch, 0.25 s of CPU work: one device is the limit.
    stages = {"read": 0.02, "preprocess": 0.2, "model": 0.6, "postprocess": 0.01, "write": 0.02}
    by_variant = {
        "naive-t1": variant(300, stages_s_per_batch=stages),
        "antbatch": variant(900),
        "antbatch-pre-thread": variant(1000),
    }
    out = run.summarise_workload("device_chain", by_variant, 0.0008)
    assert out["antbatch_best_variant"] == "antbatch-pre-thread"
    assert out["ceiling_rows_s"] == pytest.approx(256 / 0.2)
    assert out["antbatch_over_naive"] == pytest.approx(1000 / 300, abs=1e-3)
    assert out["bound_rows_s"] is None and out["device_s_per_row"] == 0.0008
