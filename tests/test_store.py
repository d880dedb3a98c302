"""AtomicStore conformance: one contract, checked on every backend the ledger may run on.

The ledger's exactly-once promise rests on ``create`` having exactly one winner (ADR 0001), so
the same tests run against memory, local files, moto and SeaweedFS (``store_location`` is
parametrized in tests/s3_servers.py), and any store without an atomic create is refused.
"""

from __future__ import annotations

import pathlib
import threading
import zipfile
from typing import Any

import pytest

from airflow_antbatch.errors import StoreError, UnsupportedStoreError
from airflow_antbatch.store import AtomicStore, with_connection_pool
from tests.s3_servers import StoreLocation

RACERS = 8
RACES = 4


def race_creates(stores: list[AtomicStore], key: str) -> int:
    """Each store creates ``key`` at once from its own thread; the one winner's index."""
    start = threading.Barrier(len(stores))
    results: dict[int, bool] = {}
    errors: list[BaseException] = []

    def racer(i: int) -> None:
        try:
            start.wait(timeout=30)
            results[i] = stores[i].create(key, f"writer {i}".encode())
        except BaseException as exc:  # surfaced below with the other results
            errors.append(exc)

    threads = [threading.Thread(target=racer, args=(i,)) for i in range(len(stores))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)
    assert not errors, errors
    winners = [i for i, won in results.items() if won]
    assert len(results) == len(stores) and len(winners) == 1, results
    return winners[0]


@pytest.fixture
def store(store_location: StoreLocation) -> AtomicStore:
    return AtomicStore(store_location.url, store_location.storage_options)


class TestCreateIfAbsent:
    """The primitive itself: what claims, releases and commits rely on."""

    def test_create_wins_once_and_keeps_the_first_bytes(self, store: AtomicStore) -> None:
        assert store.create("claims/s0/0000.json", b"first") is True
        assert store.create("claims/s0/0000.json", b"second") is False
        assert store.read("claims/s0/0000.json") == b"first"

    def test_create_of_different_keys_is_independent(self, store: AtomicStore) -> None:
        assert store.create("a/1.json", b"1") and store.create("a/2.json", b"2") and store.create("b.json", b"3")
        assert [store.read(k) for k in ("a/1.json", "a/2.json", "b.json")] == [b"1", b"2", b"3"]

    def test_create_after_put_is_refused(self, store: AtomicStore) -> None:
        store.put("x.json", b"put")
        assert store.create("x.json", b"create") is False
        assert store.read("x.json") == b"put"

    def test_read_of_a_missing_key_is_none(self, store: AtomicStore) -> None:
        assert store.read("nothing/here.json") is None
        store.create("nothing/else.json", b"")
        assert store.read("nothing/here.json") is None
        assert store.read("nothing/else.json") == b""

    @pytest.mark.parametrize("then", ["create", "put"])
    def test_a_read_sees_what_another_process_wrote_after_a_listing(
        self, store: AtomicStore, store_location: StoreLocation, then: str
    ) -> None:
        # fsspec answers "not found" from its listing cache for a file the listed folder lacked;
        # a commit marker another worker wrote since must never read as missing.
        store.create("commits/00000-a.json", b"a")
        assert store.list("commits") == ["00000-a.json"]
        other = AtomicStore(store_location.url, {**store_location.storage_options, "skip_instance_cache": True})
        getattr(other, then)("commits/00001-b.json", b"b")
        assert store.read("commits/00001-b.json") == b"b"

    def test_put_overwrites(self, store: AtomicStore) -> None:
        store.put("workers/w.json", b"beat 1", kind="heartbeat")
        store.put("workers/w.json", b"beat 2", kind="heartbeat")
        assert store.read("workers/w.json") == b"beat 2"
        assert store.counts["heartbeat"] == 2 and store.counts["put"] == 0

    def test_list_gives_relative_names_and_skips_hidden_files(self, store: AtomicStore) -> None:
        for rel in ("commits/00001-a.json", "commits/00000-b.json", "commits/sub/x.json", "other/y.json"):
            assert store.create(rel, b"{}")
        # What a crashed local create or replace leaves behind: hidden temp siblings.
        store.put("commits/.00002-c.json.tmp-1234", b"half")
        store.put("commits/.hidden/z.json", b"{}")
        assert store.list("commits") == ["00000-b.json", "00001-a.json", "sub/x.json"]
        # One level only: the files there (finalize's listing of output files); sub-directories
        # (S3 common prefixes) have no version and are left out by list_versions.
        assert store.list("commits", recursive=False) == ["00000-b.json", "00001-a.json"]
        assert store.list("nowhere") == []

    def test_list_sees_files_created_after_an_earlier_listing(self, store: AtomicStore) -> None:
        store.create("commits/a.json", b"{}")
        assert store.list("commits") == ["a.json"]
        store.create("commits/b.json", b"{}")
        assert store.list("commits") == ["a.json", "b.json"]

    def test_delete_is_idempotent(self, store: AtomicStore) -> None:
        store.create("k.json", b"1")
        store.delete("k.json")
        store.delete("k.json")
        assert store.read("k.json") is None
        assert store.create("k.json", b"2") is True

    def test_requests_are_counted_by_kind(self, store: AtomicStore) -> None:
        store.create("a.json", b"1")
        store.create("a.json", b"1")
        store.read("a.json")
        store.put("b.json", b"2", kind="data")
        store.list("")
        assert dict(store.counts) == {"create": 2, "read": 1, "data": 1, "list": 1}

    def test_uri_names_the_full_url(self, store: AtomicStore, store_location: StoreLocation) -> None:
        assert store.uri("claims/s/0000.json") == store_location.url.rstrip("/") + "/claims/s/0000.json"
        assert store.uri("") == store_location.url.rstrip("/")

    @pytest.mark.parametrize("race", range(RACES))
    def test_concurrent_creates_have_exactly_one_winner(self, store: AtomicStore, race: int) -> None:
        key = f"commits/race-{race}.json"
        winner = race_creates([store] * RACERS, key)
        # The loser's bytes never replace the winner's.
        assert store.read(key) == f"writer {winner}".encode()


class TestLocalFiles:
    """Local-only properties of the link-based create."""

    def test_create_leaves_no_temp_files(self, tmp_path: pathlib.Path) -> None:
        store = AtomicStore(str(tmp_path))
        store.create("a/b.json", b"1")
        store.create("a/b.json", b"2")
        store.put("a/c.json", b"3")
        assert sorted(p.name for p in (tmp_path / "a").iterdir()) == ["b.json", "c.json"]

    def test_file_url_is_local(self, tmp_path: pathlib.Path) -> None:
        store = AtomicStore(f"file://{tmp_path}")
        assert store.kind == "local"
        assert store.create("x.json", b"1") and not store.create("x.json", b"2")

    def test_a_foreign_os_error_becomes_a_store_error_naming_the_file(self, tmp_path: pathlib.Path) -> None:
        store = AtomicStore(str(tmp_path))
        store.put("blocker", b"a file where a directory should be")
        with pytest.raises(StoreError, match="blocker"):
            store.create("blocker/x.json", b"1")


@pytest.mark.parametrize(
    "url",
    [
        "http://127.0.0.1:9/bucket/ledger",
        "data:text/plain;base64,aGk=",
        # Wrappers over a supported store are refused too: their writes are not atomic creates.
        "simplecache::memory://antbatch-test/wrapped",
        "dir::memory://antbatch-test/wrapped",
    ],
)
def test_stores_without_atomic_create_are_refused_by_url(url: str) -> None:
    with pytest.raises(UnsupportedStoreError, match="no atomic create-if-absent") as info:
        AtomicStore(url)
    assert url in str(info.value)


def test_zip_archives_are_refused(tmp_path: pathlib.Path) -> None:
    archive = tmp_path / "ledger.zip"
    with zipfile.ZipFile(archive, "w") as handle:
        handle.writestr("plan.json", "{}")
    url = f"zip://plan.json::file://{archive}"
    with pytest.raises(UnsupportedStoreError) as info:
        AtomicStore(url)
    assert url in str(info.value) and "zip" in str(info.value)


@pytest.mark.parametrize(
    ("url", "options", "expected"),
    [
        ("s3://b/k", {}, {"config_kwargs": {"max_pool_connections": 64}}),
        ("s3://b/k", {"config_kwargs": {"max_pool_connections": 8}}, {"config_kwargs": {"max_pool_connections": 8}}),
        ("/local/path", {}, {}),
    ],
)
def test_s3_gets_a_connection_pool_as_large_as_the_concurrency(
    url: str, options: dict[str, Any], expected: dict[str, Any]
) -> None:
    assert with_connection_pool(url, options, 64) == expected
