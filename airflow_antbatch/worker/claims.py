"""Which shard a worker tries next, at a cost per shard that does not grow with the worker count.

NOTE [claiming]: each worker owns a run of consecutive plan positions ``[cursor, end)`` on the
ring of the plan's n shards: its slot's share (slot r of W: ``r*n/W`` to ``(r+1)*n/W``), or,
without a slot, the whole ring from a point hashed from its id. It claims its run front to back
without investigating: a claim another worker already holds ends the run, since that worker got
there first (from its own start, or by stealing). Then it steals: it reads the heartbeat of a
random busy worker, where each worker publishes its run, and takes the back half of what is
left; the victim learns of it when its own claim at the split point fails. A worker whose steals
find nothing, and which holds no lease, marks itself idle and watches: ``done.json``, one
listing of heartbeats (liveness from versions, no reads) and one of idle markers. It takes over
the leases and run of a worker that exited or whose heartbeat stopped moving for a TTL of its
own clock. Once every worker is idle or taken over, the lowest idle one sweeps (a listing of
commits and one of releases): it claims what is left under the full takeover rules, or writes
``done.json``, which lets every worker exit.

Requests, with S shards and W workers (docs/adr/0002-ledger-protocol.md has the formula):
a claim is one create; a collision adds a commit read and a claim read; a steal one heartbeat
read plus the roster listings (cached for a poll interval); an idle poll one GET and two
listings of ceil(W/1000) pages; the sweep ceil(S/1000) pages plus a GET per release, about once
per job. None of these is paid per shard per worker.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import random
import statistics
import threading
import zlib
from collections import deque
from typing import TYPE_CHECKING, Any

import numpy as np

from airflow_antbatch.ledger import EXITED_STATES, Lease
from airflow_antbatch.states import ShardState

if TYPE_CHECKING:
    from collections.abc import Callable

    import numpy.typing as npt

    from airflow_antbatch.ledger import Ledger, WorkerIdentity

log = logging.getLogger(__name__)

STEAL_TRIES = 4  # steals in a row whose first claim collides before the worker waits a poll
VICTIMS_READ = 2  # heartbeats read per steal: at the tail most runs are too short to split
MIN_STEAL = 2  # a run with fewer positions left is not worth splitting
MAX_SPLIT_HOPS = 8  # steal records followed down one run before trying another victim
IDLE_POLLS = 4  # an idle worker's wait grows to this many poll intervals
MAX_SLOT_PROBES = 8  # other slots' first runs a worker tries, for workers that started late or never
# A backup is started only when the holder still needs BACKUP_GAIN times the backer's pace: a
# fresh try there would finish first, with a margin for its read and commit. Workers of equal
# speed never back up the try the other is scoring (it needs under one pace), only one it holds
# but has not started, which the holder then hands over unscored (see Worker._watch_races).
BACKUP_GAIN = 1.25
# A worker's pace is the median of its last few shard intervals: robust to one slow shard
# (skewed data is as slow for a backup, so it must not make its worker look slow).
PACE_SHARDS = 5


@dataclasses.dataclass
class ClaimStats:
    """How a worker found its work: what the summary and the scale benchmark report."""

    claims: int = 0
    collisions: int = 0  # claims that found another worker's try: the end of a run
    steals: int = 0
    takeovers: int = 0  # workers whose leases and run this one took over
    sweeps: int = 0
    skipped: int = 0  # shards found committed (a rerun, or a lost race)
    backups: int = 0  # speculative tries of shards that a slower worker still held
    # What looking costs (requests): heartbeats read to steal, back up or take over; looks at
    # done.json while idle; roster listings (two listings each); heartbeat listings to tell
    # whether it is alone (one each).
    beats_read: int = 0
    idle_looks: int = 0
    rosters: int = 0
    alone_looks: int = 0

    def to_dict(self) -> dict[str, int]:
        return dataclasses.asdict(self)


@dataclasses.dataclass(frozen=True)
class _Roster:
    """The workers as two listings showed them: heartbeat versions by token, idle markers."""

    read_at: float  # by the ledger's clock
    versions: dict[str, str]
    idle: set[str]
    busy: list[str]  # other tokens without an idle marker: the ones worth stealing from


def parse_slot(text: str) -> tuple[int, int]:
    """``"I/N"``, as launchers pass it (``--slot``), to (I, N); a clear error otherwise."""
    index, _, count = text.partition("/")
    if not (index.isdigit() and count.isdigit() and int(index) < int(count)):
        raise ValueError(f"slot must be I/N with 0 <= I < N, got {text!r}")
    return int(index), int(count)


def first_run(n: int, worker_id: str, slot: tuple[int, int] | None) -> tuple[int, int]:
    """A worker's own run: its slot's share of the plan, or the whole ring from a hashed point."""
    if n == 0:
        return 0, 0
    if slot is not None:
        index, count = slot
        return index * n // count, (index + 1) * n // count
    offset = zlib.crc32(worker_id.encode()) % n
    return offset, offset + n


class Claimer:
    """Hands the worker one lease at a time; see NOTE [claiming] for the order it tries things in."""

    def __init__(
        self,
        ledger: Ledger,
        identity: WorkerIdentity,
        *,
        slot: tuple[int, int] | None = None,
        poll_interval_s: float = 5.0,
        rng: random.Random | None = None,
        stop: threading.Event | None = None,
    ) -> None:
        self.ledger = ledger
        self.identity = identity
        self._n = len(ledger.plan.shards)
        self._cursor, self._end = first_run(self._n, identity.worker_id, slot)
        self._slot = slot
        self._probes_left = MAX_SLOT_PROBES
        self._stolen = False  # the run is the back half of another's: others may be in it too
        self._split_at: int | None = None  # the first position of a run just split off a victim
        self._probe_at: int | None = None  # the first position of a slot's run just probed
        self._committed: npt.NDArray[np.bool_] | None = None  # by position, once listed
        self._poll = poll_interval_s
        self._delay = poll_interval_s / 8  # the next idle wait: doubles up to IDLE_POLLS intervals
        self._rng = rng or random.Random(identity.token)
        self._stop = stop or threading.Event()
        self._retry: deque[str] = deque()  # taken-over leases and sweep leftovers: tried first
        self._later: deque[str] = deque()  # this worker's own failed tries: tried once its run is out
        self._held: dict[str, tuple[int, bool]] = {}  # shard -> (epoch, is a backup), in claim order
        self._backups = ledger.plan.spec.backup_tries
        self._backed_up: set[str] = set()  # shards this worker tried to back up: never twice
        self._seen_beats: dict[str, tuple[float, dict[str, Any]]] = {}  # token -> (read at, its last heartbeat read)
        self._started_at: float | None = None  # by the ledger's clock: the first claim
        self._settled_at: float | None = None  # the last shard this worker finished
        self._intervals: deque[float] = deque(maxlen=PACE_SHARDS)  # seconds between its last settles
        self._handled: set[str] = set()  # tokens whose run and leases were taken over (or hold none)
        self._read_victims: dict[str, str] = {}  # token -> heartbeat version last read to steal
        self._splits: dict[tuple[str, int], int] = {}  # (victim, run end) -> where a thief split it
        self._idle = False
        self._token = identity.token
        self._roster: _Roster | None = None
        self._others_seen = False  # another worker's heartbeat was listed (``alone``)
        self._alone_at: float | None = None  # when ``alone`` last listed the heartbeats
        self._scanned_at: float | None = None  # the roster whose heartbeats _watch last judged
        self._last_sweep: float | None = None
        self._runs: deque[tuple[int, int]] = deque()  # runs a sweep found nobody working on
        self._left_before: set[int] = set()  # positions the last sweep found left
        self._looked_for_done = False
        self._lock = threading.Lock()
        self.stats = ClaimStats()
        self.failed_for_good: list[str] = []
        self.finished = False
        self.stopped_by: str | None = None  # the error that stopped the job, if done.json says so

    # -- what the worker calls ------------------------------------------------------------------

    def next_lease(self, wait: Callable[[float], object]) -> Lease | None:
        """Blocks (only through ``wait(seconds)``) until a lease is won; None once the job is
        finished or the worker is stopping."""
        if not self._looked_for_done:  # a rerun of a finished job costs one GET
            self._looked_for_done = True
            done = self.ledger.read_done()
            if done is not None:
                self.stats.skipped = int(done["committed"] or 0)
                self.stopped_by = done.get("stopped")
                self.finished = True
        while not self.finished and not self._stop.is_set():
            lease = self._claim_without_waiting()
            if lease is not None:
                self._delay = self._poll / 8
                return lease
            if self._has_work() or self._watch():
                continue
            # Idle, the wait grows to IDLE_POLLS poll intervals: at a thousand workers, polls
            # through a long straggler would cost more than the claims. Not while others are busy
            # (the tail): a steal or a backup may soon be worth taking.
            longest = self._tail_poll() or IDLE_POLLS * self._poll
            delay, self._delay = min(self._delay, longest), min(longest, self._delay * 2)
            wait(delay)
        return None

    def settle(self, lease: Lease, *, done: bool) -> None:
        """The worker is finished with ``lease``: done once the shard is committed (by anyone),
        else the shard is tried again (its next epoch, or failed for good)."""
        with self._lock:
            self._held.pop(lease.shard_id, None)
            if done:
                now = self.ledger.clock()
                self._intervals.append(now - (self._settled_at or self._started_at or now))
                self._settled_at = now
            else:  # after the run: a broken hook then shows on fresh shards first
                self._later.append(lease.shard_id)

    def at_tail(self) -> bool:
        """Whether its next claim must come from another worker's share: its run and retries are out."""
        return not self._has_work()

    def pace(self) -> float | None:
        """Its recent seconds per shard, once it has finished one."""
        with self._lock:
            return self._shard_seconds()

    def is_backup(self, shard_id: str) -> bool:
        with self._lock:
            return self._held.get(shard_id, (0, False))[1]

    def run_left(self) -> int:
        """Positions left in this worker's run (others may still steal part of it)."""
        with self._lock:
            return max(0, self._end - self._cursor)

    def alone(self) -> bool:
        """Whether no other worker of the job has beaten, but those whose leases it took over:
        then nobody can steal from its run, and holding tries ahead keeps them from nobody (NOTE
        [read-ahead] in the worker loop). One listing, again at most once a poll interval while
        alone; once another worker has been seen, never again. Not the roster's listings: a
        roster read at the end of a run would stand in for the fresh one that the tail's steals
        and backups read once the run is out."""
        now = self.ledger.clock()
        if not self._others_seen and (self._alone_at is None or now - self._alone_at >= self._poll):
            self._alone_at = now
            self.stats.alone_looks += 1
            self._others_seen = bool(set(self.ledger.worker_versions()) - {self._token} - self._handled)
        return not self._others_seen

    @property
    def found_alone(self) -> bool:
        """What ``alone`` last found, without listing: False until it has listed once."""
        return self._alone_at is not None and not self._others_seen

    def heartbeat_fields(self) -> dict[str, Any]:
        """What other workers read to steal from this one or take its leases over."""
        with self._lock:
            now = self.ledger.clock()
            return {
                "run": [self._cursor, self._end],
                "leases": sorted(s for s, (_, backup) in self._held.items() if not backup),
                "idle": self._idle,
                # For backups: its tries in claim order, its seconds per shard, and since when.
                "queue": [[shard, epoch, backup] for shard, (epoch, backup) in self._held.items()],
                "shard_s": self._shard_seconds(),
                "since_s": now - (self._settled_at or self._started_at or now),
            }

    def _shard_seconds(self) -> float | None:
        """This worker's recent seconds per shard (its throughput, pipelining included)."""
        return statistics.median(self._intervals) if self._intervals else None

    # -- claiming -------------------------------------------------------------------------------

    def _has_work(self) -> bool:
        with self._lock:
            return bool(self._retry or self._later or self._runs) or self._cursor < self._end

    def _claim_without_waiting(self) -> Lease | None:
        lease = self._from_retries(self._retry)
        if lease is None and self._faster_would_finish_sooner():
            return None
        lease = lease or self._from_run() or self._from_retries(self._later)
        tries = 0
        while lease is None and tries < STEAL_TRIES and (self._steal() or self._probe_slot()):
            lease = self._from_run()
            tries += 1
        if lease is None and self._reread_busy():
            lease = self._from_run()
        if lease is None:
            lease = self._back_up()
        if lease is not None:
            self._busy()
        return lease

    def _won(self, lease: Lease, *, backup: bool = False) -> Lease:
        with self._lock:
            self._held[lease.shard_id] = (lease.epoch, backup)
            if self._started_at is None:
                self._started_at = self.ledger.clock()
        self.stats.claims += 1
        return lease

    def _watched(self) -> list[tuple[str, float]]:
        """Busy workers worth reading again at the tail, with their pace: those BACKUP_GAIN times
        slower than this one (a backup, or most of their run) and those whose run, when last
        read, still had positions to steal."""
        with self._lock:
            mine = self._shard_seconds()
        if self._roster is None:
            return []
        busy = set(self._roster.busy) - self._handled
        watched = []
        for token, (_, beat) in self._seen_beats.items():
            pace = float(beat.get("shard_s") or 0.0)
            slower = mine is not None and pace > BACKUP_GAIN * mine
            if token in busy and (slower or self._stealable(token, beat)):
                watched.append((token, pace or self._poll))
        return watched

    def _stealable(self, token: str, heartbeat: dict[str, Any]) -> bool:
        start, end = heartbeat.get("run") or (0, 0)
        while (token, end) in self._splits:  # thieves took the end already
            end = self._splits[(token, end)]
        return end - start >= MIN_STEAL

    def _faster_would_finish_sooner(self) -> bool:
        """At the tail (under MIN_STEAL positions left in its run, a try in hand), a worker that a
        busy one outpaces BACKUP_GAIN times takes no other shard to read ahead, from its run or
        another's: the faster one, soon free, would finish it first (and steals all of so short a
        run from a slower worker). It claims again once its try settles."""
        if self._roster is None or self.run_left() > MIN_STEAL:
            return False
        busy = set(self._roster.busy) - self._handled
        return any(t in busy and self._outpaced_by(beat) for t, (_, beat) in self._seen_beats.items())

    def _outpaced_by(self, heartbeat: dict[str, Any]) -> bool:
        """Whether this worker holds a try and the heartbeat's worker is BACKUP_GAIN times faster."""
        with self._lock:
            mine = self._shard_seconds()
            if mine is None or not self._held:
                return False
        return 0.0 < float(heartbeat.get("shard_s") or 0.0) * BACKUP_GAIN < mine

    def _victim_share(self, heartbeat: dict[str, Any]) -> float | None:
        """The share of its run a victim keeps, by speed, when its pace and this worker's differ
        BACKUP_GAIN times; None otherwise (or unknown): then it keeps half."""
        with self._lock:
            mine = self._shard_seconds()
        pace = float(heartbeat.get("shard_s") or 0.0)
        if mine is None or pace <= 0.0 or max(pace, mine) <= BACKUP_GAIN * min(pace, mine):
            return None
        return mine / (mine + pace)

    def _tail_poll(self) -> float | None:
        """How often an idle worker looks again while a worker worth watching is busy (a slower
        one, or one whose run had positions to steal): a quarter of the shortest pace it knows
        (its own, or a watched worker's), between an eighth of a poll and a poll. None while
        nobody is: then the wait grows as before, since every look costs listings (with 1,000
        workers and a tail of slow shards, looking every poll tripled the requests per shard)."""
        with self._lock:
            mine = self._shard_seconds()
        paces = [pace for _, pace in self._watched()]
        if not paces:
            return None
        return max(self._poll / 8, min(self._poll, *(p / 4 for p in paces + ([mine] if mine else []))))

    def _reread_busy(self) -> bool:
        """Read the heartbeats of up to VICTIMS_READ busy workers again, those worth watching
        (``_watched``) first, once their last read is older than a quarter of their pace (others:
        than this one's pace; at least an eighth of a poll), and steal from their runs: a steal or backup is
        judged on what they hold now, not on a roster listed a poll ago. Only a worker with
        nothing to claim and nothing in hand gets here: at the tail, for about one shard's time,
        so a few reads per worker per job."""
        with self._lock:
            if self._held:
                return False
            mine = self._shard_seconds()
        if self._roster is None:
            return False
        now = self.ledger.clock()
        watched = dict(self._watched())
        if not watched:  # nothing to gain at the tail: the roster's versions say when to read again
            return False

        def due(token: str) -> bool:
            """A watched worker every quarter of its pace; any other busy one every pace of this one."""
            read = self._seen_beats.get(token)
            interval = watched[token] / 4 if token in watched else (mine or self._poll)
            return read is None or now - read[0] >= max(self._poll / 8, interval)

        others = [t for t in self._roster.busy if t not in self._handled and t not in watched and due(t)]
        chosen = [t for t in watched if due(t)] + self._rng.sample(others, len(others))
        for token in chosen[:VICTIMS_READ]:
            heartbeat = self.ledger.read_heartbeat(token)
            self.stats.beats_read += 1
            if heartbeat is None:
                continue
            self._seen_beats[token] = (self.ledger.clock(), heartbeat)
            start, end = heartbeat.get("run") or (0, 0)
            if heartbeat.get("state") not in EXITED_STATES and self._split(token, start, end, heartbeat):
                return True
        return False

    def _back_up(self) -> Lease | None:
        """A speculative try of the shard that a slower worker will take longest to finish, from
        the last heartbeats its steals read of the workers still busy (no read of its own). Only
        by a worker that holds nothing else, knows its own pace, and expects to finish in under
        1/BACKUP_GAIN of the time the holder still needs: one backup per try, one per worker at
        a time."""
        with self._lock:
            mine = self._shard_seconds()
            if not self._backups or mine is None or self._held:
                return None
        busy = set(self._current_roster().busy) - self._handled
        now = self.ledger.clock()
        best: tuple[float, str, int] | None = None
        for token, (read_at, beat) in self._seen_beats.items():
            if token not in busy:
                continue
            # Time since its last shard: what it said then, plus what this worker's clock saw since.
            pace, since = beat.get("shard_s"), float(beat.get("since_s") or 0.0) + now - read_at
            if pace is None:
                continue
            for place, (shard, epoch, backup) in enumerate(beat.get("queue", ())):
                # The holder finishes its tries one after another, one every `pace` seconds.
                left = (place + 1) * float(pace) - since
                if not backup and shard not in self._backed_up and left > BACKUP_GAIN * mine:
                    if best is None or left > best[0]:
                        best = (left, str(shard), int(epoch))
        if best is None:
            return None
        _, shard_id, epoch = best
        self._backed_up.add(shard_id)
        lease = self.ledger.back_up(shard_id, epoch, self.identity)
        log.debug(
            "%s: backup of %s try %d (holder needs %.3fs, here %.3fs): %s",
            self._token,
            shard_id,
            epoch,
            best[0],
            mine,
            lease,
        )
        if lease is None:
            return None
        self.stats.backups += 1
        return self._won(lease, backup=True)

    def _from_retries(self, queue: deque[str]) -> Lease | None:
        """Shards to try again under the full takeover rules: taken-over leases and what a sweep
        found, or this worker's own failed tries."""
        while True:
            with self._lock:
                if not queue:
                    return None
                shard_id = queue.popleft()
                if shard_id in self._held:  # queued twice (a takeover and a sweep): already in hand
                    continue
            outcome = self.ledger.try_claim(shard_id, self.identity)
            if isinstance(outcome, Lease):
                return self._won(outcome)
            if outcome is ShardState.FAILED:
                self.failed_for_good.append(shard_id)

    def _from_run(self) -> Lease | None:
        while True:
            with self._lock:
                if self._cursor >= self._end and self._runs:  # the next run a sweep left
                    (self._cursor, self._end), self._stolen = self._runs.popleft(), True
                if self._cursor >= self._end:
                    return None
                position = self._cursor
                index = position % self._n
                if self._committed is not None and self._committed[index]:
                    self._cursor += 1
                    self.stats.skipped += 1
                    continue
            shard_id = self.ledger.plan.shard_id(index)
            with self._lock:
                mine = shard_id in self._held  # a stolen run reached this worker's own region
            # Only its own slot's run can hold an earlier incarnation's tries (a retried task).
            outcome = (
                ShardState.LEASED
                if mine
                else self.ledger.try_claim(shard_id, self.identity, investigate=False, own_slot=not self._stolen)
            )
            # Its predecessor in the slot finishes that try before it exits (NOTE [drain]): walk on.
            left = outcome is ShardState.LEASED and self.ledger.left_to_predecessor(shard_id, self.identity)
            with self._lock:
                # A committed shard ends a run too, unless this worker has claimed nothing yet
                # (a rerun): then a listing of commits lets it skip every committed shard.
                resuming = outcome is ShardState.COMMITTED and not self._stolen and self.stats.claims == 0
                # The victim of a split may claim the split point before the thief: it walks on
                # into the thief's part, unaware, until it collides there. The thief skips that
                # one position instead of leaving the rest to the victim (a slow one, at the tail).
                raced_victim, self._split_at = self._split_at == position, None
                probed_taken, self._probe_at = self._probe_at == position, None
                if left:
                    self._cursor = position + 1
                    self.stats.skipped += 1
                    continue
                if outcome is ShardState.LEASED or (outcome is ShardState.COMMITTED and not resuming):
                    self.stats.collisions += 1
                    if probed_taken:  # that slot's worker started after all: see _probe_slot
                        self._probes_left = 0
                    if raced_victim:
                        self._cursor = position + 1
                        continue
                    self._end = position  # another worker's from here on
                    return None
                self._cursor = position + 1
            if isinstance(outcome, Lease):
                return self._won(outcome)
            if outcome is ShardState.FAILED:
                self.failed_for_good.append(shard_id)
            else:
                self.stats.skipped += 1
                if self._committed is None:
                    self._learn_committed()  # only reached while resuming

    def _learn_committed(self) -> None:
        """Its own run holds committed shards (a rerun, or a worker that found this slot before
        it started): one listing of commits lets it skip them all instead of paying two
        requests for each."""
        committed = np.zeros(self._n, dtype=bool)
        for shard_id in self.ledger.committed_shards():
            committed[self.ledger.plan.index_of(shard_id)] = True
        with self._lock:
            self._committed = committed

    def _steal(self) -> bool:
        """Take the back half of a random busy worker's run, or all of an exited worker's."""
        roster = self._current_roster()
        # A heartbeat read once is read again only when the listing shows it changed.
        fresh = [t for t in roster.busy if t not in self._handled and self._read_victims.get(t) != roster.versions[t]]
        for token in self._rng.sample(fresh, min(VICTIMS_READ, len(fresh))):
            self._read_victims[token] = roster.versions[token]
            heartbeat = self.ledger.read_heartbeat(token)
            self.stats.beats_read += 1
            if heartbeat is None:
                continue
            self._seen_beats[token] = (self.ledger.clock(), heartbeat)
            if heartbeat.get("state") in EXITED_STATES:
                if self._take_over(token, heartbeat):
                    return True
                continue
            if self._outpaced_by(heartbeat):
                log.debug("%s: not reading ahead from %s, which is faster", self._token, token)
                continue
            start, end = heartbeat.get("run") or (0, 0)
            if self._split(token, start, end, heartbeat):
                return True
        return False

    def _split(self, token: str, start: int, end: int, heartbeat: dict[str, Any]) -> bool:
        """Take the back half of ``token``'s run ``[start, end)``, following the steal records
        of thieves that split it first (each moves the run's end to their split point).

        Between workers whose paces differ BACKUP_GAIN times, the share is by speed, so that
        both finish together, and rounded for the faster one: a fast thief takes all of a slow
        worker's short run, which that one would finish last (its start is the position the
        victim has yet to claim; whichever claims it first has it, the other collides), and a
        slow thief leaves a short run alone."""
        keep = self._victim_share(heartbeat)
        for _ in range(MAX_SPLIT_HOPS):
            while (token, end) in self._splits:  # steal records never change: follow known ones free
                end = self._splits[(token, end)]
            if keep is not None:
                kept = (end - start) * keep
                split = start + (math.floor(kept) if keep < 0.5 else math.ceil(kept))
                if split >= end:
                    return False
            elif end - start < MIN_STEAL:
                return False
            else:
                split = start + max(1, (end - start + 1) // 2)
            taken = self.ledger.split_run(token, end, split, self.identity)
            log.debug("%s: split %s's run [%d, %d) at %d: %s", self._token, token, start, end, split, taken)
            if taken is None:
                with self._lock:
                    self._cursor, self._end, self._stolen, self._split_at = split, end, True, split
                self.stats.steals += 1
                return True
            self._splits[(token, end)] = taken
        return False

    def _probe_slot(self) -> bool:
        """Adopt the first run of a random other slot: a worker that has not started yet (or
        never will) leaves its run to whoever finds it free; one that starts late collides at
        once and steals instead. A few probes per worker, so the cost stays O(1) per worker,
        and none after one that collides: the slot, picked at random, had a worker after all,
        so the roster that counted fewer workers than slots is out of date, and the workers
        still missing are few. Each such probe costs a create and a commit read: 16 workers
        that started seconds apart on 2 cores (test_soak, 400 shards) collided 150-180 times
        and read 6.1-6.4 ledger requests per shard probing up to 8 times each; 53-65 times
        and 5.0-5.7 requests once a collided probe ended their probing."""
        if self._slot is None or self._probes_left <= 0:
            return False
        index, count = self._slot
        if len({token.rsplit("--", 1)[0] for token in self._current_roster().versions}) >= count:
            return False  # every slot has a worker: their runs are stolen, not probed
        self._probes_left -= 1
        other = self._rng.randrange(count)
        start, end = first_run(self._n, "", (other, count))
        if other == index or end <= start:
            return False
        with self._lock:
            self._cursor, self._end, self._stolen, self._probe_at = start, end, True, start
        return True

    def _take_over(self, token: str, heartbeat: dict[str, Any]) -> bool:
        """Queue a gone worker's leases for the full takeover rules and adopt its run; True if
        that gave this worker anything to do. Call only while this worker's own run is empty."""
        self._handled.add(token)
        start, end = heartbeat.get("run") or (0, 0)
        # Its backups too: a holder may have handed the shard over to one.
        leases = list(dict.fromkeys([*heartbeat.get("leases", ()), *(q[0] for q in heartbeat.get("queue", ()))]))
        if not leases and end <= start:
            return False
        with self._lock:
            self._retry.extend(leases)
            self._cursor, self._end = start, end
            self._stolen = False  # nobody works a gone worker's run: walk past what it committed
        self.stats.takeovers += 1
        return True

    # -- watching -------------------------------------------------------------------------------

    def _current_roster(self) -> _Roster:
        """Heartbeat versions and idle markers: two listings, re-read at most once a poll interval
        (an idle poll in between costs only the read of done.json)."""
        now = self.ledger.clock()
        if self._roster is None or now - self._roster.read_at >= self._poll:
            versions, idle = self.ledger.worker_versions(), self.ledger.idle_tokens()
            self.stats.rosters += 1
            busy = [t for t in versions if t != self._token and t not in idle]
            self._roster = _Roster(now, versions, idle, busy)
        return self._roster

    def _busy(self) -> None:
        if self._idle:
            self.ledger.clear_idle(self.identity)
            with self._lock:
                self._idle = False

    def _watch(self) -> bool:
        """One look at the job while there is nothing to claim; True once it is finished."""
        with self._lock:
            if self._held:  # its own shards in flight settle first: done.json cannot come before
                return False
        if not self._idle:
            self.ledger.mark_idle(self.identity)
            with self._lock:
                self._idle = True
        done = self.ledger.read_done()
        self.stats.idle_looks += 1
        if done is not None:
            self.stopped_by = done.get("stopped")
            self.finished = True
            return True
        roster = self._current_roster()
        if roster.read_at == self._scanned_at:
            return False  # nothing new to judge until the next listing
        self._scanned_at = roster.read_at
        others = [t for t in roster.versions if t != self._token and t not in self._handled]
        for token in others:
            # An earlier incarnation of this worker id is gone now (launchers never run two side
            # by side), not after a TTL: a rerun of a killed worker ends as soon as its work does.
            gone = self.identity.earlier_incarnation(token) or self.ledger.unchanged_for_ttl(
                token, roster.versions[token]
            )
            if gone and not self._has_work():
                heartbeat = self.ledger.read_heartbeat(token)
                self.stats.beats_read += 1
                if heartbeat is not None and self._take_over(token, heartbeat):
                    self._scanned_at = None  # once that work is done, judge this roster again
                    return False
        if any(t not in self._handled for t in roster.busy):
            return False
        sweepers = [t for t in roster.idle if t in roster.versions and t not in self._handled]
        if sweepers and min(sweepers) != self._token:
            return False
        return self._sweep()

    def _sweep(self) -> bool:
        """Settle the job from listings: write done.json, or take up what nobody holds.

        What is left the first time is walked as runs with bare claims, so that a worker that
        started late and is working its own run there ends the walk with one collision. What is
        still left at the next sweep is nobody's: it goes through the full takeover rules.
        """
        now = self.ledger.clock()
        if self._last_sweep is not None and now - self._last_sweep < self.ledger.ttl_s / 2:
            return False
        self._last_sweep = now
        self.stats.sweeps += 1
        sweep = self.ledger.sweep()
        settled = sweep.committed | sweep.failed
        shard_id = self.ledger.plan.shard_id
        left = [i for i in range(self._n) if shard_id(i) not in settled]
        if not left:
            self.ledger.write_done(sweep)
            self.finished = True
            return True
        with self._lock:
            queued = set(self._retry) | set(self._later) | set(self._held)
            if set(left) != self._left_before:
                self._left_before = set(left)
                self._runs.extend(_segments(left))
            else:
                self._retry.extend(shard_id(i) for i in left if shard_id(i) not in queued)
        return False


def _segments(positions: list[int]) -> list[tuple[int, int]]:
    """Sorted positions as maximal runs ``[start, end)``."""
    runs: list[tuple[int, int]] = []
    for position in positions:
        if runs and runs[-1][1] == position:
            runs[-1] = (runs[-1][0], position + 1)
        else:
            runs.append((position, position + 1))
    return runs
