"""docs/user-guide.md documents every option of the builder, and nothing it does not have."""

from __future__ import annotations

import inspect
import re

from airflow_antbatch.task_group import elastic_batch_inference
from tests.conftest import REPO_ROOT


def test_the_builder_options_table_matches_the_signature() -> None:
    text = (REPO_ROOT / "docs" / "user-guide.md").read_text()
    table = text.split("## Builder options", 1)[1].split("\n## ", 1)[0]
    documented = {
        name
        for row in table.splitlines()
        if row.startswith("| `")
        for name in re.findall(r"`(\w+)`", row.split("|")[1])
    }
    parameters = set(inspect.signature(elastic_batch_inference).parameters) - {"group_id"}
    assert documented == parameters
