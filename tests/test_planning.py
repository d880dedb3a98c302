"""Planning: listing through fsspec, deterministic shards, and a plan written once."""

from __future__ import annotations

import dataclasses
import json
import pathlib

import pyarrow as pa
import pyarrow.csv as pacsv
import pyarrow.parquet as pq
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from airflow_antbatch import layout
from airflow_antbatch.errors import InputError, InputNotFoundError, PlanConflictError, SpecError
from airflow_antbatch.planning import InputFile, cut_shards, list_input, plan_job, resolve_plan_uri, shard_rows
from airflow_antbatch.shards import JobPlan
from airflow_antbatch.spec import JobSpec, ModelStage
from airflow_antbatch.text_sample import TextSample
from bench import plan_scale
from tests.conftest import TABULAR, write_transactions


def _spec(input_uri: str | tuple[str, ...], output: pathlib.Path, **kw: object) -> JobSpec:
    return JobSpec(input_uri=input_uri, output_uri=str(output), model=f"{TABULAR}:build_model", **kw)  # type: ignore[arg-type]


def test_parquet_is_cut_by_row_groups_under_max_rows(
    transactions: tuple[pathlib.Path, pa.Table], tmp_path: pathlib.Path
) -> None:
    directory, _ = transactions
    result = plan_job(_spec(str(directory), tmp_path / "out", max_shard_rows=500))
    shards = result.plan.shards
    assert len(shards) == 6  # 3 files x 4 row groups of 250, two groups per shard
    assert all(s.rows == 500 for s in shards)
    assert all(len(s.pieces) == 1 and s.pieces[0].row_groups is not None for s in shards)
    assert result.plan.planned_rows == 3000
    assert not result.reused


def test_small_files_are_grouped_into_one_shard(tmp_path: pathlib.Path) -> None:
    directory = tmp_path / "many"
    write_transactions(directory, files=10, rows_per_file=20, row_group_size=20)
    plan = plan_job(_spec(str(directory), tmp_path / "out")).plan
    assert len(plan.shards) == 1
    assert len(plan.shards[0].pieces) == 10


def test_shard_ids_are_deterministic(transactions: tuple[pathlib.Path, pa.Table], tmp_path: pathlib.Path) -> None:
    directory, _ = transactions
    first = plan_job(_spec(str(directory), tmp_path / "a", max_shard_rows=250)).plan
    second = plan_job(_spec(str(directory), tmp_path / "b", max_shard_rows=250)).plan
    assert first.shard_ids == second.shard_ids
    assert len(set(first.shard_ids)) == 12


def test_rerun_reuses_the_plan(transactions: tuple[pathlib.Path, pa.Table], tmp_path: pathlib.Path) -> None:
    directory, _ = transactions
    spec = _spec(str(directory), tmp_path / "out")
    first = plan_job(spec)
    again = plan_job(spec)
    assert again.reused
    assert again.plan_uri == first.plan_uri
    assert again.plan.shard_ids == first.plan.shard_ids


def test_changed_input_is_refused_unless_forced(
    transactions: tuple[pathlib.Path, pa.Table], tmp_path: pathlib.Path
) -> None:
    directory, _ = transactions
    spec = _spec(str(directory), tmp_path / "out")
    first = plan_job(spec)
    write_transactions(directory / "late", files=1, rows_per_file=10, row_group_size=10)
    with pytest.raises(PlanConflictError, match=r"input changed since it was planned \(1 new"):
        plan_job(spec)
    forced = plan_job(spec, force=True)
    assert forced.plan.attempt == first.plan.attempt + 1
    assert "attempt-001" in forced.plan_uri
    assert resolve_plan_uri(str(tmp_path / "out")) == forced.plan_uri


def test_other_job_on_the_same_output_is_refused(
    transactions: tuple[pathlib.Path, pa.Table], tmp_path: pathlib.Path
) -> None:
    directory, _ = transactions
    plan_job(_spec(str(directory), tmp_path / "out"))
    with pytest.raises(PlanConflictError, match=r"job settings differ \(model/stages\)"):
        plan_job(JobSpec(input_uri=str(directory), output_uri=str(tmp_path / "out"), model="other:model"))


def test_a_changed_chain_on_the_same_output_is_refused_and_the_same_chain_reuses_the_plan(
    transactions: tuple[pathlib.Path, pa.Table], tmp_path: pathlib.Path
) -> None:
    directory, _ = transactions

    def chain(second_model: str) -> JobSpec:
        stages = (ModelStage(name="embed", model=f"{TABULAR}:build_model"), ModelStage(name="rank", model=second_model))
        return JobSpec(input_uri=str(directory), output_uri=str(tmp_path / "out"), stages=stages)

    first = plan_job(chain("pkg:ranker"))
    again = plan_job(chain("pkg:ranker"))
    assert again.reused and again.plan_uri == first.plan_uri
    assert again.plan.spec.stages == first.plan.spec.stages
    with pytest.raises(PlanConflictError, match=r"job settings differ \(model/stages\)"):
        plan_job(chain("pkg:other_ranker"))


def test_batch_sizes_and_devices_are_not_part_of_the_job(
    transactions: tuple[pathlib.Path, pa.Table], tmp_path: pathlib.Path
) -> None:
    directory, _ = transactions
    first = plan_job(_spec(str(directory), tmp_path / "out"))
    single = first.plan.spec
    tuned = dataclasses.replace(
        single, model=None, stages=(ModelStage(name="model", model=str(single.model), batch_size=7),)
    )
    assert plan_job(tuned).reused  # the same model as a one-stage chain, scored in other batch sizes


def test_the_plan_is_an_arrow_file_under_the_state_root(
    transactions: tuple[pathlib.Path, pa.Table], tmp_path: pathlib.Path
) -> None:
    directory, _ = transactions
    result = plan_job(_spec(str(directory), tmp_path / "out"))
    path = tmp_path / "out" / layout.STATE_DIR / layout.plan_rel(0)
    assert result.plan_uri == str(path) and path.name == "plan.arrow"
    assert JobPlan.from_bytes(path.read_bytes(), source=str(path)) == result.plan


def test_a_simulated_listing_is_planned_one_object_a_shard(
    tmp_path: pathlib.Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The listing bench/plan_scale.py plans a million objects from, at 2,500: one shard each,
    read a listing page at a time, with only the first object's first line opened."""
    monkeypatch.setattr(plan_scale, "PAGE_S", 0.0)
    spec = JobSpec(input_uri=plan_scale.register(2500), output_uri=str(tmp_path / "out"), model="pkg:model")
    first = plan_job(spec)
    assert len(first.plan) == 2500 and plan_scale.SimListing.pages == 3
    assert first.plan.input_columns == ("id", "text")
    last = first.plan.shard(-1).pieces[0]
    assert last.path == f"simlist://{plan_scale.PREFIX}/part-0002499.jsonl"
    assert last.version is not None and len(last.version) == 34 and last.file_size == last.size
    again = plan_job(spec)
    assert again.reused and again.plan.fingerprint == first.plan.fingerprint
    plan_scale.register(2501)
    with pytest.raises(PlanConflictError, match=r"\(1 new, 0 gone"):
        plan_job(spec)


def test_glob_and_list_inputs(transactions: tuple[pathlib.Path, pa.Table], tmp_path: pathlib.Path) -> None:
    directory, _ = transactions
    _, by_glob = list_input(_spec(str(directory / "part-00[01].parquet"), tmp_path / "o"))
    _, by_list = list_input(_spec((str(directory / "part-000.parquet"), str(directory / "part-001.parquet")), tmp_path))
    assert [f.path for f in by_glob] == [f.path for f in by_list]
    assert len(by_glob) == 2


def test_directory_listing_skips_hidden_and_bookkeeping_files(
    transactions: tuple[pathlib.Path, pa.Table], tmp_path: pathlib.Path
) -> None:
    directory, _ = transactions
    (directory / "_SUCCESS").write_text("{}")
    (directory / ".part-9.parquet.tmp-1").write_bytes(b"junk")
    (directory / "empty.parquet").write_bytes(b"")
    fmt, files = list_input(_spec(str(directory), tmp_path / "o"))
    assert fmt == "parquet"
    assert [pathlib.Path(f.path).name for f in files] == ["part-000.parquet", "part-001.parquet", "part-002.parquet"]


def test_jsonl_and_csv_are_whole_file_pieces(tmp_path: pathlib.Path) -> None:
    directory = tmp_path / "text"
    directory.mkdir()
    (directory / "a.jsonl").write_text("".join(json.dumps({"id": i, "x": i * 0.5}) + "\n" for i in range(5)))
    pacsv.write_csv(pa.table({"id": [1, 2], "x": [0.1, 0.2]}), directory / "b.csv")
    with pytest.raises(InputError, match=r"input mixes formats: csv \(.*b.csv\), jsonl \(.*a.jsonl\)"):
        list_input(_spec(str(directory), tmp_path / "o"))
    fmt, files = list_input(_spec(str(directory), tmp_path / "o", input_format="jsonl"))
    assert fmt == "jsonl"
    assert [pathlib.Path(f.path).name for f in files] == ["a.jsonl"]
    assert files[0].row_groups is None


def test_missing_input_names_the_path(tmp_path: pathlib.Path) -> None:
    missing = tmp_path / "nope"
    with pytest.raises(InputNotFoundError, match=f"input {missing} does not exist"):
        plan_job(_spec(str(missing), tmp_path / "out"))


def test_unknown_format_names_the_file(tmp_path: pathlib.Path) -> None:
    data = tmp_path / "data.bin"
    data.write_bytes(b"\x00\x01")
    with pytest.raises(InputError, match=r"cannot tell the format of input file .*data.bin: set input_format"):
        plan_job(_spec(str(data), tmp_path / "out"))


def test_corrupt_parquet_names_the_file(tmp_path: pathlib.Path) -> None:
    bad = tmp_path / "bad.parquet"
    bad.write_bytes(b"not parquet at all")
    with pytest.raises(InputError, match=r"input file .*bad.parquet is not a readable Parquet file"):
        plan_job(_spec(str(bad), tmp_path / "out"))


@pytest.mark.parametrize("fmt", ["parquet", "csv", "jsonl"])
def test_a_missing_id_or_keep_column_fails_the_plan_naming_it_the_file_and_the_columns(
    tmp_path: pathlib.Path, fmt: str
) -> None:
    directory = tmp_path / "in"
    directory.mkdir()
    table = pa.table({"id": [1, 2], "x": [0.1, 0.2]})
    path = directory / f"a.{fmt}"
    if fmt == "parquet":
        pq.write_table(table, path)
    elif fmt == "csv":
        pacsv.write_csv(table, path)
    else:
        path.write_text("".join(json.dumps(row) + "\n" for row in table.to_pylist()))
    with pytest.raises(SpecError) as info:
        plan_job(_spec(str(directory), tmp_path / "out", id_column="txn_id", keep_columns=("x", "region")))
    message = str(info.value)
    assert message.startswith("job spec id_column 'txn_id', keep_columns 'region': no such column")
    assert f"input file {path.as_uri()}" in message and message.endswith("its columns are ['id', 'x']")
    assert not (tmp_path / "out").exists() or not list((tmp_path / "out").rglob(layout.PLAN_FILE))  # nothing planned
    assert plan_job(_spec(str(directory), tmp_path / "ok", id_column="id", keep_columns=("x",))).plan.input_columns == (
        "id",
        "x",
    )


_units = st.lists(
    st.tuples(
        st.integers(1, 3), st.lists(st.tuples(st.integers(0, 400), st.integers(1, 5000)), min_size=1, max_size=6)
    ),
    min_size=1,
    max_size=8,
)


@settings(max_examples=200, deadline=None, derandomize=True)
@given(files=_units, max_rows=st.integers(1, 1000), target_bytes=st.integers(1, 20000))
def test_cut_shards_covers_every_row_group_once_in_order_within_limits(
    files: list[tuple[int, list[tuple[int, int]]]], max_rows: int, target_bytes: int
) -> None:
    inputs = [
        InputFile(f"/f{i}.parquet", sum(b for _, b in groups), "v", tuple(groups))
        for i, (_, groups) in enumerate(files)
    ]
    shards = cut_shards(inputs, max_rows, target_bytes)
    units = [(p.path, g) for s in shards for p in s.pieces for g in (p.row_groups or ())]
    expected = [(f.path, g) for f in inputs for g in range(len(f.row_groups or ()))]
    assert units == expected  # every row group exactly once, in listing order
    assert len({s.shard_id for s in shards}) == len(shards)
    for shard in shards:
        groups = sum(len(p.row_groups or ()) for p in shard.pieces)
        if groups > 1:  # only a single oversized row group may exceed a limit
            assert (shard.rows or 0) <= max_rows
            assert shard.size <= target_bytes


_text_files = st.lists(st.tuples(st.integers(1, 20_000), st.floats(5.0, 400.0)), min_size=1, max_size=8)


@settings(max_examples=150, deadline=None, derandomize=True)
@given(
    files=_text_files,
    max_rows=st.integers(20, 2000),
    target_bytes=st.integers(500, 60_000),
    splittable=st.booleans(),
)
def test_cut_text_covers_every_byte_once_in_order_and_keeps_estimated_rows_within_the_limit(
    files: list[tuple[int, float]], max_rows: int, target_bytes: int, splittable: bool
) -> None:
    """Whatever the estimate, each file's pieces tile its bytes in order (so each line is in
    the one range its first byte falls in), and each shard's estimated rows and bytes stay
    within the limits unless it is one file that may not be cut."""
    inputs = [InputFile(f"/t{i}.jsonl", size, "v") for i, (size, _) in enumerate(files)]
    rows_of = {f.path: f.size / row_bytes for f, (_, row_bytes) in zip(inputs, files, strict=True)}
    text = TextSample(bytes_per_row=1.0, counted={p: round(r) for p, r in rows_of.items()}, splittable=splittable)
    shards = list(cut_shards(inputs, max_rows, target_bytes, text=text))
    covered: dict[str, list[tuple[int, int]]] = {}
    for piece in (p for s in shards for p in s.pieces):
        covered.setdefault(piece.path, []).append(piece.byte_range or (0, piece.size))
    assert list(covered) == [f.path for f in inputs]  # listing order
    for f in inputs:
        spans = covered[f.path]
        assert spans[0][0] == 0 and spans[-1][1] == f.size
        assert all(a[1] == b[0] and a[0] < a[1] for a, b in zip(spans, spans[1:], strict=False))
    sizes = {f.path: f.size for f in inputs}
    total_rows = total_bytes = 0.0
    for shard in shards:
        # A range holds its share of its file's estimated rows.
        estimated = sum(text.rows(p.path, sizes[p.path]) * p.size / sizes[p.path] for p in shard.pieces)
        total_rows, total_bytes = total_rows + estimated, total_bytes + shard.size
        if len(shard.pieces) > 1 or shard.pieces[0].byte_range is not None:
            assert estimated <= max_rows * (1 + 1e-9) and shard.size <= target_bytes
    # Next fit: a shard is closed only when the next piece did not fit or it is 7/8 full.
    assert len(shards) <= 2 * (total_rows / max_rows + total_bytes / target_bytes) * 8 / 7 + 2


@pytest.mark.parametrize(
    ("total", "max_rows", "min_shards", "expected"),
    [
        (120_000, 100_000, 4, 30_000),  # the new user's job, one worker: 4 shards, not 100k + 20k
        (120_000, 20_000, 4, 20_000),  # max_shard_rows still caps
        (20_000, 100_000, 4, 10_000),  # never under MIN_SHARD_ROWS: a small job stays in few shards
        (120_000, 100_000, 1, 100_000),  # no aim: as before
        (0, 100_000, 4, 100_000),  # no row counts (JSONL, CSV): their own estimate rules
    ],
)
def test_shards_are_sized_for_min_shards_where_the_data_allows(
    total: int, max_rows: int, min_shards: int, expected: int
) -> None:
    groups = ((total // 60, 1000),) * 60 if total else None
    files = [InputFile(f"f{i}", 1000, "v", row_groups=groups if i == 0 else None) for i in range(2)]
    assert shard_rows(files, max_rows, min_shards) == expected


def test_plan_job_cuts_parquet_into_min_shards(tmp_path: pathlib.Path) -> None:
    write_transactions(tmp_path / "in", files=8, rows_per_file=5_000, row_group_size=5_000)
    plan = plan_job(_spec(str(tmp_path / "in"), tmp_path / "out"), min_shards=4).plan
    assert [s.rows for s in plan.shards] == [10_000] * 4
