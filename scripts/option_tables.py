"""``make docs-options``: write the option tables of README.md and docs/user-guide.md.

The tables are made from JobSpec's fields (their ``OptionDoc``) and from the builder's own
options (``task_group.BUILDER_OPTIONS`` and its signature), between the markers below; the
rest of each file is left alone. ``--check`` writes nothing and fails when a table is stale
(tests/airflow/test_option_tables.py runs it).
"""

from __future__ import annotations

import argparse
import inspect
import pathlib
import sys
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from collections.abc import Sequence

    from airflow_antbatch.spec import OptionDoc

ROOT = pathlib.Path(__file__).resolve().parent.parent
FILES = ("README.md", "docs/user-guide.md")
BEGIN = "<!-- BEGIN option table: made by `make docs-options` from JobSpec and the builder; do not edit -->\n"
END = "<!-- END option table -->\n"


def option_table() -> str:
    """Every job option, then every builder option, as one Markdown table."""
    from airflow_antbatch.options import job_options, table
    from airflow_antbatch.task_group import BUILDER_OPTIONS, elastic_batch_inference

    job = {o.name for o in job_options()}
    own: dict[str, tuple[Any, OptionDoc]] = {}
    for param in inspect.signature(elastic_batch_inference).parameters.values():
        if param.kind is not param.KEYWORD_ONLY or param.name in job:
            continue
        if param.name not in BUILDER_OPTIONS:
            raise SystemExit(f"builder option {param.name!r} has no entry in task_group.BUILDER_OPTIONS")
        own[param.name] = (param.default, BUILDER_OPTIONS[param.name])
    return table(own)


def with_table(text: str, table: str, where: str) -> str:
    """``text`` with the table between its markers replaced."""
    if text.count(BEGIN) != 1 or text.count(END) != 1:
        raise SystemExit(f"{where}: expected one {BEGIN.strip()!r} and one {END.strip()!r}")
    head, rest = text.split(BEGIN)
    _, tail = rest.split(END)
    return f"{head}{BEGIN}{table}{END}{tail}"


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--check", action="store_true", help="fail if a table is stale; write nothing")
    args = parser.parse_args(argv)
    table = option_table()
    stale = []
    for name in FILES:
        path = ROOT / name
        text = path.read_text()
        new = with_table(text, table, name)
        if new != text:
            stale.append(name)
            if not args.check:
                path.write_text(new)
    if stale and args.check:
        print(f"stale option tables in {', '.join(stale)}: run make docs-options", file=sys.stderr)
        return 1
    print(f"{'rewrote' if stale else 'unchanged'}: {', '.join(stale or FILES)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
