"""``ShardLedgerSensor``: the job's success is decided by the ledger, not by task states.

The decision (:func:`judge`) and the progress line (:func:`progress_line`) are plain functions
of a :class:`~airflow_antbatch.ledger.JobStatus`, so that the deferrable trigger
(:class:`~airflow_antbatch.triggers.ledger.ShardLedgerTrigger`) reuses them unchanged and the
sensor only chooses between poking and deferring.
"""

from __future__ import annotations

import datetime as dt
import time
from typing import TYPE_CHECKING, Any

from airflow_antbatch.failure_report import failure_sample, shard_failures
from airflow_antbatch.plugins.links import AntBatchJobLink
from airflow_antbatch.version_compat import (
    AirflowFailException,
    BaseSensorOperator,
    PokeReturnValue,
    default_deferrable,
)

if TYPE_CHECKING:
    from collections.abc import Sequence

    from airflow_antbatch.ledger import JobStatus
    from airflow_antbatch.version_compat import Context

FAILURE_SAMPLE = 3
# Airflow's own deferral timeout is a backstop for a triggerer that is down; the trigger's
# deadline, with its clearer message, comes first.
DEFERRAL_TIMEOUT_GRACE_S = 60.0


class JobFailed(Exception):
    """The ledger says the job cannot succeed any more; the message says why."""


class ShardLedgerSensor(BaseSensorOperator):
    """Succeeds once every shard is committed, even if some worker tasks failed on the way.

    Fails fast, with the count and a sample of the errors, once the ledger says the job can no
    longer finish: every shard is settled and some failed for good, or (with ``stall_timeout``)
    shards are left and no worker is running. Its XCom value is a compact status (shards,
    rows, workers).

    With ``deferrable=True`` it checks the ledger once and, unless that settles it, hands the
    wait to :class:`~airflow_antbatch.triggers.ledger.ShardLedgerTrigger` in the triggerer,
    freeing its worker slot; the trigger logs the same progress line every
    ``poke_interval`` and gives up after ``timeout`` with the progress in the message.
    Otherwise it pokes (``mode="poke"`` or ``"reschedule"``).

    :param plan_uri: the plan written by the plan task (templated: usually its XCom).
    :param storage_options: fsspec options for the ledger's store (no credentials).
    :param stall_timeout: a worker counts as running while its heartbeat is younger than this;
        with none running, unfinished work is abandoned and the sensor fails. None waits for
        ``timeout`` instead. Set it only where the sensor starts after the worker tasks ended
        (as the task-group builder does), or a pod still pending looks abandoned.
    :param deferrable: wait in the triggerer instead of poking (needs a running triggerer);
        default the deployment's ``[operators] default_deferrable`` (False unless set), as the
        cncf-kubernetes operators do, so a deployment without a triggerer never hangs on it.
    """

    template_fields: Sequence[str] = ("plan_uri",)
    ui_color = "#e8fef0"
    operator_extra_links = (AntBatchJobLink(),)  # the job's progress page in the Airflow UI

    def __init__(
        self,
        *,
        plan_uri: str,
        storage_options: dict[str, Any] | None = None,
        stall_timeout: float | None = None,
        deferrable: bool | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        self.plan_uri = plan_uri
        self.storage_options = storage_options
        self.stall_timeout = stall_timeout
        self.deferrable = default_deferrable() if deferrable is None else deferrable

    def execute(self, context: Context) -> Any:
        if not self.deferrable:
            return super().execute(context)
        first = self.poke(context)  # a finished job (a cleared, finished night) needs no trigger
        if first.is_done:
            return first.xcom_value
        from airflow_antbatch.triggers.ledger import ShardLedgerTrigger

        self.defer(
            trigger=ShardLedgerTrigger(
                plan_uri=self.plan_uri,
                storage_options=self.storage_options,
                poll_interval=self.poke_interval,
                stall_timeout=self.stall_timeout,
                deadline=time.time() + self.timeout,
            ),
            method_name="execute_complete",
            timeout=dt.timedelta(seconds=self.timeout + self.poke_interval + DEFERRAL_TIMEOUT_GRACE_S),
        )

    def execute_complete(self, context: Context, event: dict[str, Any]) -> dict[str, Any]:
        """Resumes from the trigger's event: its compact status, or the failure it reported."""
        from airflow_antbatch.triggers.ledger import SUCCESS

        if event.get("status") == SUCCESS:
            self.log.info("%s", event["message"])
            return dict(event["result"])
        # failed or timeout: a retry of the sensor would not change what the ledger says
        raise AirflowFailException(event.get("message") or f"unexpected ledger trigger event {event!r}")

    def poke(self, context: Context) -> PokeReturnValue:
        from airflow_antbatch.ledger import Ledger

        if not self.plan_uri or self.plan_uri == "None":
            raise AirflowFailException("no plan URI: the plan task did not push one (did it succeed?)")
        ledger = Ledger.open(self.plan_uri, self.storage_options)
        status = ledger.status()
        self.log.info("%s", progress_line(status))
        try:
            done = judge(
                status,
                self.plan_uri,
                stall_timeout=self.stall_timeout,
                max_attempts=ledger.plan.spec.max_shard_attempts,
            )
        except JobFailed as exc:
            raise AirflowFailException(str(exc)) from exc
        return PokeReturnValue(is_done=done, xcom_value=compact(status, self.plan_uri) if done else None)


def progress_line(status: JobStatus) -> str:
    """One log line per poke: shards by state, rows, throughput, ETA."""
    eta = "-" if status.eta_s is None else f"{status.eta_s:.0f}s"
    rows = f"{status.rows_committed}" + (f"/{status.rows_planned}" if status.rows_planned is not None else "")
    return (
        f"{status.committed}/{status.planned} shards committed ({status.leased} leased, {status.pending} pending, "
        f"{status.failed} failed); {rows} rows, {status.rows_per_s:.1f} rows/s, ETA {eta}"
    )


def judge(
    status: JobStatus, plan_uri: str, *, stall_timeout: float | None = None, max_attempts: int | None = None
) -> bool:
    """True when every shard is committed, False to keep waiting; raises JobFailed when it cannot be.

    ``max_attempts`` (the plan's ``max_shard_attempts``) lets the message count a finished job's
    tries right (see :func:`~airflow_antbatch.failure_report.shard_failures`).
    """
    if status.succeeded:
        return True
    if status.failed and status.finished:
        sample = failure_sample(shard_failures(status, max_attempts=max_attempts), FAILURE_SAMPLE)
        raise JobFailed(
            f"{status.failed} of {status.planned} shards failed for good ({status.committed} committed) in "
            f"{plan_uri}; {sample}. Fix the cause, then rerun with force_rerun to start a fresh attempt"
        )
    if stall_timeout is not None and not any(
        w.state == "running" and w.last_beat_age_s < stall_timeout for w in status.workers
    ):
        left = status.planned - status.committed - status.failed
        last = min((w.last_beat_age_s for w in status.workers), default=None)
        seen = "no worker has sent a heartbeat" if last is None else f"the last worker heartbeat was {last:.0f}s ago"
        raise JobFailed(
            f"{left} of {status.planned} shards are left but no worker is running ({seen}) in {plan_uri}; "
            "clear the worker tasks to continue (committed shards are kept)"
        )
    return False


def compact(status: JobStatus, plan_uri: str) -> dict[str, Any]:
    """What the sensor hands downstream through XCom: small, plain values."""
    return {
        "plan_uri": plan_uri,
        "shards": status.planned,
        "committed": status.committed,
        "rows": status.rows_committed,
        "workers": sorted({w.worker_id for w in status.workers}),
    }
