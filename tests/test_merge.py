"""Small-file merge: packs hold every object once, reruns resume, unreadable objects are recorded."""

from __future__ import annotations

import collections
import json
import pathlib
import random
from typing import Any

import fsspec
import pyarrow.parquet as pq
import pytest

from airflow_antbatch import MergeError
from airflow_antbatch.cli import main
from airflow_antbatch.errors import InputNotFoundError
from airflow_antbatch.merge import (
    MANIFEST_REL,
    SmallObject,
    assign_packs,
    fetch_objects,
    merge_small_files,
)
from airflow_antbatch.object_reader import Reader, reader_filesystem
from tests.s3_servers import StoreLocation

# Names users really have: spaces, unicode, dots that look like parent directories.
ODD_NAMES = ["a b/photo 1.jpg", "ünïcødé/日本.bin", "dots/..hidden..", "dots/a..b", "deep/x/y/z.json"]


def make_objects(fs: fsspec.AbstractFileSystem, root: str, count: int, seed: int = 7) -> dict[str, bytes]:
    """``count`` objects of 1-9 KiB under ``root``, the odd names among them; returns URL -> bytes."""
    rnd = random.Random(seed)
    names = ODD_NAMES + [f"objs/{i:04d}.bin" for i in range(count - len(ODD_NAMES))]
    made = {}
    for name in names:
        data = rnd.randbytes(rnd.randint(1024, 9 * 1024))
        path = f"{root}/{name}"
        if fs.protocol[0] == "file":  # object stores have no directories to make
            fs.makedirs(path.rsplit("/", 1)[0], exist_ok=True)
        fs.pipe_file(path, data)
        made[fs.unstrip_protocol(path)] = data
    return made


def read_packs(output: str, storage_options: dict[str, Any] | None = None) -> dict[str, bytes]:
    """Every packed object, by path; fails on a path packed twice."""
    fs, root = fsspec.core.url_to_fs(output, **(storage_options or {}))
    found: dict[str, bytes] = {}
    for name in sorted(fs.ls(root, detail=False)):
        if name.rsplit("/", 1)[-1].startswith("pack-"):
            with fs.open(name, "rb") as handle:
                table = pq.read_table(handle)
            for path, data, size in zip(*(table.column(c).to_pylist() for c in ("path", "data", "size")), strict=True):
                assert path not in found, f"{path} packed twice"
                assert size == len(data)
                found[path] = data
    return found


@pytest.fixture
def source(tmp_path: pathlib.Path) -> tuple[str, dict[str, bytes]]:
    root = str(tmp_path / "objects")
    return root, make_objects(fsspec.filesystem("file"), root, 60)


def test_packs_hold_every_object_once_with_its_bytes(
    source: tuple[str, dict[str, bytes]], tmp_path: pathlib.Path
) -> None:
    root, made = source
    out = str(tmp_path / "packs")
    result = merge_small_files([root], out, target_pack_bytes=64 * 1024, concurrency=8)
    assert read_packs(out) == made
    assert result.objects == len(made) and result.bytes == sum(map(len, made.values()))
    assert result.packs > 3 and result.packs_written == result.packs and not result.unreadable
    manifest = json.loads(pathlib.Path(out, MANIFEST_REL).read_text())
    assert sum(p["objects"] for p in manifest["packs"]) == len(made) == manifest["objects"]


def test_a_rerun_writes_no_pack_and_changes_no_byte(
    source: tuple[str, dict[str, bytes]], tmp_path: pathlib.Path
) -> None:
    root, _ = source
    out = tmp_path / "packs"
    merge_small_files([root], str(out), target_pack_bytes=64 * 1024)
    before = {p: (p.read_bytes(), p.stat().st_mtime_ns) for p in out.rglob("pack-*.parquet")}
    again = merge_small_files([root], str(out), target_pack_bytes=64 * 1024)
    assert again.packs_written == 0 and again.packs_skipped == again.packs == len(before)
    assert {p: (p.read_bytes(), p.stat().st_mtime_ns) for p in out.rglob("pack-*.parquet")} == before


def test_a_crash_mid_merge_then_a_rerun_gives_the_packs_of_a_clean_run(
    source: tuple[str, dict[str, bytes]], tmp_path: pathlib.Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    root, _ = source
    clean, crashed = tmp_path / "clean", tmp_path / "crashed"
    merge_small_files([root], str(clean), target_pack_bytes=64 * 1024)
    calls = collections.Counter[str]()

    def dies_on_the_third_pack(*args: Any) -> Any:
        calls["fetch"] += 1
        if calls["fetch"] == 3:
            raise KeyboardInterrupt("the merge process is killed")
        return fetch_objects(*args)

    monkeypatch.setattr("airflow_antbatch.merge.fetch_objects", dies_on_the_third_pack)
    with pytest.raises(KeyboardInterrupt):
        merge_small_files([root], str(crashed), target_pack_bytes=64 * 1024)
    assert len(list(crashed.glob("pack-*.parquet"))) == 2
    monkeypatch.undo()
    rerun = merge_small_files([root], str(crashed), target_pack_bytes=64 * 1024)
    assert rerun.packs_skipped == 2 and rerun.packs_written == rerun.packs - 2
    packs = sorted(p.name for p in clean.glob("pack-*.parquet"))
    assert packs == sorted(p.name for p in crashed.glob("pack-*.parquet"))
    assert all((clean / n).read_bytes() == (crashed / n).read_bytes() for n in packs)


def test_vanished_and_changed_objects_are_recorded_and_skipped(
    source: tuple[str, dict[str, bytes]], tmp_path: pathlib.Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    root, made = source
    gone, grown = sorted(made)[3], sorted(made)[10]

    def objects_change_after_listing(fs: fsspec.AbstractFileSystem, paths: list[str], concurrency: int) -> Any:
        if gone in paths:
            fs.rm_file(fs._strip_protocol(gone))
        if grown in paths:
            fs.pipe_file(fs._strip_protocol(grown), made[grown] + b"more")
        return fetch_objects(fs, paths, concurrency)

    monkeypatch.setattr("airflow_antbatch.merge.fetch_objects", objects_change_after_listing)
    out = str(tmp_path / "packs")
    result = merge_small_files([root], out, target_pack_bytes=64 * 1024)
    reasons = dict(result.unreadable)
    assert reasons[gone] == "vanished since it was listed"
    assert reasons[grown].startswith("changed since it was listed")
    assert read_packs(out) == {p: d for p, d in made.items() if p not in (gone, grown)}
    manifest = json.loads(pathlib.Path(out, MANIFEST_REL).read_text())
    assert {u["path"] for u in manifest["unreadable"]} == {gone, grown}


def test_too_many_unreadable_objects_fail_the_merge_and_keep_the_packs_written(
    source: tuple[str, dict[str, bytes]], tmp_path: pathlib.Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    root, made = source
    doomed = set(sorted(made)[40:])  # all in the last packs

    def later_objects_vanish(fs: fsspec.AbstractFileSystem, paths: list[str], concurrency: int) -> Any:
        for path in doomed & set(paths):
            fs.rm_file(fs._strip_protocol(path))
        return fetch_objects(fs, paths, concurrency)

    monkeypatch.setattr("airflow_antbatch.merge.fetch_objects", later_objects_vanish)
    out = tmp_path / "packs"
    with pytest.raises(MergeError, match=r"objects could not be read \(max_unreadable=5\).*packs are written and kept"):
        merge_small_files([root], str(out), target_pack_bytes=64 * 1024, max_unreadable=5)
    assert set(read_packs(str(out))) <= set(made) - doomed
    assert len(list(out.glob("pack-*.parquet"))) >= 1


def test_a_rerun_over_changed_objects_is_refused(source: tuple[str, dict[str, bytes]], tmp_path: pathlib.Path) -> None:
    root, _ = source
    out = str(tmp_path / "packs")
    merge_small_files([root], out)
    pathlib.Path(root, "objs", "new.bin").write_bytes(b"late arrival")
    with pytest.raises(MergeError, match=r"1 added, 0 removed, 0 changed since\); merge into a new output prefix"):
        merge_small_files([root], out)


def test_output_inside_the_source_is_not_packed_again(source: tuple[str, dict[str, bytes]]) -> None:
    root, made = source
    out = f"{root}/_packed"
    merge_small_files([root], out, target_pack_bytes=64 * 1024)
    assert merge_small_files([root], out, target_pack_bytes=64 * 1024).packs_written == 0
    assert read_packs(out) == made


def test_assignment_is_ordered_and_size_bounded() -> None:
    objects = [SmallObject(f"o{i}", size, "") for i, size in enumerate([5, 5, 5, 20, 1, 1])]
    packs = assign_packs(objects, 10)
    assert [[o.path for o in p] for p in packs] == [["o0", "o1"], ["o2"], ["o3"], ["o4", "o5"]]


def test_a_missing_source_is_named(tmp_path: pathlib.Path) -> None:
    with pytest.raises(InputNotFoundError, match=f"merge source {tmp_path}/nowhere does not exist"):
        merge_small_files([str(tmp_path / "nowhere")], str(tmp_path / "out"))


def test_cli_merges_a_list_file_and_a_job_scores_the_packs(
    source: tuple[str, dict[str, bytes]], tmp_path: pathlib.Path, capsys: pytest.CaptureFixture[str]
) -> None:
    root, made = source
    listed = sorted(made)[:25]
    list_file = tmp_path / "objects.txt"
    list_file.write_text("# tonight's objects\n" + "\n".join(listed) + "\n\n")
    packs = tmp_path / "packs"
    assert (
        main(["merge", "--list-file", str(list_file), "--output", str(packs), "--target-pack-mb", "0.05", "--json"])
        == 0
    )
    doc = json.loads(capsys.readouterr().out)
    assert doc["objects"] == 25 and doc["packs"] > 1
    out = tmp_path / "scores"
    args = ["run", "--input", str(packs), "--output", str(out), "--id-column", "path", "--workers", "1"]
    hooks = ["--model", "tests.user_code:build_object_model", "--preprocess", "tests.user_code:object_features"]
    assert main([*args, *hooks, "--preprocess-workers", "0"]) == 0
    scored = pq.read_table(str(out), columns=["path"]).column("path").to_pylist()
    assert sorted(scored) == listed


@pytest.mark.slow
@pytest.mark.parametrize("reader", ["obstore", "s3fs"])
def test_merge_over_s3_reads_concurrently_and_resumes(seaweedfs_location: StoreLocation, reader: Reader) -> None:
    options = seaweedfs_location.storage_options
    fs = fsspec.filesystem("s3", **options)
    made = make_objects(fs, f"{seaweedfs_location.url}/objects", 40)
    out = f"{seaweedfs_location.url}/packs"
    sources = [f"{seaweedfs_location.url}/objects"]
    result = merge_small_files(
        sources, out, target_pack_bytes=64 * 1024, concurrency=16, storage_options=options, reader=reader
    )
    assert result.reader == ("obstore" if reader == "obstore" else "s3")
    assert result.objects == len(made) and read_packs(out, options) == made
    assert merge_small_files(sources, out, target_pack_bytes=64 * 1024, storage_options=options).packs_written == 0


@pytest.mark.slow
def test_obstore_records_objects_that_vanished_after_the_listing(seaweedfs_location: StoreLocation) -> None:
    options = seaweedfs_location.storage_options
    fs = fsspec.filesystem("s3", skip_instance_cache=True, **options)
    made = make_objects(fs, f"{seaweedfs_location.url}/objects", 12)
    read_fs, name = reader_filesystem(seaweedfs_location.url, options, 4, reader="obstore")
    paths = sorted(made)
    fs.rm_file(paths[3])
    got = fetch_objects(read_fs, paths, 4)
    assert name == "obstore" and isinstance(got[3], FileNotFoundError)
    assert [g for i, g in enumerate(got) if i != 3] == [made[p] for i, p in enumerate(paths) if i != 3]
