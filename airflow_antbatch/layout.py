"""Where a job keeps its state and output: every key and file name, in one place.

The planner, the ledger, the worker, finalize, the status view and the UI plugin all name
these files; defining them once keeps them from drifting (docs/adr/0002-ledger-protocol.md).

Under the state root (default ``<output>/_antbatch``), per job attempt::

    attempt-NNN/plan.arrow                       the JobPlan, written once by the planner
    attempt-NNN/done.json                        every shard committed or failed (create-if-absent)
    attempt-NNN/pool.json                        the elastic pool's status and controller memory, overwritten
    attempt-NNN/workers/<token>.json             one heartbeat per worker process, overwritten
    attempt-NNN/idle/<token>                     that process has nothing left to claim
    attempt-NNN/claims/<hh>/<shard>/<epoch>.json     a lease on one try (create-if-absent)
    attempt-NNN/releases/<hh>/<shard>/<epoch>.json   that try was given back
    attempt-NNN/commits/<hh>/<shard>.json            the shard's winning file (create-if-absent)
    attempt-NNN/steals/<hh>/<token>/<end>.json       a run of <token>'s up to <end> was split

``<hh>`` is a hash of the shard id: sequential shard numbers would put every claim and commit
of a moment under one key prefix, the worst case for S3's prefix partitioning (3,500 PUT/s and
5,500 GET/s per prefix). Under the output root, each try of a shard writes its own file, named
by attempt, shard and epoch, so that a late writer never overwrites a committed file.
"""

from __future__ import annotations

import hashlib
import re

STATE_DIR = "_antbatch"
MANIFEST_NAME = "_SUCCESS"  # under the output root: the committed files, written by finalize
PLAN_URI_KEY = "plan_uri"  # the XCom key under which the plan task publishes the plan's URI
PLAN_FILE = "plan.arrow"
DONE_FILE = "done.json"
POOL_FILE = "pool.json"  # written by the pool's reconcile loop (triggers/pool.py), read by the UI page
WORKERS_DIR = "workers"
IDLE_DIR = "idle"
CLAIMS_DIR = "claims"
RELEASES_DIR = "releases"
COMMITS_DIR = "commits"
STEALS_DIR = "steals"
QUARANTINE_DIR = "_quarantine"
PREFIX_CHARS = 2  # 256 key prefixes per record kind

_ATTEMPT = re.compile(r"attempt-([0-9]{3,})")


def default_state_root(output_uri: str) -> str:
    return f"{output_uri.rstrip('/')}/{STATE_DIR}"


def attempt_dir(attempt: int) -> str:
    return f"attempt-{attempt:03d}"


def plan_rel(attempt: int) -> str:
    """The plan of one attempt, relative to the state root."""
    return f"{attempt_dir(attempt)}/{PLAN_FILE}"


def attempt_of(plan_uri: str) -> int | None:
    """The attempt number a plan URI names, if it names one."""
    match = _ATTEMPT.search(plan_uri)
    return int(match.group(1)) if match else None


def key_prefix(shard_id: str) -> str:
    """A stable hash prefix that spreads a shard's records over the store's key space."""
    return hashlib.blake2b(shard_id.encode(), digest_size=4).hexdigest()[:PREFIX_CHARS]


def claim_key(shard_id: str, epoch: int) -> str:
    return f"{CLAIMS_DIR}/{key_prefix(shard_id)}/{shard_id}/{epoch:04d}.json"


def release_key(shard_id: str, epoch: int) -> str:
    return f"{RELEASES_DIR}/{key_prefix(shard_id)}/{shard_id}/{epoch:04d}.json"


def commit_key(shard_id: str) -> str:
    return f"{COMMITS_DIR}/{key_prefix(shard_id)}/{shard_id}.json"


def steal_key(victim_token: str, end: int) -> str:
    return f"{STEALS_DIR}/{key_prefix(victim_token)}/{victim_token}/{end:012d}.json"


def heartbeat_key(token: str) -> str:
    return f"{WORKERS_DIR}/{token}.json"


def idle_key(token: str) -> str:
    return f"{IDLE_DIR}/{token}"


def shard_of_listed(name: str) -> tuple[str, int | None]:
    """(shard, epoch) of a name listed under claims/, releases/ (``hh/shard/epoch.json``) or
    commits/ (``hh/shard.json``, epoch None)."""
    parts = name.removesuffix(".json").split("/")
    if len(parts) == 3 and parts[2].isdigit():
        return parts[1], int(parts[2])
    return parts[-1], None


def output_name(attempt: int, shard_id: str, epoch: int) -> str:
    """One try's output file, relative to the output root: a try never writes another's file."""
    return f"part-{attempt:03d}-{shard_id}-e{epoch:03d}.parquet"


def quarantine_name(attempt: int, shard_id: str, epoch: int) -> str:
    """Where one try's bad records go; ``_``-prefixed so that dataset readers skip it."""
    return f"{QUARANTINE_DIR}/{output_name(attempt, shard_id, epoch)}"


def attempt_output_prefix(attempt: int) -> str:
    """What every output file of one attempt starts with (finalize removes the losing tries')."""
    return f"part-{attempt:03d}-"
