"""The two profiles of the harness: ``quick`` and ``full`` (docs/benchmarks.md, "Commands", says
how long each took on its last run).

Both run the same systems on the same kind of data; ``full`` has more rows, more repeats and
tries more Ray Data configurations. On a quiet 2-core machine a batch of 256 rows costs about
0.2 s to tokenise and 0.2-0.3 s to score, and every run pays a fixed ~3 s to start a process
and import torch (~12 s for Ray: ``ray.init``, a warm-up job, shutdown), so ``quick`` keeps the
CPU workloads' timed runs to a few seconds (8 batches single, 4 chain); ``full`` (32 and 16
batches, 3 repeats) runs long enough for the pipeline's start and Ray's actor start to weigh
less.

The device workloads (*device_single*, *device_chain*) hold simulated devices for a time per
row sized to the tokenizer's (``bench.run`` measures it first), so a batch's preprocessing
and each device's work cost about the same; they run longer (more batches) because their
bars are about overlap, and a pipeline's fill and fixed start are paid once per job.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from bench.data import TextData


@dataclasses.dataclass(frozen=True)
class StragglerConfig:
    workers: int = 4
    shards: int = 48
    rows_per_shard: int = 200
    slowdown: float = 2.0  # the throttled worker's model sleeps this many times longer
    repeats: int = 1


@dataclasses.dataclass(frozen=True)
class Profile:
    name: str
    single: TextData
    chain: TextData
    device_single: TextData
    device_chain: TextData
    repeats: int
    batch_size: int = 256
    max_shard_rows: int = 512  # antbatch shards of 2 batches, so even the quick job has several to read ahead
    naive_threads: tuple[int, ...] = (1, 2)
    bound_batches: int = 4
    # The bound is compute on in-memory inputs, the steadiest figure here: quick takes it once.
    bound_repeats: int | None = None  # None: every repeat
    # Ray Data configurations tried (a "workloads" key limits one to those); the best median is
    # reported. See bench/systems/ray_data.py.
    ray_variants: tuple[dict[str, Any], ...] = ()
    straggler: StragglerConfig = StragglerConfig()

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


# Preprocess tasks at 0.5 CPU keep Ray from fusing them into the model actor (fused, the actor
# tokenises and scores one batch after the other, like the naive loop).
RAY_BEST = {"name": "ray", "num_cpus": 2, "pre_cpus": 0.5, "actor_cpus": 1, "threads": 1, "chain_mode": "fused"}
# One actor per model: on simulated devices, the only way Ray overlaps the three devices.
RAY_SPLIT = {**RAY_BEST, "name": "ray-split-chain", "chain_mode": "split"}
CPU_WORKLOADS = ("single", "chain")

PROFILES = {
    "quick": Profile(
        name="quick",
        single=TextData(rows=2048, files=2, row_group_rows=256),
        chain=TextData(rows=1024, files=2, row_group_rows=256),
        # 32 and 24 batches: a pipeline over k devices needs about k batches to fill, and the
        # fixed start must stay small beside the devices' time for overlap to show.
        device_single=TextData(rows=8192, files=4, row_group_rows=256, seed=8),
        device_chain=TextData(rows=6144, files=3, row_group_rows=256, seed=9),
        repeats=2,
        bound_repeats=1,
        # Quick tries Ray's fused chain on the CPU chain and its split chain on the device chain,
        # the better of the two on each (full tries both on both).
        ray_variants=(
            {**RAY_BEST, "workloads": ("single", "chain", "device_single")},
            {**RAY_SPLIT, "workloads": ("device_chain",)},
        ),
        # 96 shards of 100 rows: whole shards alone keep 32 of 200 rows at least 1.075x over the ideal.
        # The median of three runs: one run of 3 s scattered 1.015-1.055x the ideal, 10 runs of
        # the same code here, and once gave 1.054x in quick.json.
        straggler=StragglerConfig(shards=96, rows_per_shard=100, repeats=3),
    ),
    "full": Profile(
        name="full",
        single=TextData(rows=8192, files=4, row_group_rows=1024),
        chain=TextData(rows=4096, files=4, row_group_rows=512),
        device_single=TextData(rows=16384, files=4, row_group_rows=1024, seed=8),
        device_chain=TextData(rows=12288, files=4, row_group_rows=1024, seed=9),
        repeats=3,
        bound_batches=8,
        max_shard_rows=2048,
        ray_variants=(RAY_BEST, {**RAY_BEST, "name": "ray-fused-pre", "pre_cpus": 1}, RAY_SPLIT),
        straggler=StragglerConfig(shards=96, repeats=3),
    ),
}
