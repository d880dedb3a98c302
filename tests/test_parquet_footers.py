from __future__ import annotations

import pathlib
import threading
from typing import Any

import fsspec
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from fsspec.implementations.local import LocalFileSystem

from airflow_antbatch import parquet_footers
from airflow_antbatch.errors import InputError
from airflow_antbatch.parquet_footers import read_footer, read_footers


class CountingFileSystem(LocalFileSystem):  # type: ignore[misc]
    """Local files that count the ranged GETs a remote store would bill."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.calls: list[tuple[str, int | None, int | None]] = []
        self._lock = threading.Lock()

    def cat_file(self, path: str, start: int | None = None, end: int | None = None, **kwargs: Any) -> bytes:
        with self._lock:
            self.calls.append((path, start, end))
        data: bytes = super().cat_file(path, start=start, end=end, **kwargs)
        return data


def _write(path: pathlib.Path, rows: int, row_group_rows: int) -> pa.Table:
    table = pa.table({"id": pa.array(range(rows), pa.int64()), "text": [f"row {i}" for i in range(rows)]})
    pq.write_table(table, path, row_group_size=row_group_rows)
    return table


@pytest.fixture
def counting() -> CountingFileSystem:
    return CountingFileSystem(skip_instance_cache=True)


def test_one_ranged_get_per_file(tmp_path: pathlib.Path, counting: CountingFileSystem) -> None:
    paths = [str(tmp_path / f"part-{i}.parquet") for i in range(5)]
    for i, path in enumerate(paths):
        _write(pathlib.Path(path), 100 * (i + 1), 50)
    footers = read_footers(counting, paths, [pathlib.Path(p).stat().st_size for p in paths])
    assert [len(f.row_groups) for f in footers] == [2, 4, 6, 8, 10]
    for path, footer in zip(paths, footers, strict=True):
        meta = pq.read_metadata(path)
        assert footer.row_groups == tuple(
            (meta.row_group(i).num_rows, meta.row_group(i).total_byte_size) for i in range(meta.num_row_groups)
        )
        assert footer.schema == meta.schema.to_arrow_schema().remove_metadata()
    assert sorted(path for path, _, _ in counting.calls) == sorted(paths)


def test_a_footer_longer_than_the_sample_costs_one_more_get(
    tmp_path: pathlib.Path, counting: CountingFileSystem, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "many-groups.parquet"
    _write(path, 2_000, 10)
    size = path.stat().st_size
    monkeypatch.setattr(parquet_footers, "FOOTER_SAMPLE_BYTES", 1024)
    footer = read_footer(counting, str(path), size)
    assert len(footer.row_groups) == 200
    assert sum(rows for rows, _ in footer.row_groups) == 2_000
    assert len(counting.calls) == 2
    assert counting.calls[0][1:] == (size - 1024, size)


@pytest.mark.parametrize(
    ("content", "why"),
    [
        (b"", "do not end in the Parquet magic"),
        (b"not parquet at all", "do not end in the Parquet magic"),
        (b"PAR1" + (10_000).to_bytes(4, "little") + b"PAR1", "its footer claims 10008 bytes of a 12-byte file"),
    ],
    ids=["empty", "not-parquet", "footer-past-the-start"],
)
def test_a_bad_file_names_itself_and_why(tmp_path: pathlib.Path, content: bytes, why: str) -> None:
    path = tmp_path / "bad.parquet"
    path.write_bytes(content)
    fs = fsspec.filesystem("file")
    with pytest.raises(InputError, match=rf"input file file://.*bad\.parquet is not a readable Parquet file: .*{why}"):
        read_footers(fs, [str(path)], [len(content)])


def test_a_truncated_file_is_named(tmp_path: pathlib.Path) -> None:
    path = tmp_path / "cut.parquet"
    _write(path, 1_000, 100)
    data = path.read_bytes()
    path.write_bytes(data[:20] + data[-8:])  # the footer's length and magic, but not the footer
    with pytest.raises(InputError, match=r"cut\.parquet is not a readable Parquet file"):
        read_footers(fsspec.filesystem("file"), [str(path)], [28])


def test_the_first_bad_file_in_order_is_the_one_named(tmp_path: pathlib.Path) -> None:
    good = tmp_path / "a.parquet"
    _write(good, 10, 10)
    (tmp_path / "b.parquet").write_bytes(b"junk")
    (tmp_path / "c.parquet").write_bytes(b"more junk")
    paths = [str(tmp_path / n) for n in ("a.parquet", "b.parquet", "c.parquet")]
    with pytest.raises(InputError, match=r"b\.parquet"):
        read_footers(fsspec.filesystem("file"), paths, [pathlib.Path(p).stat().st_size for p in paths])


def test_no_files_no_threads() -> None:
    assert read_footers(fsspec.filesystem("file"), [], []) == []
