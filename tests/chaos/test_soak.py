"""Issue 13, point 6: the ledger's cost per shard with many real worker processes.

16 ``antbatch worker`` processes over 400 tiny shards on local files, as ``make chaos --soak``
runs them at 2,000 shards: every row committed exactly once (the chaos checker), at most
MAX_REQUESTS_PER_SHARD ledger requests per shard (heartbeats aside; a listing counts one
request per 1,000 names), and an end of job bounded by the idle workers' polls and the
sweep's spacing (TTL/2), not by the worker count: done.json soon after the last commit, and
every worker's final heartbeat soon after that.
"""

from __future__ import annotations

import json
import pathlib

import pytest

from tests.chaos.soak import MAX_REQUESTS_PER_SHARD, run_soak

WORKERS = 16
SHARDS = 400  # 25 per worker: a few steals each, and the fixed costs of 16 processes counted in
LEASE_TTL_S = 10.0
POLL_S = LEASE_TTL_S / 4  # how often an idle worker looks at the job, at most (Worker.poll_interval_s)
# The last worker marks itself idle; the sweeper sees that at its next poll (a sweep at most
# every TTL/2) and writes done.json; every worker sees that at its next poll and beats its last,
# plus a few seconds for 16 processes to wind their pipelines down on 2 busy cores. (Their
# interpreter teardown after that is reported, not bounded: it is the machine's, not the ledger's.)
DONE_BOUND_S = POLL_S + LEASE_TTL_S / 2
TAIL_BOUND_S = DONE_BOUND_S + POLL_S + 5.0


@pytest.mark.slow
def test_many_real_workers_commit_exactly_once_within_the_request_bar(
    tmp_path: pathlib.Path, subprocess_env: dict[str, str]
) -> None:
    result = run_soak(tmp_path, workers=WORKERS, shards=SHARDS, rows_per_shard=5, lease_ttl_s=LEASE_TTL_S)
    record = json.dumps(result.to_dict(), indent=1)
    verdict = result.verdict
    assert (verdict.lost, verdict.duplicated, verdict.problems) == (0, 0, []), record
    assert result.exit_codes == [0] * WORKERS, record
    # No fault: no try lost to a takeover. A worker that the busy cores slowed to half its
    # peers' pace may be backed up, and a backup that loses is a wasted try.
    backups = result.claiming.get("backups", 0)
    assert verdict.wasted_tries <= backups, record
    assert result.ledger_requests_per_shard <= MAX_REQUESTS_PER_SHARD, record
    assert result.claiming["claims"] == SHARDS + backups, record
    assert result.done_s <= DONE_BOUND_S and result.tail_s <= TAIL_BOUND_S, record
