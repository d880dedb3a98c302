"""Runs one schedule: a planned job, its worker slots under the schedule's faults, then the checker.

Each worker slot is one ``antbatch worker`` process at a time, in its own process group (a pod).
A slot whose worker exits with an error or is killed gets a replacement with the same worker id
after a retry delay, as an Airflow task retry would; a slot is done when its worker exits 0.
Faults are timed from the job's first scored batch (the slow model drops a marker per batch).

After the run, before the checker finalizes (which removes the files of tries that did not
commit), the harness looks at what each SIGSTOPped worker did once it woke: every try of it that
another try overtook wrote its own file, never the committed one; and the try killed between its
output and its commit left its own durable file, which no commit names.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import pathlib
import signal
import subprocess
import sys
import threading
import time
from collections import Counter
from typing import Any

import psutil  # type: ignore[import-untyped]  # an Airflow-extra dependency; no stubs installed

from airflow_antbatch import layout
from airflow_antbatch.ledger import Ledger
from airflow_antbatch.planning import plan_job
from airflow_antbatch.spec import JobSpec
from airflow_antbatch.store import AtomicStore
from airflow_antbatch.worker.local import worker_command
from airflow_antbatch.worker.loop import MAX_LEASES
from tests.chaos.check import Verdict, check_job, output_files
from tests.chaos.schedule import (
    DIE_BEFORE_COMMIT,
    LEASE_LOSING,
    PREPROCESS_KILL,
    SIGKILL,
    SIGSTOP,
    SIGTERM,
    STORE_OUTAGE,
    Fault,
    Schedule,
)
from tests.chaos.seaweed import RestartableSeaweedFS
from tests.conftest import REPO_ROOT, TABULAR, write_transactions
from tests.s3_servers import StoreLocation

MODEL = "tests.slow_model:build_slow_model"  # the tabular example model, slowed per batch
INPUT_FILES = 4
RETRY_DELAY_S = 1.0  # what an Airflow retry_delay would be, shortened
MAX_STARTS = 40  # worker processes per slot before the harness gives up on it
TIMEOUT_S = 300.0
TICK_S = 0.05
DONE_CODES = frozenset({0, 3})  # finished; finished with shards failed for good (the checker then sees lost rows)


@dataclasses.dataclass
class Injected:
    """A fault as it happened: when (after the first scored batch), to which slot and process."""

    kind: str
    at_s: float
    slot: int
    pid: int
    detail: str = ""
    shard: str | None = None  # DIE_BEFORE_COMMIT: the try that died
    epoch: int | None = None


@dataclasses.dataclass(frozen=True)
class ZombieTry:
    """One try of a SIGSTOPped worker that did not commit (its lease was taken over, or it gave
    the try back), and what became of the shard."""

    slot: int
    token: str
    shard: str
    epoch: int
    file: str  # the try's own output file
    written: bool  # the file existed at the end of the run (before finalize removed it)
    committed_file: str | None  # the file of the try that committed the shard
    released: bool


@dataclasses.dataclass
class RunResult:
    schedule: Schedule
    verdict: Verdict
    injected: list[Injected]
    missed: list[str]  # faults the run ended before (or without a target for)
    worker_starts: int
    exit_codes: list[int]
    seconds: float
    zombie_tries: list[ZombieTry] = dataclasses.field(default_factory=list)

    @property
    def wasted_bound_tries(self) -> int:
        """MAX_LEASES per worker hit, MAX_LEASES per worker slot per store outage, and one per
        speculative backup: a worker slowed by a fault (a lost preprocess child) may be backed
        up at the tail, and whichever try loses that race is wasted by design."""
        hits = sum(1 for i in self.injected if i.kind in LEASE_LOSING)
        outages = sum(1 for i in self.injected if i.kind == STORE_OUTAGE)
        return MAX_LEASES * (hits + outages * self.schedule.workers) + self.verdict.backups

    @property
    def within_bound(self) -> bool:
        return self.verdict.wasted_tries <= self.wasted_bound_tries

    @property
    def ok(self) -> bool:
        return self.verdict.exactly_once and self.within_bound

    def to_dict(self) -> dict[str, Any]:
        return {
            "schedule": dataclasses.asdict(self.schedule),
            "verdict": dataclasses.asdict(self.verdict),
            "injected": [dataclasses.asdict(i) for i in self.injected],
            "missed": self.missed,
            "wasted_bound_tries": self.wasted_bound_tries,
            "worker_starts": self.worker_starts,
            "exit_codes": self.exit_codes,
            "seconds": round(self.seconds, 1),
            "zombie_tries": [dataclasses.asdict(z) for z in self.zombie_tries],
        }


def run_schedule(
    schedule: Schedule,
    location: StoreLocation,
    workdir: pathlib.Path,
    *,
    env: dict[str, str] | None = None,
    seaweedfs: RestartableSeaweedFS | None = None,
) -> RunResult:
    """Plan the schedule's job under ``location``, run it under its faults, and check it.

    ``env`` is the environment for the workers (credentials for S3 included); ``seaweedfs``
    is the server to stop and restart for a store outage.
    """
    started = time.monotonic()
    plan_uri, expected = prepare_job(schedule, location, workdir)
    run = _Run(schedule, plan_uri, location, workdir, worker_env(env), seaweedfs)
    run.supervise()
    ledger = Ledger.open(plan_uri, location.storage_options)
    present = output_files(plan_uri, location.storage_options)  # before finalize prunes the losers
    zombies = [z for i in run.injected if i.kind == SIGSTOP for z in _zombie_tries(ledger, i, present)]
    problems = [*_zombie_problems(zombies), *_dead_try_problems(ledger, run.injected, present)]
    verdict = check_job(plan_uri, location.storage_options, expected)
    verdict.problems += problems
    _describe_zombies(run.injected, zombies, verdict)
    if run.timed_out:
        verdict.problems.append(f"workers still running after {TIMEOUT_S:.0f} s")
    return RunResult(
        schedule=schedule,
        verdict=verdict,
        injected=run.injected,
        missed=run.missed,
        worker_starts=sum(s.starts for s in run.slots),
        exit_codes=[code for s in run.slots for code in s.exit_codes],
        seconds=time.monotonic() - started,
        zombie_tries=zombies,
    )


def _zombie_tries(ledger: Ledger, stop: Injected, present: set[str]) -> list[ZombieTry]:
    """The tries of the process ``stop`` froze that did not commit, from its heartbeat (which
    names its pid) and the claims and commits of the ledger."""
    tokens = [t for t in ledger.worker_versions() if t.startswith(f"worker-{stop.slot}--")]
    beats = {t: ledger.read_heartbeat(t) for t in tokens}
    token = next((t for t, beat in beats.items() if beat is not None and beat.get("pid") == stop.pid), None)
    if token is None:
        return []
    commits = {r.shard_id: r for r in ledger.commit_records()}
    attempt = ledger.plan.attempt
    tries = []
    for name in ledger.store.list(layout.CLAIMS_DIR):
        shard, epoch = layout.shard_of_listed(name)
        if epoch is None:
            continue
        claim = json.loads(ledger.store.read(layout.claim_key(shard, epoch)) or b"{}")
        commit = commits.get(shard)
        if claim.get("token") != token or (commit is not None and commit.epoch == epoch):
            continue
        file = layout.output_name(attempt, shard, epoch)
        released = ledger.store.read(layout.release_key(shard, epoch)) is not None
        committed_file = commit.file if commit is not None else None
        tries.append(ZombieTry(stop.slot, token, shard, epoch, file, file in present, committed_file, released))
    return tries


def _zombie_problems(zombies: list[ZombieTry]) -> list[str]:
    """A zombie's try that names the committed file would have written over it."""
    return [
        f"zombie {z.token}'s try {z.epoch} of {z.shard} shares the committed file {z.file}"
        for z in zombies
        if z.file == z.committed_file
    ]


def _describe_zombies(injected: list[Injected], zombies: list[ZombieTry], verdict: Verdict) -> None:
    """What each woken zombie did, in its fault's detail: the tries overtaken while it was
    stopped, the files they wrote, and whether the committed files kept their bytes."""
    for stop in (i for i in injected if i.kind == SIGSTOP):
        mine = [z for z in zombies if z.slot == stop.slot]
        overtaken = [z for z in mine if z.committed_file is not None and not z.released]
        written = [z.file for z in overtaken if z.written]
        touched = [z for z in overtaken if any(str(z.committed_file) in p for p in verdict.problems)]
        stop.detail += (
            f"; woken zombie: {len(overtaken)} tries overtaken, {len(written)} wrote their own file"
            + (f" ({', '.join(written[:2])})" if written else "")
            + f", {sum(z.released for z in mine)} given back"
            + (f"; committed files changed: {len(touched)}" if touched else "; committed files untouched")
        )


def _dead_try_problems(ledger: Ledger, injected: list[Injected], present: set[str]) -> list[str]:
    """The try killed between its durable output and its commit: its own file is still there
    (until finalize removes it), and no commit names it."""
    problems = []
    commits = {r.shard_id: r for r in ledger.commit_records()}
    for died in (i for i in injected if i.kind == DIE_BEFORE_COMMIT and i.shard is not None):
        assert died.shard is not None and died.epoch is not None
        file = layout.output_name(ledger.plan.attempt, died.shard, died.epoch)
        commit = commits.get(died.shard)
        if commit is not None and commit.epoch == died.epoch:
            problems.append(f"the try killed before its commit ({died.shard} try {died.epoch}) is committed")
        elif file not in present:
            problems.append(f"the try killed before its commit ({died.shard} try {died.epoch}) left no file {file}")
    return problems


def worker_env(base: dict[str, str] | None = None) -> dict[str, str]:
    """The workers' environment: ``tests.*`` importable, one thread each."""
    env = dict(base if base is not None else os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO_ROOT), env.get("PYTHONPATH", "")) if p)
    env["OMP_NUM_THREADS"] = "1"
    return env


def prepare_job(schedule: Schedule, location: StoreLocation, workdir: pathlib.Path) -> tuple[str, Counter[int]]:
    """Write the input under the location, plan the job; returns the plan URI and the input ids."""
    rows_per_file = schedule.shards // INPUT_FILES * schedule.rows_per_shard
    local_input = workdir / "in"
    table = write_transactions(
        local_input, files=INPUT_FILES, rows_per_file=rows_per_file, row_group_size=schedule.rows_per_shard
    )
    input_uri = str(local_input)
    if location.backend != "local":
        store = AtomicStore(location.url, location.storage_options)
        for path in sorted(local_input.iterdir()):
            store.put(f"in/{path.name}", path.read_bytes())
        input_uri = store.uri("in")
    spec = JobSpec(
        input_uri=input_uri,
        output_uri=f"{location.url}/out",
        model=MODEL,
        preprocess=f"{TABULAR}:preprocess",
        postprocess=f"{TABULAR}:postprocess",
        id_column="txn_id",
        batch_size=max(1, schedule.rows_per_shard // 2),
        max_shard_rows=schedule.rows_per_shard,
        lease_ttl_s=schedule.lease_ttl_s,
        storage_options=location.storage_options,
    )
    planned = plan_job(spec)
    assert len(planned.plan.shards) == schedule.shards, (len(planned.plan.shards), schedule)
    return planned.plan_uri, Counter(table.column("txn_id").to_pylist())


@dataclasses.dataclass
class _Slot:
    index: int
    proc: subprocess.Popen[bytes] | None = None
    starts: int = 0
    done: bool = False
    stopped: bool = False
    armed: bool = False  # runs through the die-before-commit wrapper: no other fault aims at it
    respawn_at: float = 0.0
    exit_codes: list[int] = dataclasses.field(default_factory=list)

    @property
    def worker_id(self) -> str:
        return f"worker-{self.index}"


class _Run:
    """The supervisor of one run: starts and restarts workers, injects the faults when due."""

    def __init__(
        self,
        schedule: Schedule,
        plan_uri: str,
        location: StoreLocation,
        workdir: pathlib.Path,
        env: dict[str, str],
        seaweedfs: RestartableSeaweedFS | None,
    ) -> None:
        self.schedule = schedule
        self.plan_uri = plan_uri
        self.location = location
        self.workdir = workdir
        self.markers = workdir / "markers"
        self.markers.mkdir()
        self.env = {**env, "ANTBATCH_TEST_BATCH_DELAY": str(schedule.batch_delay_s)}
        self.env["ANTBATCH_TEST_MARKER_DIR"] = str(self.markers)
        self.seaweedfs = seaweedfs
        self.slots = [_Slot(i) for i in range(schedule.workers)]
        self.pending = [f for f in schedule.faults if f.kind != DIE_BEFORE_COMMIT]
        self.dying = next((f for f in schedule.faults if f.kind == DIE_BEFORE_COMMIT), None)
        self.die_marker = workdir / "die-before-commit.json"
        self.continues: list[tuple[float, _Slot, int]] = []  # SIGCONT due: (at_s, slot, pid)
        self.injected: list[Injected] = []
        self.missed: list[str] = []
        self.outage: threading.Thread | None = None
        self.outage_error: BaseException | None = None
        self.timed_out = False
        self.t0: float | None = None

    # -- the loop ------------------------------------------------------------------------------

    def supervise(self) -> None:
        started = time.monotonic()
        try:
            for slot in self.slots:
                self._spawn(slot)
            while not self._finished():
                now = time.monotonic()
                if now - started > TIMEOUT_S:
                    self.timed_out = True
                    break
                self._reap(now)
                for slot in self.slots:
                    if not slot.done and slot.proc is None and now >= slot.respawn_at:
                        self._spawn(slot)
                if self.t0 is None and any(self.markers.iterdir()):
                    self.t0 = now
                if self.t0 is not None:
                    self._inject(now - self.t0)
                time.sleep(TICK_S)
        finally:
            self._end()
        self.missed += [f"{f.kind}@{f.at_s}s" for f in self.pending]
        if self.dying is not None and not any(i.kind == DIE_BEFORE_COMMIT for i in self.injected):
            self.missed.append(f"{DIE_BEFORE_COMMIT} on shard #{self.dying.nth}")
        if self.outage_error is not None:
            raise RuntimeError(f"the store did not come back: {self.outage_error}")

    def _finished(self) -> bool:
        return all(s.done for s in self.slots) and not (self.outage is not None and self.outage.is_alive())

    def _spawn(self, slot: _Slot) -> None:
        slot.starts += 1
        cmd = worker_command(
            self.plan_uri,
            slot.worker_id,
            storage_options=self.location.storage_options,
            cpu_budget=1,
            preprocess_workers=1,
            torch_threads=1,
            slot=f"{slot.index}/{len(self.slots)}" if self.schedule.slotted else None,
            drain_s=self.schedule.drain_s or None,
        )
        if self.dying is not None and self.dying.slot == slot.index and slot.starts == 1:
            wrapper = [sys.executable, "-m", "tests.chaos.die_before_commit", str(self.dying.nth), str(self.die_marker)]
            cmd = [*wrapper, "--", *cmd[3:]]
            slot.armed = True
        with (self.workdir / f"{slot.worker_id}.{slot.starts}.log").open("wb") as log:
            # A session of its own: a pod's processes, signalled together.
            slot.proc = subprocess.Popen(
                cmd, stdout=log, stderr=subprocess.STDOUT, env=self.env, start_new_session=True
            )

    def _reap(self, now: float) -> None:
        for slot in self.slots:
            code = None if slot.proc is None else slot.proc.poll()
            if code is None:
                continue
            slot.exit_codes.append(code)
            slot.proc, slot.stopped, slot.armed = None, False, False
            slot.done = code in DONE_CODES or slot.starts >= MAX_STARTS
            slot.respawn_at = now + RETRY_DELAY_S

    def _end(self) -> None:
        """Leave nothing running: wake and kill what is left (only after a timeout or an error)."""
        if self.outage is not None:
            self.outage.join()
        for slot in self.slots:
            if slot.proc is not None and slot.proc.poll() is None:
                for sig in (signal.SIGCONT, signal.SIGKILL):
                    with contextlib.suppress(ProcessLookupError):
                        os.killpg(slot.proc.pid, sig)
                slot.proc.wait()

    # -- faults --------------------------------------------------------------------------------

    def _inject(self, elapsed: float) -> None:
        for at, slot, pid in list(self.continues):
            if elapsed >= at:
                self.continues.remove((at, slot, pid))
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(pid, signal.SIGCONT)
                slot.stopped = False
        if self.dying is not None and self.die_marker.exists() and not self._has(DIE_BEFORE_COMMIT):
            record = json.loads(self.die_marker.read_text())
            detail = (
                f"shard {record['shard']} try {record['epoch']}, output durable: {record['output_durable']} "
                f"({record['file']})"
            )
            self.injected.append(
                Injected(
                    DIE_BEFORE_COMMIT, elapsed, self.dying.slot, record["pid"], detail, record["shard"], record["epoch"]
                )
            )
        for fault in list(self.pending):
            if elapsed >= fault.at_s and self._fire(fault, elapsed):
                self.pending.remove(fault)

    def _has(self, kind: str) -> bool:
        return any(i.kind == kind for i in self.injected)

    def _fire(self, fault: Fault, elapsed: float) -> bool:
        """Inject ``fault`` now; False if it has no target yet (tried again on the next tick)."""
        if fault.kind == STORE_OUTAGE:
            return self._start_outage(fault, elapsed)
        slot = self._target(fault.slot)
        if slot is None or slot.proc is None:
            return False
        pid = slot.proc.pid
        detail = ""
        if fault.kind == SIGKILL:
            os.killpg(pid, signal.SIGKILL)
        elif fault.kind == SIGTERM:
            os.kill(pid, signal.SIGTERM)
        elif fault.kind == SIGSTOP:
            os.killpg(pid, signal.SIGSTOP)
            slot.stopped = True
            self.continues.append((elapsed + fault.duration_s, slot, pid))
            detail = f"stopped {fault.duration_s:.1f}s (lease TTL {self.schedule.lease_ttl_s:.0f}s)"
        elif fault.kind == PREPROCESS_KILL:
            children = _preprocess_children(pid)
            if not children:
                return False
            os.kill(children[0], signal.SIGKILL)
            detail = f"child {children[0]}"
        self.injected.append(Injected(fault.kind, elapsed, slot.index, pid, detail))
        return True

    def _target(self, preferred: int) -> _Slot | None:
        """The preferred slot if its worker is scoring, else the next slot whose worker is.

        A stopped worker is left alone until it wakes, and the one armed to die before a commit
        until it has: faults do not pile onto one process."""
        n = len(self.slots)
        for slot in (self.slots[(preferred + k) % n] for k in range(n)):
            if slot.stopped or slot.armed or slot.proc is None:
                continue
            if (self.markers / str(slot.proc.pid)).exists():
                return slot
        return None

    def _start_outage(self, fault: Fault, elapsed: float) -> bool:
        if self.seaweedfs is None:
            raise ValueError(f"{STORE_OUTAGE} needs a restartable SeaweedFS, and {self.schedule.describe()} has none")
        injected = Injected(STORE_OUTAGE, elapsed, -1, 0)
        self.injected.append(injected)
        self.outage = threading.Thread(target=self._outage, args=(fault, injected), name="chaos-outage")
        self.outage.start()
        return True

    def _outage(self, fault: Fault, injected: Injected) -> None:
        assert self.seaweedfs is not None
        try:
            down = time.monotonic()
            self.seaweedfs.stop()
            time.sleep(fault.duration_s)
            self.seaweedfs.restart()
            injected.detail = f"store down {time.monotonic() - down:.1f}s (lease TTL {self.schedule.lease_ttl_s:.0f}s)"
        except BaseException as exc:
            self.outage_error = exc


def _preprocess_children(pid: int) -> list[int]:
    """The worker's preprocess processes: forked by its forkserver, so its grandchildren."""
    try:
        descendants = psutil.Process(pid).children(recursive=True)
    except psutil.NoSuchProcess:
        return []
    found = []
    for proc in descendants:
        with contextlib.suppress(psutil.NoSuchProcess):
            if proc.ppid() != pid:
                found.append(proc.pid)
    return sorted(found)
