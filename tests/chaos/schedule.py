"""Seeded fault schedules: which job to run, and which faults to inject when.

A schedule is a pure function of its seed and store, so a failing run is reproduced by its seed.
Each schedule has one main fault, taken in turn by seed so that every kind recurs across a run,
plus up to two more drawn at random. Even seeds start each worker with its slot (``--slot I/N``,
as the operators and the local launcher do), odd seeds without one (each worker walks the whole
ring of the plan from a point hashed from its id), so that both ways of claiming meet the faults.
"""

from __future__ import annotations

import dataclasses
import random

SIGKILL = "sigkill"  # the worker's whole pod is killed (every process of its group)
SIGTERM = "sigterm"  # preemption notice: the worker finishes what fits its drain, releases the rest, exits 75
PREPROCESS_KILL = "preprocess_kill"  # one preprocess child is killed (an OOM kill)
SIGSTOP = "sigstop"  # the pod freezes for longer than the lease TTL, then wakes: a zombie
DIE_BEFORE_COMMIT = "die_before_commit"  # killed after its output is durable, before the commit
STORE_OUTAGE = "store_outage"  # the object store process is stopped, then restarted

# Faults that may cost the leases the hit worker held (at most MAX_LEASES shards each).
LEASE_LOSING = frozenset({SIGKILL, SIGTERM, SIGSTOP, DIE_BEFORE_COMMIT})
LOCAL_KINDS = (SIGKILL, SIGTERM, PREPROCESS_KILL, SIGSTOP, DIE_BEFORE_COMMIT)
# Only a server can go away; local files cannot be made unavailable to root here.
STORE_KINDS = {"local": LOCAL_KINDS, "seaweedfs": (*LOCAL_KINDS, STORE_OUTAGE)}
TIMED_EXTRAS = (SIGKILL, SIGTERM, PREPROCESS_KILL, SIGSTOP)

LEASE_TTL_S = 3.0


@dataclasses.dataclass(frozen=True)
class Fault:
    kind: str
    at_s: float  # seconds after the job's first scored batch
    slot: int  # worker slot aimed at; another live one is hit if it has none running
    duration_s: float = 0.0  # SIGSTOP: stopped for; STORE_OUTAGE: down for, before the restart
    nth: int = 0  # DIE_BEFORE_COMMIT: dies on the nth shard its slot's first worker finishes


@dataclasses.dataclass(frozen=True)
class Schedule:
    seed: int
    store: str
    workers: int
    shards: int
    rows_per_shard: int
    batch_delay_s: float  # the slow tabular model's sleep per batch: faults land mid-shard
    lease_ttl_s: float
    faults: tuple[Fault, ...]
    slotted: bool = True  # workers get ``--slot I/N``; else each starts at a point hashed from its id
    drain_s: float = 0.0  # workers get ``--drain-s``: a SIGTERMed one first finishes what fits (NOTE [drain])

    def describe(self) -> str:
        slots = "" if self.slotted else ", no slots"
        drain = f", drain {self.drain_s:g} s" if self.drain_s else ""
        return (
            f"seed {self.seed} on {self.store}: {self.workers} workers{slots}{drain}, {self.shards} shards x "
            f"{self.rows_per_shard}"
        )


def make_schedule(seed: int, store: str, *, small: bool = False) -> Schedule:
    """The schedule of ``seed`` on ``store``; ``small`` keeps the job and the faults few (make test)."""
    rng = random.Random(f"{store}:{seed}")
    kinds = STORE_KINDS[store]
    workers = 3 if small else rng.randint(2, 4)
    ttl = LEASE_TTL_S
    chosen = [kinds[seed % len(kinds)]]
    chosen += [rng.choice(TIMED_EXTRAS) for _ in range(2 if small else rng.randint(0, 2))]
    faults = []
    for kind in chosen:
        at = round(rng.uniform(0.0, 3.0), 2)
        slot = rng.randrange(workers)
        if kind == SIGSTOP:
            faults.append(Fault(kind, at, slot, duration_s=round(ttl * rng.uniform(1.5, 2.5), 2)))
        elif kind == STORE_OUTAGE:
            faults.append(Fault(kind, at, slot, duration_s=round(ttl * rng.uniform(1.2, 2.0), 2)))
        elif kind == DIE_BEFORE_COMMIT:
            faults.append(Fault(kind, 0.0, slot, nth=rng.randint(1, 3)))
        else:
            faults.append(Fault(kind, at, slot))
    return Schedule(
        seed=seed,
        store=store,
        workers=workers,
        shards=40 if small else 4 * rng.randint(10, 20),  # a multiple of the 4 input files
        rows_per_shard=rng.choice((20, 30, 40)),
        batch_delay_s=0.1 if small else 0.15,
        lease_ttl_s=ttl,
        faults=tuple(sorted(faults, key=lambda f: f.at_s)),
        slotted=seed % 2 == 0,
        # A third of the seeds drain on SIGTERM, for about a shard of 0.1-0.15 s batches; drawn
        # from the seed alone, so every other draw of a schedule stays what it was.
        drain_s=2.0 if seed % 3 == 1 else 0.0,
    )


def zombie_schedule(store: str = "local") -> Schedule:
    """A schedule made to leave a zombie: one of two workers is stopped early for long enough
    that the other finishes its own run, steals the rest of the stopped one's, goes idle and
    takes its leases over; the stopped one then wakes holding tries that others committed."""
    ttl = LEASE_TTL_S
    return Schedule(
        seed=-1,
        store=store,
        workers=2,
        shards=16,
        rows_per_shard=20,
        batch_delay_s=0.1,
        lease_ttl_s=ttl,
        faults=(Fault(SIGSTOP, 0.5, 0, duration_s=round(7 * ttl, 2)),),
    )
