"""The scale benchmark's own parts (bench/simclock.py, bench/simstore.py, bench/scale.py): the
virtual clock wakes threads in time order, the simulated store keeps AtomicStore's contract and
counts what it should, and a tiny run of the real claiming code reports finite figures."""

from __future__ import annotations

import math
import threading

import pytest

from bench.scale import Config, run_scale
from bench.simclock import SimClock, SimStallError
from bench.simstore import LIST_PAGE, SimStore, listing_prefix, prefix_of


def test_clock_wakes_threads_in_virtual_time_order() -> None:
    sim = SimClock()
    seen: list[tuple[str, float]] = []

    def sleeper(name: str, delays: list[float]) -> None:
        for d in delays:
            sim.sleep(d)
            seen.append((name, sim.now()))

    sim.spawn(sleeper, "a", [3.0, 3.0])  # wakes at 3, 6
    sim.spawn(sleeper, "b", [1.0, 4.0])  # wakes at 1, 5
    sim.spawn(sleeper, "c", [3.0])  # wakes at 3, after a (queued later)
    sim.run()
    assert seen == [("b", 1.0), ("a", 3.0), ("c", 3.0), ("b", 5.0), ("a", 6.0)]
    assert sim.now() == 6.0


def test_clock_reports_a_thread_that_raises_and_one_that_blocks_outside_sleep() -> None:
    sim = SimClock()

    def boom() -> None:
        sim.sleep(1.0)
        raise ValueError("boom")

    sim.spawn(boom)
    with pytest.raises(RuntimeError, match="boom"):
        sim.run()

    stuck = SimClock()
    never = threading.Event()
    stuck.spawn(lambda: never.wait(5))
    with pytest.raises(SimStallError, match="no simulated thread moved"):
        stuck.run(stall_s=0.5)
    never.set()


def test_store_keeps_atomic_store_contract_and_counts_pages() -> None:
    sim = SimClock()
    store = SimStore(sim)
    results: dict[str, object] = {}

    def client() -> None:
        results["first"] = store.create("claims/ab/00001-aaaaaaaa/0000.json", b"1")
        results["second"] = store.create("claims/ab/00001-aaaaaaaa/0000.json", b"2")
        results["read"] = store.read("claims/ab/00001-aaaaaaaa/0000.json")
        results["missing"] = store.read("commits/ab/00001-aaaaaaaa.json")
        for i in range(LIST_PAGE + 1):
            store.put(f"workers/w{i:05d}.json", b"x", kind="heartbeat")
        results["listed"] = store.list("workers")
        results["claims"] = store.list("claims")
        results["at"] = sim.now()

    sim.spawn(client)
    sim.run()
    assert results["first"] is True and results["second"] is False
    assert results["read"] == b"1" and results["missing"] is None
    listed = results["listed"]
    assert isinstance(listed, list) and len(listed) == LIST_PAGE + 1 and listed == sorted(listed)
    assert results["claims"] == ["ab/00001-aaaaaaaa/0000.json"]
    assert store.counts == {"create": 2, "read": 2, "heartbeat": LIST_PAGE + 1, "list": 2 + 1}
    assert isinstance(results["at"], float) and results["at"] > 30.0  # ~1,000 PUTs of ~30 ms
    assert store.meter.peak_per_prefix("put")[1] == "workers/"


def test_store_listings_stay_current_after_writes_and_deletes() -> None:
    """Listed folders are kept as flat indexes: later writes and deletes must show in them."""
    sim = SimClock()
    store = SimStore(sim)
    seen: list[dict[str, str]] = []

    def client() -> None:
        store.put("workers/a.json", b"1", kind="heartbeat")
        seen.append(store.list_versions("workers"))
        store.put("workers/a.json", b"2", kind="heartbeat")
        store.create("workers/b.json", b"1")
        store.create("commits/0f/00001-aaaaaaaa.json", b"c")
        seen.append(store.list_versions("workers"))
        store.delete("workers/b.json")
        seen.append(store.list_versions("workers"))
        seen.append(store.list_versions(""))

    sim.spawn(client)
    sim.run()
    first, second, third, everything = seen
    assert list(first) == ["a.json"] and set(second) == {"a.json", "b.json"}
    assert second["a.json"] != first["a.json"]  # a rewrite changes the version, as an ETag does
    assert third == {"a.json": second["a.json"]}
    assert sorted(everything) == ["commits/0f/00001-aaaaaaaa.json", "workers/a.json"]
    assert store.names("workers") == ["a.json"]


def test_prefixes_follow_the_layout_hash_folders() -> None:
    assert prefix_of("claims/3f/00012-deadbeef/0001.json") == "claims/3f/"
    assert prefix_of("commits/3f/00012-deadbeef.json") == "commits/3f/"
    assert prefix_of("steals/a0/worker-1--abc/000000000012.json") == "steals/a0/"
    assert prefix_of("workers/w--1.json") == "workers/"
    assert prefix_of("done.json") == "done.json"
    assert listing_prefix("commits") == "commits/"
    assert listing_prefix("claims/3f") == "claims/3f/"


def test_tiny_run_of_the_real_claimer_reports_finite_figures() -> None:
    (run,) = run_scale(Config(workers=(4,), shards=200), log=None)
    assert run["shards_not_committed_once"] == 0
    for key in (
        "ledger_requests_per_shard",
        "peak_put_per_s_per_prefix",
        "peak_get_per_s_per_prefix",
        "usd_per_million_shards",
        "makespan_over_ideal",
    ):
        assert math.isfinite(run[key]) and run[key] > 0, key
    assert run["makespan_over_ideal"] >= 1.0
    assert run["off_clock_requests"] == 0
