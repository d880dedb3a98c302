"""bench/docgen.py: the committed docs/benchmarks.md is what the committed result files give, and
the generator refuses a doc and a registry that disagree."""

from __future__ import annotations

import json
import pathlib

import pytest

from bench import docgen


def test_committed_doc_matches_committed_results() -> None:
    text = docgen.DOC.read_text()
    rendered = docgen.render(text, docgen.RESULTS)
    assert docgen.stale_blocks(text, rendered) == [], "docs/benchmarks.md is stale: run python -m bench.docgen"
    assert rendered == text


def test_every_renderer_has_its_block_in_the_doc() -> None:
    assert sorted(docgen.blocks(docgen.DOC.read_text())) == sorted(docgen.RENDERERS)


def lines_renderer(results_dir: pathlib.Path) -> str:
    """A renderer for the tests: one line per result file."""
    return "\n".join(f"- {p.name}: {json.loads(p.read_text())['x']}" for p in sorted(results_dir.glob("*.json")))


RENDERERS = {"lines": f"{__name__}:lines_renderer"}


@pytest.fixture
def results(tmp_path: pathlib.Path) -> pathlib.Path:
    folder = tmp_path / "results"
    folder.mkdir()
    (folder / "a.json").write_text(json.dumps({"x": 1}))
    return folder


def test_blocks_are_rewritten_and_the_prose_around_them_kept(results: pathlib.Path) -> None:
    text = "intro\n<!-- generated:lines -->\nstale 0\n<!-- /generated:lines -->\noutro\n"
    rendered = docgen.render(text, results, RENDERERS)
    assert rendered == "intro\n<!-- generated:lines -->\n\n- a.json: 1\n\n<!-- /generated:lines -->\noutro\n"
    assert docgen.stale_blocks(text, rendered) == ["lines"]
    assert docgen.render(rendered, results, RENDERERS) == rendered  # idempotent


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("<!-- generated:other -->\n<!-- /generated:other -->\n", "blocks without a renderer"),
        ("no blocks at all\n", "renderers without a <!-- generated:NAME --> block"),
    ],
)
def test_a_doc_and_registry_that_disagree_are_refused(results: pathlib.Path, text: str, message: str) -> None:
    with pytest.raises(docgen.DocgenError, match=message):
        docgen.render(text, results, RENDERERS)


def test_check_exits_1_on_a_stale_doc_and_writes_nothing(
    results: pathlib.Path, tmp_path: pathlib.Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(docgen, "RENDERERS", RENDERERS)
    doc = tmp_path / "doc.md"
    doc.write_text("<!-- generated:lines -->\nold\n<!-- /generated:lines -->\n")
    args = ["--doc", str(doc), "--results", str(results)]
    assert docgen.main([*args, "--check"]) == 1
    assert "old" in doc.read_text()
    assert docgen.main(args) == 0
    assert docgen.main([*args, "--check"]) == 0
