"""Failed tries as people read them: each shard once, with its try count and its last error.

``JobStatus.failures`` lists one (shard, error) per failed try, which is what the ledger knows;
a message that repeats a shard three times hides the other shards. The sensor, the trigger,
finalize and ``antbatch status`` present failures through :func:`shard_failures`, so they say
the same thing. Nothing here reads the store.
"""

from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from collections.abc import Iterable

    from airflow_antbatch.ledger import JobStatus

SAMPLE = 3  # shards a one-line message names


@dataclasses.dataclass(frozen=True)
class ShardFailure:
    shard: str
    tries: int
    last_error: str

    def __str__(self) -> str:
        return f"shard {self.shard} failed {self.tries} {'try' if self.tries == 1 else 'tries'}: {self.last_error}"


def group_failures(failures: Iterable[tuple[str, str]]) -> list[ShardFailure]:
    """One entry per shard, in first-seen order: how many tries failed and the last one's error."""
    tries: dict[str, int] = {}
    last: dict[str, str] = {}
    for shard, error in failures:
        tries[shard] = tries.get(shard, 0) + 1
        last[shard] = error
    return [ShardFailure(shard, count, last[shard]) for shard, count in tries.items()]


def shard_failures(status: JobStatus, *, max_attempts: int | None = None) -> list[ShardFailure]:
    """``status``' failures by shard.

    A finished job's record (``done.json``) keeps only each failed shard's last error, so its
    count would read "1 try". When the job is finished and every listed shard is one that failed
    for good, such a shard had at least ``max_attempts`` tries (the plan's
    ``max_shard_attempts``): pass it where the caller has the plan.
    """
    grouped = group_failures(status.failures)
    if max_attempts is not None and status.finished and len(grouped) == status.failed:
        grouped = [dataclasses.replace(f, tries=max(f.tries, max_attempts)) for f in grouped]
    return grouped


def failure_sample(failures: list[ShardFailure], limit: int = SAMPLE) -> str:
    """``shard a failed 2 tries: E; shard b failed 1 try: F (and 4 more shards)``; '' for none."""
    text = "; ".join(str(f) for f in failures[:limit])
    more = len(failures) - limit
    return text + (f" (and {more} more shard{'s' if more > 1 else ''})" if more > 0 else "")
