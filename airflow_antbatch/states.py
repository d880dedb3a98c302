"""Shard states and the one place that decides them.

The worker, the sensor, the CLI and (later) the UI all ask this module, so their answers
cannot drift apart.
"""

from __future__ import annotations

import enum


class ShardState(enum.StrEnum):
    PENDING = "pending"  # never claimed, or released / expired and waiting for a taker
    LEASED = "leased"  # claimed by an owner whose heartbeat is fresh
    COMMITTED = "committed"  # output durable and commit marker written: final
    FAILED = "failed"  # failed max_shard_attempts times: final


TERMINAL_STATES = frozenset({ShardState.COMMITTED, ShardState.FAILED})


def shard_state(*, committed: bool, failures: int, max_attempts: int, leased_by_live_owner: bool) -> ShardState:
    """Commit wins over everything; then too many failures; then a live lease."""
    if committed:
        return ShardState.COMMITTED
    if failures >= max_attempts:
        return ShardState.FAILED
    if leased_by_live_owner:
        return ShardState.LEASED
    return ShardState.PENDING
