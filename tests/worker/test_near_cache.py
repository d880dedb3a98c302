"""The near cache: a shard's small files fetched many at a time, never served stale."""

from __future__ import annotations

import collections
import pathlib

import fsspec
import pyarrow.parquet as pq
import pytest

from airflow_antbatch.examples import tabular
from airflow_antbatch.ledger import Ledger, WorkerIdentity
from airflow_antbatch.planning import plan_job
from airflow_antbatch.shards import Piece, Shard
from airflow_antbatch.spec import JobSpec
from airflow_antbatch.worker.job_code import JobCode
from airflow_antbatch.worker.loop import Worker
from airflow_antbatch.worker.near_cache import CacheOptions, NearCache
from tests.conftest import TABULAR, write_transactions
from tests.s3_servers import StoreLocation


def small_files(root: pathlib.Path, count: int) -> Shard:
    root.mkdir(parents=True, exist_ok=True)
    pieces = []
    for i in range(count):
        path = root / f"f{i:03d}.bin"
        path.write_bytes(bytes([i]) * (100 + i))
        pieces.append(Piece(str(path), 100 + i, file_size=100 + i, version=str(path.stat().st_mtime)))
    return Shard("00000-test", tuple(pieces))


def read_all(cache: NearCache, shard: Shard) -> list[bytes]:
    cache.prefetch(shard)
    out = []
    for piece in shard.pieces:
        with cache.open(piece) as handle:
            out.append(handle.read())
    cache.forget(shard)
    return out


def test_every_file_comes_from_the_cache_within_the_byte_budget(
    tmp_path: pathlib.Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    shard = small_files(tmp_path, 30)
    cache = NearCache(options=CacheOptions(max_bytes=400, concurrency=4))  # about three files at a time
    peak = 0
    real_fill = cache._fill

    def watched_fill() -> None:
        nonlocal peak
        real_fill()
        peak = max(peak, cache._reserved)

    monkeypatch.setattr(cache, "_fill", watched_fill)
    assert read_all(cache, shard) == [pathlib.Path(p.path).read_bytes() for p in shard.pieces]
    assert cache.stats.hits == 30 and cache.stats.misses == 0
    assert cache.stats.bytes_prefetched == sum(p.size for p in shard.pieces)
    assert 0 < peak <= 400 and cache._reserved == 0
    cache.close()


def test_large_files_and_unversioned_pieces_stream_directly(tmp_path: pathlib.Path) -> None:
    shard = small_files(tmp_path, 3)
    big, unversioned = shard.pieces[0], shard.pieces[1]
    pieces = (
        Piece(big.path, big.size, file_size=10**9, version="v"),  # too big: streams
        Piece(unversioned.path, unversioned.size),  # planned before pieces had versions: streams
        shard.pieces[2],
    )
    shard = Shard(shard.shard_id, pieces)
    cache = NearCache(options=CacheOptions(max_file_bytes=1000))
    assert read_all(cache, shard) == [pathlib.Path(p.path).read_bytes() for p in shard.pieces]
    assert (cache.stats.hits, cache.stats.misses) == (1, 2)


def test_a_disk_entry_serves_a_rerun_but_never_a_rewritten_file(tmp_path: pathlib.Path) -> None:
    shard = small_files(tmp_path / "in", 5)
    options = CacheOptions(directory=str(tmp_path / "cache"))
    read_all(NearCache(options=options), shard)
    again = NearCache(options=options)
    assert read_all(again, shard) == [pathlib.Path(p.path).read_bytes() for p in shard.pieces]
    assert again.stats.hits == 5 and again.stats.bytes_prefetched == 0  # all from disk, nothing fetched
    first = shard.pieces[0]
    pathlib.Path(first.path).write_bytes(b"rewritten" * 20)  # a new version, as the next plan lists it
    replanned = Piece(first.path, 180, file_size=180, version="new-etag")
    with NearCache(options=options).open(replanned) as handle:
        assert handle.read() == b"rewritten" * 20


def test_the_disk_cache_evicts_the_oldest_entries_beyond_its_budget(tmp_path: pathlib.Path) -> None:
    shard = small_files(tmp_path / "in", 20)
    cache_dir = tmp_path / "cache"
    read_all(NearCache(options=CacheOptions(directory=str(cache_dir), max_bytes=1000)), shard)
    held = sum(p.stat().st_size for p in cache_dir.iterdir())
    assert 0 < held <= 1000


def test_the_disk_cache_scans_its_directory_only_when_it_may_be_over_budget(
    tmp_path: pathlib.Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    shard = small_files(tmp_path / "in", 40)
    cache = NearCache(options=CacheOptions(directory=str(tmp_path / "cache"), max_bytes=2000))
    scans = []
    original = cache._disk_entries
    monkeypatch.setattr(cache, "_disk_entries", lambda: scans.append(1) or original())
    read_all(cache, shard)
    written = sum(p.file_size or 0 for p in shard.pieces)
    # A scan per eviction, and each eviction frees at least a tenth of the budget: far fewer
    # scans than the 40 writes, with the directory never left over budget.
    assert 0 < len(scans) <= written // 200 + 1 < 40
    assert sum(p.stat().st_size for p in (tmp_path / "cache").iterdir()) <= 2000


@pytest.mark.parametrize("backend", ["local", pytest.param("seaweedfs", marks=pytest.mark.slow)])
def test_a_job_over_many_small_files_reads_them_through_the_cache(
    backend: str, tmp_path: pathlib.Path, request: pytest.FixtureRequest
) -> None:
    if backend == "local":
        root, options = str(tmp_path / "in"), {}
        write_transactions(tmp_path / "in", files=24, rows_per_file=20, row_group_size=20)
    else:
        location: StoreLocation = request.getfixturevalue("seaweedfs_location")
        root, options = f"{location.url}/in", location.storage_options
        write_transactions(tmp_path / "in", files=24, rows_per_file=20, row_group_size=20)
        fsspec.filesystem("s3", **options).put(str(tmp_path / "in") + "/", root, recursive=True)
    spec = JobSpec(
        input_uri=root,
        output_uri=str(tmp_path / "out"),
        model=f"{TABULAR}:build_model",
        id_column="txn_id",
        max_shard_rows=240,
        storage_options=options,
    )
    plan = plan_job(spec)
    assert len(plan.plan.shards) == 2 and all(len(s.pieces) == 12 for s in plan.plan.shards)  # files coalesced
    code = JobCode.in_process(tabular.build_model(), preprocess=tabular.preprocess, id_column="txn_id")
    summary = Worker(Ledger.open(plan.plan_uri, options), WorkerIdentity("w0"), code).run()
    assert summary.shards_committed == 2
    assert summary.cache["hits"] == 24 and summary.cache["misses"] == 0 and summary.cache["bytes_prefetched"] > 0
    ids = pq.read_table(str(tmp_path / "out"), columns=["txn_id"]).column("txn_id").to_pylist()
    assert collections.Counter(ids) == collections.Counter(range(480))


def test_a_shard_of_some_row_groups_of_a_file_streams_them_instead_of_fetching_the_file(
    tmp_path: pathlib.Path,
) -> None:
    write_transactions(tmp_path / "in", files=2, rows_per_file=40, row_group_size=10)  # 4 row groups a file
    spec = JobSpec(input_uri=str(tmp_path / "in"), output_uri=str(tmp_path / "out"), model="m:f", max_shard_rows=20)
    plan = plan_job(spec).plan
    pieces = [p for s in plan.shards for p in s.pieces]
    assert len(plan.shards) == 4 and all(p.row_groups is not None and len(p.row_groups) == 2 for p in pieces)
    assert not any(NearCache().cacheable(p) for p in pieces)
    whole = plan_job(JobSpec(input_uri=str(tmp_path / "in"), output_uri=str(tmp_path / "o2"), model="m:f")).plan
    assert all(NearCache().cacheable(p) for s in whole.shards for p in s.pieces)
