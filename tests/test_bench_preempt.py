"""The preemption benchmark's report renders what docs/benchmarks.md shows, from a result file."""

from __future__ import annotations

import json
from typing import TYPE_CHECKING

from bench import preempt, preempt_report

if TYPE_CHECKING:
    import pathlib


def _run(drain_s: float, twice: int, exit_s: float) -> dict[str, object]:
    return {
        "drain_s": drain_s,
        "exit_after_signal_s": exit_s,
        "rows_scored_twice": twice,
        "job_wall_s": 12.0,
        "output": {"rows_in_output": 8192, "duplicates": 0, "missing": 0},
    }


def test_the_report_renders_the_medians_and_each_repeat_from_the_result_file(tmp_path: pathlib.Path) -> None:
    runs = {
        "release": [_run(0.0, 512, 0.2), _run(0.0, 768, 0.3), _run(0.0, 256, 0.2)],
        "drain": [_run(30.0, 0, 0.9), _run(30.0, 0, 1.1), _run(30.0, 0, 0.8)],
    }
    doc = {
        "command": "python -m bench.preempt",
        "finished_at": "now",
        "wall_s": 80.0,
        "load_avg_before": [0.5, 0.4, 0.3],
        "git": {"commit": "abc1234"},
        "data": {"rows": 8192, "max_shard_rows": 1024, "batch_size": 256},
        "runs": runs,
        "median": {name: preempt.summarise(r) for name, r in runs.items()},
    }
    (tmp_path / "preempt.json").write_text(json.dumps(doc))
    text = preempt_report.render(tmp_path)
    assert "| `--drain-s 0`: give back at once | 512 (512, 768, 256) | 0.20 s | 12.00 s | 0 / 0 |" in text
    assert "| `--drain-s 30`: finish what fits | 0 (0, 0, 0) | 0.90 s | 12.00 s | 0 / 0 |" in text
    assert "medians of 3 interleaved repeats" in text
    assert "make bench-preempt" in preempt_report.render(tmp_path / "missing")
