"""Failures presented once per shard, with the try count and the last error."""

from __future__ import annotations

from typing import Any

from airflow_antbatch.failure_report import ShardFailure, failure_sample, group_failures, shard_failures
from airflow_antbatch.ledger import JobStatus


def _status(**fields: Any) -> JobStatus:
    base: dict[str, Any] = dict(
        planned=4, committed=2, leased=0, failed=2, rows_committed=0, rows_planned=None, rows_per_s=0.0, eta_s=0.0
    )
    return JobStatus(**{**base, "workers": (), **fields})


def test_each_shard_once_with_its_try_count_and_last_error() -> None:
    failures = [("b", "E1"), ("a", "OOM"), ("b", "E2"), ("b", "E3")]
    assert group_failures(failures) == [ShardFailure("b", 3, "E3"), ShardFailure("a", 1, "OOM")]
    assert str(ShardFailure("b", 3, "E3")) == "shard b failed 3 tries: E3"
    assert str(ShardFailure("a", 1, "OOM")) == "shard a failed 1 try: OOM"


def test_sample_names_the_first_shards_and_counts_the_rest() -> None:
    grouped = group_failures([(f"s{i}", "E") for i in range(5)])
    assert failure_sample(grouped, 2) == "shard s0 failed 1 try: E; shard s1 failed 1 try: E (and 3 more shards)"
    assert failure_sample(grouped[:3], 2).endswith("(and 1 more shard)")
    assert failure_sample([]) == ""


def test_a_finished_jobs_record_of_last_errors_counts_the_plans_max_attempts() -> None:
    # done.json keeps one (shard, last error) per failed shard
    done = _status(failures=(("a", "E"), ("b", "F")))
    assert [f.tries for f in shard_failures(done, max_attempts=3)] == [3, 3]
    assert [f.tries for f in shard_failures(done)] == [1, 1]  # without the plan: what was seen
    # still running: a shard that failed once is being retried, not failed for good
    running = _status(committed=1, failed=0, leased=1, failures=(("a", "E"),))
    assert [f.tries for f in shard_failures(running, max_attempts=3)] == [1]
