"""Every figure of docs/benchmarks.md, generated from the result files: ``python -m bench.docgen``.

The doc holds blocks delimited by ``<!-- generated:NAME -->`` and ``<!-- /generated:NAME -->``;
each is rewritten with what ``RENDERERS[NAME]`` (``"module:function"``, called with the results
folder, returning markdown) makes of ``bench/results/*.json``, so no figure is typed by hand.
``--check`` rewrites nothing and exits 1 when the doc differs from what the results give
(a stale doc), naming the blocks. A block without a renderer, or a renderer without a block,
is an error: a renamed block would otherwise go stale in silence. Plots are drawn by the
report modules (``python -m bench.report``), which need matplotlib; this needs nothing beyond
the standard library and the renderers' modules.
"""

from __future__ import annotations

import argparse
import importlib
import pathlib
import re
import sys
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from collections.abc import Callable, Mapping

REPO = pathlib.Path(__file__).resolve().parent.parent
DOC = REPO / "docs" / "benchmarks.md"
RESULTS = REPO / "bench" / "results"

# NAME -> "module:function"; function(results_dir: pathlib.Path) -> markdown (without the markers).
RENDERERS: dict[str, str] = {
    "durations": "bench.report:render_durations",
    "results": "bench.report:render_results",
    "standing": "bench.report:render_standing",
    "resume": "bench.resume_report:render",
    "elastic": "bench.elastic_report:render",
    "preempt": "bench.preempt_report:render",
    "straggler": "bench.straggler_report:render",
    "gpu": "bench.gpu_report:render",
    "newuser": "bench.newuser_report:render_newuser",
}

BLOCK = re.compile(r"(<!-- generated:([\w.-]+) -->\n)(.*?)(<!-- /generated:\2 -->)", re.DOTALL)


class DocgenError(Exception):
    """The doc and the registry disagree (a block without a renderer, or the reverse)."""


def load(target: str) -> Callable[[pathlib.Path], str]:
    """The renderer a ``module:function`` string names."""
    module, _, name = target.partition(":")
    function: Callable[[pathlib.Path], str] = getattr(importlib.import_module(module), name)
    return function


def blocks(text: str) -> list[str]:
    """The names of the doc's generated blocks, in order."""
    return [match.group(2) for match in BLOCK.finditer(text)]


def render(text: str, results_dir: pathlib.Path, renderers: Mapping[str, str] | None = None) -> str:
    """``text`` with every generated block rewritten from ``results_dir`` (by ``RENDERERS`` unless given)."""
    renderers = RENDERERS if renderers is None else renderers
    names = blocks(text)
    unknown = sorted(set(names) - set(renderers))
    if unknown:
        raise DocgenError(f"blocks without a renderer in bench/docgen.py RENDERERS: {', '.join(unknown)}")
    missing = sorted(set(renderers) - set(names))
    if missing:
        raise DocgenError(f"renderers without a <!-- generated:NAME --> block in the doc: {', '.join(missing)}")
    made = {name: load(renderers[name])(results_dir).strip("\n") for name in names}
    return BLOCK.sub(lambda m: f"{m.group(1)}\n{made[m.group(2)]}\n\n{m.group(4)}", text)


def stale_blocks(text: str, rendered: str) -> list[str]:
    """The names of the blocks whose text differs between two versions of the doc."""
    before = {m.group(2): m.group(3) for m in BLOCK.finditer(text)}
    return [m.group(2) for m in BLOCK.finditer(rendered) if before.get(m.group(2)) != m.group(3)]


def write_result(path: str, report: Mapping[str, object], *, regenerate: bool = True) -> int:
    """Write a benchmark's result file, then (``regenerate``) the doc from the folder it is in."""
    import json
    import os

    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w") as handle:
        json.dump(report, handle, indent=1)
        handle.write("\n")
    return main(["--results", os.path.dirname(os.path.abspath(path))]) if regenerate else 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.docgen", description=__doc__.split("\n")[0])
    parser.add_argument("--check", action="store_true", help="exit 1 if the doc is stale; write nothing")
    parser.add_argument("--doc", type=pathlib.Path, default=DOC)
    parser.add_argument("--results", type=pathlib.Path, default=RESULTS)
    args = parser.parse_args(argv)
    text = args.doc.read_text()
    try:
        rendered = render(text, args.results)
    except DocgenError as error:
        print(f"{args.doc}: {error}", file=sys.stderr)
        return 2
    if args.check:
        stale = stale_blocks(text, rendered)
        if stale:
            print(f"{args.doc} is stale in {', '.join(stale)}: run python -m bench.docgen", file=sys.stderr)
            return 1
        return 0
    if rendered != text:
        args.doc.write_text(rendered)
    print(f"rewrote {len(blocks(text))} generated block(s) of {args.doc}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
