"""What an ``antbatch worker`` exit code means for its Airflow task, for every launcher.

The local launcher reads the code of its subprocess, the pod launcher that of the pod's
container; both raise the same errors, so a retry policy reads the same on either.
"""

from __future__ import annotations

import signal
from typing import TYPE_CHECKING, Any, Protocol

from airflow_antbatch import exit_codes
from airflow_antbatch.version_compat import AirflowException, AirflowFailException

if TYPE_CHECKING:
    from collections.abc import Mapping


class InfoLog(Protocol):
    """The part of a logger used here: stdlib's, or the structlog one Airflow gives an operator."""

    def info(self, event: str, *args: Any) -> Any: ...


def raise_for_exit(log: InfoLog, worker_id: str, code: int, summary: Mapping[str, Any], *, detail: str = "") -> None:
    """Log a finished worker, or raise: AirflowFailException when a retry cannot help.

    ``code`` is the worker's exit code, or minus the signal that killed it. ``detail`` (e.g.
    why Kubernetes stopped the pod) is added to the message.
    """
    suffix = f" ({detail})" if detail else ""
    if code == exit_codes.OK:
        log.info(
            "%s committed %s shards (%s rows), skipped %s already committed",
            worker_id,
            summary.get("shards_committed"),
            summary.get("rows_committed"),
            summary.get("shards_skipped"),
        )
        return
    if code == exit_codes.PREEMPTED:
        raise AirflowException(f"{worker_id} was preempted (SIGTERM), shards released; retry continues{suffix}")
    if code == exit_codes.SHARDS_FAILED:
        failed = list(summary.get("failed_for_good", []))
        raise AirflowFailException(
            f"{worker_id}: {len(failed)} shards failed for good (max_shard_attempts reached), "
            f"e.g. {failed[:3]}; fix the cause and rerun with force_rerun, see the log above for errors{suffix}"
        )
    if code < 0:
        raise AirflowException(
            f"{worker_id}: antbatch worker was killed by {_signal_name(-code)}{suffix}; "
            "its lease expires and other workers or a retry take its shard over"
        )
    raise AirflowException(f"{worker_id}: antbatch worker exited with code {code}{suffix}; see the log above")


def _signal_name(number: int) -> str:
    try:
        return signal.Signals(number).name
    except ValueError:
        return f"signal {number}"
