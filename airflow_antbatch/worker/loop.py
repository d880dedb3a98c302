"""The worker: claims shards from the ledger, runs them through the pipeline, commits them.

A worker does not own shards: it pulls them from the ledger, so fast workers take more and
the last live worker finishes a dead worker's shards once their lease expires.

NOTE [read-ahead]: a lease is held from its claim until its shard is committed, so the leases
held are what the pipeline can work on. Holding the shard being scored and the next is enough
where a shard is many batches or one stage takes most of the time; small shards through several
stages (models on devices) leave stages waiting. So the worker holds a window of tries. It
starts at one per model stage and one ahead (``first_window``): at the start every stage waits
for input, and through a chain of models on devices a window of two stalled the fill until the
first shard committed (device_chain, 12 shards of two batches through three simulated devices:
3.8 s to score them with two, 3.3-3.6 s with four). No wider: a window that starts wide
everywhere walks each worker's read-ahead into the parts of its run that thieves took while it
started (16 workers on 400 tiny shards: collisions 30 -> 160, steals 28 -> 65, ledger requests
per shard 5.2-5.5 -> 6.0-6.3). It widens by one at each settle after which the first model
stage waited for input while the reader waited for the window (``_adapt_window``), up to
MAX_LEASES and no more rows than the pipeline holds when fed (the batches each stage works on
at once, two a preprocess process, and a full queue before the first model:
``read_ahead_rows``), and narrows by one after
CALM_SETTLES settles in a row without such a wait. Each lease is one claim either way; what
costs is holding: tries held ahead are out of reach of idle workers' steals, and without
backups the job waits for them. So the window stays wide only where it buys throughput, it
never holds more than its run has left (so it reaches the tail with two at most), and at the
tail (its run and retries out), or after a failed try until one commits (a broken hook fails
what is read ahead too), it claims no more than the try being scored and one ahead. A worker
alone in its job (no other has beaten: ``Claimer.alone``) keeps no one from anything by holding:
its window neither narrows nor shrinks with its run.

NOTE [races]: at the tail a try may be raced by a backup (docs/adr/0002-ledger-protocol.md,
Backups). A thread watches the tries in such a race, only there, one GET each per watch
interval: a worker's own backup and, once its run is out, its tries that someone backed up.
A backed-up try it has not started (the one read ahead) is handed over: dropped unscored and
released. A try whose shard another try committed is dropped at once (``flow.fail``), so the
worker goes on to its next shard instead of finishing rows that will be thrown away.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import io
import logging
import threading
import time
from typing import TYPE_CHECKING, Any, TypeVar

import pyarrow as pa
import pyarrow.parquet as pq

from airflow_antbatch import layout
from airflow_antbatch.errors import AntBatchError, ShardError, StoreError
from airflow_antbatch.ledger import DRAINING
from airflow_antbatch.store import AtomicStore
from airflow_antbatch.worker.backoff import retry_store
from airflow_antbatch.worker.claims import Claimer
from airflow_antbatch.worker.drain import RecentPace, estimated_rows, slowest, tries_to_finish
from airflow_antbatch.worker.heartbeat import Heartbeat
from airflow_antbatch.worker.local import available_cpus
from airflow_antbatch.worker.model_stage import ScoringStage
from airflow_antbatch.worker.near_cache import CacheOptions, NearCache
from airflow_antbatch.worker.pipeline import Pipeline, PipelineOptions
from airflow_antbatch.worker.progress import ProgressLog
from airflow_antbatch.worker.reader import iter_batches
from airflow_antbatch.worker.stages import POLL_S, QUEUE_DEPTH

if TYPE_CHECKING:
    from collections.abc import Callable, Iterator

    from airflow_antbatch.ledger import Lease, Ledger, WorkerIdentity
    from airflow_antbatch.shards import Shard
    from airflow_antbatch.worker.job_code import JobCode
    from airflow_antbatch.worker.pipeline import ShardWork

log = logging.getLogger(__name__)
T = TypeVar("T")


class Overtaken(AntBatchError):
    """Set as a try's error to drop its rows: another try committed the shard, or (``handed_over``)
    a backup started on a try this worker had not started scoring."""

    def __init__(self, shard_id: str, *, handed_over: bool) -> None:
        what = "handed over to a backup" if handed_over else "committed by another try"
        super().__init__(f"shard {shard_id} {what}")
        self.handed_over = handed_over


MAX_LEASES = 6  # tries held at once, however small the shards (NOTE [read-ahead])
TAIL_LEASES = 2  # the narrowest window, and the one at the tail: the shard being scored and one read ahead
# The window widens when, since the last shard settled, the first model stage waited for input
# more than this share of the time while the reader waited for the window.
STARVED_SHARE = 0.05
CALM_SETTLES = 4  # ... and narrows by one after this many settles in a row with no such wait
RACE_WATCHES_PER_POLL = 8  # how often a try in a race looks for its rival's commit, per poll interval
# ... but never more often than this: each look is a GET per try in hand, and a thousand workers
# at the tail watching every 10 ms (an eighth of a fast pace) would cost 10^5 GETs a second.
MIN_RACE_WATCH_S = 0.05
TIMELINE_BUCKET_S = 10  # rows committed per 10 s, carried in the heartbeat for the status timeline
TIMELINE_BUCKETS = 360  # an hour of them; older buckets drop off


@dataclasses.dataclass
class WorkerSummary:
    """What one worker process did; printed, and pushed to XCom by the Airflow side."""

    worker_id: str
    token: str
    outcome: str = "running"  # finished | preempted | failed
    shards_committed: int = 0
    rows_committed: int = 0
    shards_skipped: int = 0  # found already committed (a rerun, or another worker was first)
    shards_failed: int = 0  # tries of this worker that failed
    shards_lost: int = 0  # processed, but another try committed first
    rows_lost: int = 0  # the rows of those tries: work wasted (backups and zombies)
    shards_handed_over: int = 0  # read ahead, then left unscored to a backup that started on them
    rows_quarantined: int = 0
    failed_for_good: list[str] = dataclasses.field(default_factory=list)
    stopped_job: str | None = None  # the error that stopped the whole job (same_error_limit)
    seconds: float = 0.0
    rows_per_s: float = 0.0
    time_to_first_batch_s: float | None = None  # from the process's start to the first batch scored
    requests: dict[str, int] = dataclasses.field(default_factory=dict)
    cpu_budget: int = 0
    preprocess_processes: int = 0  # at the end (elastic scaling may have moved it)
    preprocess_restarts: int = 0  # children replaced after dying
    stages: dict[str, dict[str, float | int]] = dataclasses.field(default_factory=dict)
    scaling: list[dict[str, Any]] = dataclasses.field(default_factory=list)
    cache: dict[str, int] = dataclasses.field(default_factory=dict)  # near cache: hits, misses, bytes
    claiming: dict[str, int] = dataclasses.field(default_factory=dict)  # claims, collisions, steals, ...

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


class Worker:
    """Processes shards of one job until every shard is committed or failed for good."""

    def __init__(
        self,
        ledger: Ledger,
        identity: WorkerIdentity,
        code: JobCode,
        *,
        options: PipelineOptions | None = None,
        stop: threading.Event | None = None,
        poll_interval_s: float | None = None,
        cache: CacheOptions | None = None,
        progress_interval_s: float = 30.0,
        slot: tuple[int, int] | None = None,
        drain_s: float = 0.0,
    ) -> None:
        self.ledger = ledger
        self.plan = ledger.plan
        self.identity = identity
        self.stop = stop or threading.Event()
        ttl = float(self.plan.spec.lease_ttl_s)
        # How long a store outage is ridden out before the worker gives up (and its task retries).
        self.store_patience_s = max(120.0, 4 * ttl)
        self.poll_interval_s = poll_interval_s or min(5.0, max(0.1, ttl / 4))
        self.output = AtomicStore(self.plan.spec.output_uri, dict(self.plan.spec.storage_options))
        options = options or PipelineOptions(cpu_budget=available_cpus())
        self.cache = NearCache(dict(self.plan.spec.storage_options), cache)
        self.pipeline = Pipeline(
            code,
            options,
            read=self._read,
            finish=self._finish,
            quarantine_limit=self.plan.spec.quarantine_limit,
        )
        self.summary = WorkerSummary(identity.worker_id, identity.token, cpu_budget=options.cpu_budget)
        self._started = time.monotonic()
        self._changed = threading.Condition()
        self._leases: dict[str, Lease] = {}  # the tries in flight, in claim order (the first is being scored)
        self._raced: set[str] = set()  # tries known to have a rival: watched for its commit
        self._race_reads = 0  # GETs of the race watch
        self._races_stop = threading.Event()
        self._races = threading.Thread(target=self._watch_races, name="antbatch-races", daemon=True)
        self._timeline: dict[int, int] = {}  # bucket start (epoch s) -> rows committed
        self._streak: tuple[str, list[str]] = ("", [])  # an error, and the shards it failed in a row
        self._window = first_window(len(code.runners))  # tries it may hold (NOTE [read-ahead])
        self._window_wait_s = 0.0  # the reader's time waiting for the window to open
        self._starved: tuple[float, float, float] | None = None  # first model's wait, reader's, at: last settle
        self._calm = 0  # settles in a row since the first model last waited for want of a claim
        self._most_held = 0  # the most tries held at once: the summary's read_ahead_window
        self._drain_s = drain_s  # after a stop, how long it may finish what it holds (NOTE [drain])
        self._pace = RecentPace()
        self._ran = threading.Event()  # pipeline.run returned: nothing left to drain
        self._drained = threading.Event()  # stopped, and nothing kept to finish: store retries end
        self._drainer = threading.Thread(target=self._drain, name="antbatch-drain", daemon=True)
        self.claimer = Claimer(ledger, identity, slot=slot, poll_interval_s=self.poll_interval_s, stop=self.stop)
        self._heartbeat = Heartbeat(ledger, identity, max(0.05, ttl / 4), self._stats)
        self._progress = ProgressLog(self.summary, self.claimer.run_left, progress_interval_s)

    def _stats(self) -> dict[str, Any]:
        elapsed = max(1e-9, time.monotonic() - self._started)
        return {
            "shards_committed": self.summary.shards_committed,
            "rows_committed": self.summary.rows_committed,
            "rows_per_s": self.summary.rows_committed / elapsed,
            "current_shard": min(list(self._leases), default=None),
            "rows_quarantined": self.summary.rows_quarantined,
            "rows_lost": self.summary.rows_lost,
            "timeline": sorted(self._timeline.items()),
            "preprocess_processes": self.pipeline.scaler.processes,
            **self.claimer.heartbeat_fields(),
        }

    def run(self) -> WorkerSummary:
        self._patiently(self._heartbeat.start, "writing the first heartbeat")
        final = "failed"
        if self.plan.spec.backup_tries:
            self._races.start()
        self._drainer.start()
        try:
            self.pipeline.run(self._claims())
            final = "preempted" if self.stop.is_set() else "finished"
        finally:
            self._races_stop.set()
            self._ran.set()
            for thread in (self._races, self._drainer):
                if thread.is_alive():
                    thread.join()
            self._progress.stop()
            for work in self.pipeline.unfinished:
                self._release_quietly(work.lease, "worker stopped on an error")
            self.cache.close()
            self._fill_summary(final)
            self._heartbeat.stop(final)
            self.summary.requests = dict(self.ledger.store.counts)
        return self.summary

    def _fill_summary(self, outcome: str) -> None:
        summary = self.summary
        summary.outcome = outcome
        summary.seconds = time.monotonic() - self._started
        summary.rows_per_s = summary.rows_committed / max(1e-9, summary.seconds)
        summary.preprocess_processes = self.pipeline.scaler.processes
        summary.preprocess_restarts = self.pipeline.pool_restarts
        summary.stages = {name: clock.to_dict() for name, clock in self.pipeline.clocks.items()}
        summary.scaling = [d.to_dict() for d in self.pipeline.scaler.decisions]
        summary.cache = self.cache.stats.to_dict()
        summary.claiming = {
            **self.claimer.stats.to_dict(),
            "race_reads": self._race_reads,
            "read_ahead_window": self._most_held,
        }
        summary.shards_skipped = self.claimer.stats.skipped
        summary.failed_for_good = list(self.claimer.failed_for_good)
        summary.stopped_job = summary.stopped_job or self.claimer.stopped_by

    # -- claiming ------------------------------------------------------------------------------

    def read_ahead_rows(self) -> int:
        """The rows the pipeline holds when fed: the batches each stage works on at once and a
        full queue before the first model (NOTE [read-ahead]). A pool of preprocess processes
        works on two a process: read only a batch a stage ahead, a pool grown to 13 processes on a
        16-core GPU machine had three shards of four batches to share, and its processes sat idle
        three quarters of the time while the model waited."""
        spec = self.plan.spec
        batch_size = spec.model_stages[0].batch_size or spec.batch_size
        return batch_size * (sum(stage.holds() for stage in self.pipeline.stages) + QUEUE_DEPTH)

    def _wants_another(self, run_left: int) -> bool:
        held = [self.plan.shard_rows(self.plan.index_of(shard_id)) for shard_id in self._leases]
        one_ahead = self.claimer.at_tail() or bool(self._streak[1])
        return wants_another(held, self.read_ahead_rows(), window=self._window, run_left=run_left, one_ahead=one_ahead)

    def _run_cap(self) -> int:
        """The run left, which caps the tries held (NOTE [read-ahead]); first, where the answer
        changes what the worker holds (its run is nearly out, or a calm window would narrow next),
        whether it is alone in the job. A worker alone holds what its pipeline needs to the end:
        through three simulated devices, a lone worker's window narrowed when calm and shrank with
        its run, and its last shards came one at a time, each read and preprocessed while the
        devices waited (device_chain: about 1,974 rows/s against 1,861 before, medians of 12).
        Called outside the lock: it may list the heartbeats."""
        left = self.claimer.run_left()
        narrowing = self._window > TAIL_LEASES and self._calm >= CALM_SETTLES - 1
        if left < self._window or narrowing:
            self._patiently(self.claimer.alone, "listing workers")
        return MAX_LEASES if self.claimer.found_alone else left

    def _adapt_window(self) -> None:
        """One more try in the window when, since the last shard settled, the first model stage
        waited for input while the reader waited for the window; one fewer after CALM_SETTLES
        settles without (NOTE [read-ahead]). The first settle only starts the count: every
        stage waits for the job's first batch."""
        first = next((stage for stage in self.pipeline.stages if isinstance(stage, ScoringStage)), None)
        if first is None:
            return
        model, now = first.clock, time.monotonic()
        last, self._starved = self._starved, (model.wait_in_s, self._window_wait_s, now)
        if last is None:
            return
        model_waited, reader_waited, since = last
        if model.wait_in_s - model_waited > STARVED_SHARE * (now - since) and self._window_wait_s > reader_waited:
            self._window, self._calm = min(MAX_LEASES, self._window + 1), 0
            return
        self._calm += 1
        if self._calm >= CALM_SETTLES:  # a wait now and then (a slow claim) must not ratchet it up
            self._window = self._window if self.claimer.found_alone else max(TAIL_LEASES, self._window - 1)
            self._calm = 0

    def _claims(self) -> Iterator[tuple[Lease, Shard]]:
        """Claimed shards for the pipeline's reader, as many as it needs ahead (NOTE [read-ahead])."""
        self._progress.start()
        while not self.stop.is_set():
            run_left = self._run_cap()
            with self._changed:  # woken by a shard settling (_finish), checked under the same lock
                if not self._wants_another(run_left):
                    started = time.monotonic()
                    self._changed.wait(self.poll_interval_s)
                    self._window_wait_s += time.monotonic() - started
                    continue
            lease = self._patiently(lambda: self.claimer.next_lease(self._wait), "claiming")
            if lease is None:
                with self._changed:
                    if not self._leases or self.stop.is_set():
                        return
                    self._changed.wait(self.poll_interval_s)  # a try in flight may still fail
                continue
            with self._changed:
                duplicate = lease.shard_id in self._leases
                if not duplicate:
                    self._leases[lease.shard_id] = lease
                    self._most_held = max(self._most_held, len(self._leases))
            if duplicate:  # never expected: the pipeline keys its work by shard, so give it back
                log.error(
                    "%s: a second try of shard %s while one is in flight", self.identity.worker_id, lease.shard_id
                )
                self._release_quietly(lease, "a second try while one was in flight")
                continue
            if self.claimer.at_tail():  # idle workers judge steals and backups from its heartbeat: fresh
                with contextlib.suppress(StoreError):
                    self._heartbeat.beat()
            yield lease, self.plan.shard(self.plan.index_of(lease.shard_id))

    # -- stopping ------------------------------------------------------------------------------

    def _drain(self) -> None:
        """Once stopped: keep scoring the tries at the front that commit within the drain budget,
        give the others back now, and what is kept but not committed when it runs out (NOTE [drain])."""
        while not self.stop.wait(POLL_S):
            if self._ran.is_set():
                return
        flow = self.pipeline.flow
        with self._changed:
            held = list(self._leases)
        rows_left = [self._rows_left(shard_id) for shard_id in held]
        rate = slowest(self._pace.rows_per_s(), *(self._rate_so_far(shard_id) for shard_id in held[:1]))
        keep = held[: tries_to_finish(rows_left, rate, self._drain_s)]
        flow.give_back(keep)
        if keep:
            self._finish_kept(keep, rows_left[: len(keep)], len(held) - len(keep))
        self._drained.set()

    def _finish_kept(self, keep: list[str], rows_left: list[int | None], others: int) -> None:
        """Drain: the heartbeat says so (the heir of its slot then leaves these tries alone) until
        they are committed or the budget runs out."""
        self._heartbeat.state = DRAINING
        log.warning(
            "%s: stopped; finishing %s (%s rows) within %.0fs, giving back %d other tries",
            self.identity.worker_id,
            ", ".join(keep),
            "unknown" if None in rows_left else sum(left or 0 for left in rows_left),
            self._drain_s,
            others,
        )
        with contextlib.suppress(StoreError):
            self._heartbeat.beat()
        if not self._ran.wait(self._drain_s):
            log.warning(
                "%s: the drain ran out after %.0fs; giving the rest back", self.identity.worker_id, self._drain_s
            )
            self.pipeline.flow.give_back()

    def _rate_so_far(self, shard_id: str) -> float | None:
        """Rows per second of a try in flight since its first row was read: slow while the
        pipeline fills, so on the safe side."""
        work = self.pipeline.flow.shards.get(shard_id)
        if work is None or not work.rows:
            return None
        return work.rows / max(1e-9, time.monotonic() - work.started)

    def _rows_left(self, shard_id: str) -> int | None:
        """Rows of a try in flight not yet through the last model stage; None where neither the
        plan nor this worker's commits say how many rows the shard holds."""
        work = self.pipeline.flow.shards.get(shard_id)  # None: claimed, not read yet
        shard = work.shard if work is not None else self.plan.shard(self.plan.index_of(shard_id))
        rows = estimated_rows(shard, self._pace.rows_per_byte())
        if rows is None:
            return None
        return max(0, rows - (work.rows + work.rows_quarantined if work is not None else 0))

    def _wait(self, seconds: float) -> None:
        """How the claimer waits: woken early when a shard in flight settles or the worker stops."""
        with self._changed:
            self._changed.wait(seconds)

    def _read(self, shard: Shard) -> Iterator[pa.RecordBatch]:
        """The shard's batches; its small files are fetched many at a time ahead of the reader."""
        spec = self.plan.spec
        batch_size = spec.model_stages[0].batch_size or spec.batch_size
        plan = self.plan
        columns = (plan.input_columns, plan.columns_from or "?") if plan.input_columns is not None else None
        self.cache.prefetch(shard)
        try:
            yield from iter_batches(
                shard,
                plan.input_format,
                batch_size,
                dict(spec.storage_options),
                opener=self.cache.open,
                columns=columns,
            )
        finally:
            self.cache.forget(shard)

    # -- finishing -----------------------------------------------------------------------------

    def _finish(self, work: ShardWork) -> None:
        """Commit, fail or give back one shard whose every row has left the model stages."""
        shard_id = work.shard.shard_id
        done = False
        try:
            done = self._settle(work)
        finally:
            if done or not self.stop.is_set():  # else the final heartbeat lists it as still held
                self.claimer.settle(work.lease, done=done)  # not done: another try, or failed for good
            with self._changed:
                self._leases.pop(shard_id, None)
                self._raced.discard(shard_id)
                self._adapt_window()
                self._changed.notify_all()
        if done:  # fresh counts for status, and the claimer's pace for backups; the thread retries
            with contextlib.suppress(StoreError):
                self._heartbeat.beat()

    def _settle(self, work: ShardWork) -> bool:
        """True once the shard is committed (by this try or another); False to look again."""
        lease = work.lease
        if isinstance(work.error, Overtaken):
            return self._give_up(work, work.error)
        if self.pipeline.flow.given_back(lease.shard_id):
            self.ledger.release(lease, reason="preempted", failed=False)
            log.warning("%s: released shard %s on SIGTERM", self.identity.worker_id, lease.shard_id)
            return False
        limit = self.plan.spec.quarantine_limit
        if len(work.quarantined) > limit:
            # The cause, whether the preprocess stage stopped the shard early for it or not.
            reasons = "; ".join(sorted({q.reason for q in work.quarantined})[:3])
            work.error = ShardError(
                f"shard {lease.shard_id}: {len(work.quarantined)} bad records, more than quarantine_limit={limit} "
                f"(e.g. {reasons})"
            )
        if isinstance(work.error, StoreError):
            # The store, not the shard: give the try back uncounted and claim the shard again.
            log.warning("%s: shard %s: %s; giving it back", self.identity.worker_id, lease.shard_id, work.error)
            self._release_quietly(lease, "store error while reading")
            return False
        if work.error is not None:
            self.summary.shards_failed += 1
            error = f"{type(work.error).__name__}: {work.error}"
            log.error("%s: shard %s failed (try %d): %s", self.identity.worker_id, lease.shard_id, lease.epoch, error)
            self.ledger.release(lease, reason="failed", failed=True, error=error)
            self._count_failure(lease.shard_id, error)
            return False
        try:
            return self._write_and_commit(work)
        except StoreError:
            # Not the shard's fault: give the try back uncounted, then stop this worker.
            self._release_quietly(lease, "store error")
            raise

    def _write_and_commit(self, work: ShardWork) -> bool:
        lease, shard_id = work.lease, work.shard.shard_id
        table = pa.concat_tables(work.tables, promote_options="default") if work.tables else pa.table({})
        name = layout.output_name(self.plan.attempt, shard_id, lease.epoch)
        quarantine = self._write_quarantine(work) if work.quarantined else None
        # Durable output first, commit second: a crash in between leaves an uncommitted file of
        # this try's own, which no commit names and finalize removes.
        data = _parquet_bytes(table)
        self._patiently(lambda: self.output.put(name, data, kind="data"), f"writing {name}")
        if not self._patiently(lambda: self.ledger.holds(lease), "checking the lease"):
            self.summary.shards_lost += 1
            self.summary.rows_lost += table.num_rows
            log.warning("%s: lease on %s was taken over; not committing", self.identity.worker_id, shard_id)
            return False
        quarantined = work.rows_quarantined
        committed = self._patiently(
            lambda: self.ledger.commit(
                lease,
                file=name,
                rows=table.num_rows,
                sha256=hashlib.sha256(data).hexdigest(),
                quarantined=quarantined,
                quarantine_file=quarantine,
            ),
            f"committing {shard_id}",
        )
        if not committed:
            self.summary.shards_lost += 1
            self.summary.rows_lost += table.num_rows
            log.warning("%s: shard %s was committed by another try", self.identity.worker_id, shard_id)
            return True
        self._streak = ("", [])
        self._pace.committed(time.monotonic(), table.num_rows + quarantined, work.shard.size)
        self.summary.shards_committed += 1
        self.summary.rows_committed += table.num_rows
        self.summary.rows_quarantined += quarantined
        bucket = int(time.time()) // TIMELINE_BUCKET_S * TIMELINE_BUCKET_S
        self._timeline[bucket] = self._timeline.get(bucket, 0) + table.num_rows
        while len(self._timeline) > TIMELINE_BUCKETS:
            del self._timeline[min(self._timeline)]
        log.info(
            "%s: committed shard %s (%d rows%s) in %.1fs; this worker: %d shards, %d rows",
            self.identity.worker_id,
            shard_id,
            table.num_rows,
            f", {quarantined} quarantined" if quarantined else "",
            time.monotonic() - work.started,
            self.summary.shards_committed,
            self.summary.rows_committed,
        )
        return True

    def _give_up(self, work: ShardWork, overtaken: Overtaken) -> bool:
        """A try dropped for another (NOTE [races]); True: the shard needs nothing more from this worker."""
        if overtaken.handed_over:  # released, so that a takeover of a dead backer need not wait a TTL
            self._release_quietly(work.lease, "handed over to a backup")
            self.summary.shards_handed_over += 1
        else:  # it was being scored: count its rows as wasted, scored or not
            self.summary.shards_lost += 1
            self.summary.rows_lost += work.shard.rows or work.rows
        log.info("%s: %s", self.identity.worker_id, overtaken)
        return True

    # -- races at the tail (NOTE [races]) -------------------------------------------------------

    def _watch_races(self) -> None:
        while not self._races_stop.wait(self._race_interval()):
            try:
                self._look_at_races()
            except StoreError as exc:  # a blip: the fencing read and the commit still decide
                log.warning("%s: watching races: %s", self.identity.worker_id, exc)

    def _race_interval(self) -> float:
        """An eighth of a poll, or of this worker's pace if shorter (a handover must come before
        the try read ahead starts): the watch costs GETs only at the tail."""
        pace = self.claimer.pace()
        return max(MIN_RACE_WATCH_S, min(self.poll_interval_s, pace or self.poll_interval_s) / RACE_WATCHES_PER_POLL)

    def _look_at_races(self) -> None:
        with self._changed:
            leases = list(self._leases.values())
        at_tail = self.claimer.at_tail()
        for place, lease in enumerate(leases):
            shard_id = lease.shard_id
            if shard_id not in self._raced:
                backup = self.claimer.is_backup(shard_id)
                if not backup and at_tail:
                    self._race_reads += 1
                if backup or (at_tail and self.ledger.backed_up(lease)):
                    self._raced.add(shard_id)
                else:
                    continue
                if place > 0 and not backup:
                    self._drop(shard_id, Overtaken(shard_id, handed_over=True))
                    continue
            self._race_reads += 1
            if self.ledger.committed_by_another(lease):
                self._drop(shard_id, Overtaken(shard_id, handed_over=False))

    def _drop(self, shard_id: str, overtaken: Overtaken) -> None:
        """Let the pipeline drop the try's rows; the writer then hands it to ``_finish`` as usual."""
        work = self.pipeline.flow.shards.get(shard_id)
        if work is None:  # claimed, not yet read: next look
            self._raced.discard(shard_id)
            return
        work.fail(overtaken)

    def _count_failure(self, shard_id: str, error: str) -> None:
        """Stop the job when one error fails ``same_error_limit`` shards in a row, or when another
        worker already stopped it: a broken hook or model would otherwise be tried on every
        shard ``max_shard_attempts`` times (3 x 10^6 tries at a million shards)."""
        previous, shards = self._streak
        shards = [*shards, shard_id] if error == previous else [shard_id]
        self._streak = (error, list(dict.fromkeys(shards)))
        done = self._patiently(self.ledger.read_done, "reading done.json")
        stopped = done.get("stopped") if done is not None else None
        if stopped is None and len(self._streak[1]) >= self.plan.spec.same_error_limit:
            self._patiently(lambda: self.ledger.write_stop(error, self._streak[1]), "stopping the job")
            stopped = error
            log.error(
                "%s: stopping the job: %d shards in a row failed with %s",
                self.identity.worker_id,
                len(self._streak[1]),
                error,
            )
        if stopped is not None:
            self.summary.stopped_job = str(stopped)
            self.claimer.finished = True

    def _write_quarantine(self, work: ShardWork) -> str:
        """The shard's bad records as they were read, each with the reason it was set aside."""
        tables = [
            pa.Table.from_batches([q.batch]).append_column("_antbatch_reason", pa.array([q.reason] * q.batch.num_rows))
            for q in work.quarantined
        ]
        name = layout.quarantine_name(self.plan.attempt, work.shard.shard_id, work.lease.epoch)
        data = _parquet_bytes(pa.concat_tables(tables, promote_options="default"))
        self._patiently(lambda: self.output.put(name, data, kind="data"), f"writing {name}")
        return name

    def _patiently(self, call: Callable[[], T], what: str) -> T:
        # Once stopped, a store outage is ridden out only while kept tries drain (NOTE [drain]).
        return retry_store(call, what=what, patience_s=self.store_patience_s, stop=self._drained)

    def _release_quietly(self, lease: Lease, reason: str) -> None:
        try:
            self.ledger.release(lease, reason=reason, failed=False)
        except StoreError as exc:
            log.warning("could not release %s after a store error: %s", lease.shard_id, exc)


def first_window(model_stages: int) -> int:
    """The window at the start: a try for each model stage to work on and one read ahead, so
    that a chain fills without waiting for the first commit (NOTE [read-ahead])."""
    return max(TAIL_LEASES, min(MAX_LEASES, model_stages + 1))


def wants_another(
    held_rows: list[int | None], read_ahead_rows: int, *, window: int, run_left: int, one_ahead: bool
) -> bool:
    """Whether a worker holding tries of ``held_rows`` rows (None: not known before reading)
    claims one more (NOTE [read-ahead]); ``one_ahead``: at the tail, or after a failed try.
    Holding no more than its run has left, it reaches the tail holding two at most."""
    held = len(held_rows)
    if held < TAIL_LEASES:
        return True
    if one_ahead or held >= min(window, MAX_LEASES, run_left) or None in held_rows:
        return False
    return sum(r for r in held_rows if r is not None) < read_ahead_rows


def _parquet_bytes(table: pa.Table) -> bytes:
    buffer = io.BytesIO()
    pq.write_table(table, buffer)
    return buffer.getvalue()
