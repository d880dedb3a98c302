"""``ShardLedgerSensor``: the job's success is decided by the ledger, not by task states.

The decision (:func:`judge`) and the progress line (:func:`progress_line`) are plain functions
of a :class:`~airflow_antbatch.ledger.JobStatus`, so that the deferrable trigger
(:class:`~airflow_antbatch.triggers.ledger.ShardLedgerTrigger`) reuses them unchanged and the
sensor only chooses between poking and deferring.

Both read the ledger through a :class:`LedgerWatch`: it retries store errors with the workers'
capped back-off (:func:`~airflow_antbatch.worker.backoff.retry_store`) for ``store_patience``
seconds, so a store restart does not fail the wait, and it times heartbeat changes by the
observer's own monotonic clock (:class:`BeatWatch`), so that "no worker is running" never
compares clocks of different machines (docs/adr/0002-ledger-protocol.md).
"""

from __future__ import annotations

import datetime as dt
import threading
import time
from typing import TYPE_CHECKING, Any

from airflow_antbatch.errors import StoreError
from airflow_antbatch.failure_report import failure_sample, shard_failures
from airflow_antbatch.hooks.storage import reach
from airflow_antbatch.plugins.links import AntBatchJobLink
from airflow_antbatch.version_compat import (
    AirflowException,
    AirflowFailException,
    BaseSensorOperator,
    PokeReturnValue,
    default_deferrable,
)

if TYPE_CHECKING:
    from collections.abc import Callable, Iterable, Sequence

    from airflow_antbatch.ledger import JobStatus, Ledger, WorkerStatus
    from airflow_antbatch.version_compat import Context

FAILURE_SAMPLE = 3
# Airflow's own deferral timeout is a backstop for a triggerer that is down; the trigger's
# deadline, with its clearer message, comes first.
DEFERRAL_TIMEOUT_GRACE_S = 60.0


class JobFailed(Exception):
    """The ledger says the job cannot succeed any more; the message says why."""


class BeatWatch:
    """When each worker's beat counter last moved, by this observer's monotonic clock.

    A worker first seen counts as moving at that moment: a stall is only declared after this
    observer itself watched a beat stand still for the stall timeout. The memory lives in this
    object: the poking sensor keeps it across pokes of one try, the trigger across its polls;
    a reschedule-mode poke or a restarted triggerer starts afresh (and so waits longer).
    """

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self._clock = clock
        self._seen: dict[str, tuple[int, float]] = {}  # token -> (beat, when it was first seen)

    def observe(self, workers: Iterable[WorkerStatus]) -> None:
        now = self._clock()
        for worker in workers:
            seen = self._seen.get(worker.token)
            if seen is None or seen[0] != worker.beat:
                self._seen[worker.token] = (worker.beat, now)

    def silent_for(self, token: str) -> float:
        """Seconds since ``token``'s beat last moved (0 for a worker not seen yet)."""
        seen = self._seen.get(token)
        return 0.0 if seen is None else max(0.0, self._clock() - seen[1])


def _store_errors(call: Callable[[], JobStatus]) -> Callable[[], JobStatus]:
    """``call`` with transport errors raised as StoreError, which ``retry_store`` retries."""

    def wrapped() -> JobStatus:
        try:
            return call()
        except (ConnectionError, TimeoutError) as exc:
            raise StoreError(f"{type(exc).__name__}: {exc}") from exc

    return wrapped


class LedgerWatch:
    """Status reads for a waiting task: store errors retried, beats remembered, plan read once.

    :param store_patience: seconds of store errors to ride out per read; None: as the
        workers do, ``max(120 s, 4 lease TTLs)`` (120 s until the plan is read).
    :param conn_id: the Airflow connection to read through (or the one ``plan_uri`` names),
        looked up on the first read: in the triggerer, for the trigger.
    :param idle_markers: read the workers' idle markers too (``Ledger.status(idle=True)``: one
        listing more), as the elastic pool does to let idle pods go.
    """

    def __init__(
        self,
        plan_uri: str,
        storage_options: dict[str, Any] | None = None,
        *,
        store_patience: float | None = None,
        clock: Callable[[], float] = time.monotonic,
        conn_id: str | None = None,
        idle_markers: bool = False,
    ) -> None:
        self.plan_uri = plan_uri
        self.idle_markers = idle_markers
        self.storage_options = storage_options
        self.conn_id = conn_id
        self.store_patience = store_patience
        self.beats = BeatWatch(clock)
        self.stop = threading.Event()  # set to give up retrying (the trigger's cleanup)
        self._ledger: Ledger | None = None

    @property
    def patience_s(self) -> float:
        if self.store_patience is not None:
            return self.store_patience
        return max(120.0, 4 * self._ledger.ttl_s) if self._ledger is not None else 120.0

    @property
    def max_attempts(self) -> int | None:
        return None if self._ledger is None else self._ledger.plan.spec.max_shard_attempts

    def read(self) -> JobStatus:
        """One status (blocking I/O); store errors are retried, with a warning each, for ``patience_s``."""
        from airflow_antbatch.worker.backoff import retry_store

        status = retry_store(
            _store_errors(self._read_once),
            what=f"reading the ledger of {self.plan_uri}",
            patience_s=self.patience_s,
            stop=self.stop,
        )
        self.beats.observe(status.workers)
        return status

    def judge(self, status: JobStatus, stall_timeout: float | None) -> bool:
        """:func:`judge` with what this watch knows: the plan's max attempts and the beats it saw."""
        return judge(
            status, self.plan_uri, stall_timeout=stall_timeout, max_attempts=self.max_attempts, beats=self.beats
        )

    def _read_once(self) -> JobStatus:
        from airflow_antbatch.ledger import Ledger

        if self._ledger is None:
            self._ledger = Ledger.open(*reach(self.plan_uri, self.conn_id, self.storage_options))
        return self._ledger.status(idle=True) if self.idle_markers else self._ledger.status()


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
    :param conn_id: the Airflow connection to read the ledger through; default the one that
        ``plan_uri`` names (``s3://conn_id@bucket/...``, as the plan task pushes it), if any.
    :param stall_timeout: a worker counts as running while its heartbeat's beat counter moved
        within this many seconds, as the sensor's own clock measures it; with none running,
        unfinished work is abandoned and the sensor fails. None waits for ``timeout`` instead.
        Set it only where the sensor starts after the worker tasks ended (as the task-group
        builder does), or a pod still pending looks abandoned. A worker whose heartbeat says
        it is running is judged silent only after the sensor watched its beat stand still for
        ``stall_timeout``: in poke mode and deferred that memory lasts the whole wait; in
        ``mode="reschedule"`` each poke starts afresh, so such a worker is never judged
        stalled there (exited and absent workers still are) and ``timeout`` ends the wait.
    :param store_patience: seconds of store errors (a store restart, a network blip) to ride
        out per read, retrying with capped back-off and a warning each time; None: as the
        workers, ``max(120 s, 4 lease TTLs)``.
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
        store_patience: float | None = None,
        deferrable: bool | None = None,
        conn_id: str | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        self.plan_uri = plan_uri
        self.storage_options = storage_options
        self.conn_id = conn_id
        self.stall_timeout = stall_timeout
        self.store_patience = store_patience
        self._watch: LedgerWatch | None = None  # one per task try: beats seen across pokes
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
                conn_id=self.conn_id,
                poll_interval=self.poke_interval,
                stall_timeout=self.stall_timeout,
                store_patience=self.store_patience,
                deadline=time.time() + self.timeout,
            ),
            method_name="execute_complete",
            timeout=dt.timedelta(seconds=self.timeout + self.poke_interval + DEFERRAL_TIMEOUT_GRACE_S),
        )

    def execute_complete(self, context: Context, event: dict[str, Any]) -> dict[str, Any]:
        """Resumes from the trigger's event: its compact status, or the failure it reported."""
        from airflow_antbatch.triggers.ledger import ERROR, SUCCESS

        if event.get("status") == SUCCESS:
            self.log.info("%s", event["message"])
            return dict(event["result"])
        message = event.get("message") or f"unexpected ledger trigger event {event!r}"
        if event.get("status") == ERROR:  # the wait broke (e.g. the store stayed down): a retry may do better
            raise AirflowException(message)
        # failed or timeout: a retry of the sensor would not change what the ledger says
        raise AirflowFailException(message)

    def poke(self, context: Context) -> PokeReturnValue:
        if not self.plan_uri or self.plan_uri == "None":
            raise AirflowFailException("no plan URI: the plan task did not push one (did it succeed?)")
        if self._watch is None or self._watch.plan_uri != self.plan_uri:
            self._watch = LedgerWatch(
                self.plan_uri, self.storage_options, store_patience=self.store_patience, conn_id=self.conn_id
            )
        watch = self._watch
        status = watch.read()
        self.log.info("%s", progress_line(status))
        try:
            done = watch.judge(status, self.stall_timeout)
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
    status: JobStatus,
    plan_uri: str,
    *,
    stall_timeout: float | None = None,
    max_attempts: int | None = None,
    beats: BeatWatch | None = None,
) -> bool:
    """True when every shard is committed, False to keep waiting; raises JobFailed when it cannot be.

    ``max_attempts`` (the plan's ``max_shard_attempts``) lets the message count a finished job's
    tries right (see :func:`~airflow_antbatch.failure_report.shard_failures`). ``beats``, which
    has observed ``status``' workers, says how long each running worker's beat has stood still
    by this observer's clock; without it, every running worker counts as live.
    """
    if status.succeeded:
        return True
    if status.failed and status.finished:
        sample = failure_sample(shard_failures(status, max_attempts=max_attempts), FAILURE_SAMPLE)
        raise JobFailed(
            f"{status.failed} of {status.planned} shards failed for good ({status.committed} committed) in "
            f"{plan_uri}; {sample}. Fix the cause, then rerun with force_rerun to start a fresh attempt"
        )
    if stall_timeout is None:
        return False
    if beats is None:
        beats = BeatWatch()
        beats.observe(status.workers)
    running = [w for w in status.workers if w.state == "running"]
    if not any(beats.silent_for(w.token) < stall_timeout for w in running):
        left = status.planned - status.committed - status.failed
        if not status.workers:
            seen = "no worker has sent a heartbeat"
        elif not running:
            seen = "every worker has exited"
        else:
            quietest = min(beats.silent_for(w.token) for w in running)
            seen = f"no running worker's heartbeat has moved for {quietest:.0f}s"
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
