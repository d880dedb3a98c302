"""The reconciling core: pods and the ledger's status in, one request per create and delete out."""

from __future__ import annotations

import dataclasses
import json
import statistics
import time

import pytest

from airflow_antbatch.ledger import JobStatus, WorkerStatus
from airflow_antbatch.pool import PodView, PoolController, PoolSettings, worker_id

POOL = PoolSettings(min_workers=1, max_workers=8)


def pod(slot: int, phase: str = "Running", **kw: object) -> PodView:
    fields: dict[str, object] = {"unschedulable": False, "age_s": 60.0, "reason": None, "exit_code": None}
    fields.update(kw)
    name = str(fields.pop("name", f"pool-{slot}"))
    return PodView(name=name, slot=slot, phase=phase, **fields)  # type: ignore[arg-type]


def beat(
    slot: int, leases: tuple[str, ...] = (), *, token: str = "", committed: int = 1, idle: bool = False
) -> WorkerStatus:
    return WorkerStatus(
        token=token or f"{worker_id(slot)}--a",
        worker_id=worker_id(slot),
        state="running",
        shards_committed=committed,
        rows_committed=committed * 100,
        rows_per_s=10.0,
        last_beat_age_s=1.0,
        current_shard=leases[0] if leases else None,
        leases=leases,
        idle=idle,
    )


def status(pending: int, workers: tuple[WorkerStatus, ...] = (), *, committed: int = 0) -> JobStatus:
    leased = sum(len(w.leases) for w in workers if w.state == "running")
    return JobStatus(
        planned=pending + leased + committed,
        committed=committed,
        leased=leased,
        failed=0,
        rows_committed=committed * 100,
        rows_planned=(pending + leased + committed) * 100,
        rows_per_s=0.0,
        eta_s=None,
        workers=workers,
        failures=(),
    )


def busy(*slots: int) -> tuple[WorkerStatus, ...]:
    return tuple(beat(s, (f"shard-{s}",)) for s in slots)


def test_ramps_up_from_nothing_into_the_lowest_free_slots() -> None:
    controller = PoolController(POOL)
    first = controller.tick([], status(100), 0.0, 0.0)
    assert (first.create, first.delete) == ((0, 1), ())
    second = controller.tick([pod(0), pod(1)], status(98, busy(0, 1)), 10.0, 10.0)
    assert second.create == (2, 3)
    assert second.snapshot is not None and second.snapshot.running == 2
    assert [d.wanted for d in controller.decisions] == [2, 4]


@pytest.mark.parametrize(
    "lost",
    [
        pod(2, "Failed", reason="OOMKilled", exit_code=137),
        pod(2, "Failed", reason="Evicted"),
        pod(2, "Running", reason="DisruptionTarget", deleting=True),  # preempted, still terminating
    ],
)
def test_a_lost_pod_is_replaced_on_its_slot_in_the_same_tick(lost: PodView) -> None:
    controller = PoolController(POOL)
    pods = [pod(0), pod(1), lost, pod(3)]
    plan = controller.tick(pods, status(50, busy(0, 1, 3)), 0.0, 0.0)
    assert 2 in plan.create
    assert plan.delete == (() if lost.deleting else (lost.name,))  # one being deleted is not deleted twice
    # while it is still listed, it is not replaced again
    again = controller.tick([*pods, pod(2, name="pool-2-b")], status(50, busy(0, 1, 2, 3)), 10.0, 10.0)
    assert 2 not in again.create


def test_a_replacement_comes_for_the_leases_even_with_nothing_pending() -> None:
    controller = PoolController(POOL)
    dead = beat(1, ("shard-a", "shard-b"))
    plan = controller.tick([pod(0), pod(1, "Failed", reason="Error", exit_code=1)], status(0, (*busy(0), dead)), 0, 0)
    assert plan.create == (1,)
    # a worker that held nothing is not replaced when nothing is pending
    idle = PoolController(POOL).tick([pod(0), pod(1, "Failed", reason="Error", exit_code=1)], status(0, busy(0)), 0, 0)
    assert idle.create == ()


def test_succeeded_pods_go_and_the_tail_lets_idle_workers_go_highest_slot_first() -> None:
    controller = PoolController(POOL)
    pods = [pod(0), pod(1), pod(2), pod(3), pod(4, "Succeeded")]
    workers = (*busy(1), beat(0, idle=True), beat(2, idle=True), beat(3, idle=True))  # 0, 2 and 3 found nothing
    plan = controller.tick(pods, status(0, workers), 0.0, 0.0)
    assert plan.create == ()
    assert plan.delete == ("pool-4", "pool-3", "pool-2", "pool-0")
    assert plan.decision.wanted == 1


def test_tries_a_preempted_worker_released_are_its_heirs_not_pending() -> None:
    """At the tail, slot 2's worker is preempted holding two tries: it releases them (the status
    counts them pending) and lists them in its final heartbeat. Its replacement takes them over:
    no other pod is made for them, and the replacement is not let go while it starts."""
    controller = PoolController(POOL)
    gone = dataclasses.replace(beat(2, ("a", "b"), token="slot-2--old"), state="preempted")
    workers = (*busy(0, 1), beat(3, idle=True), gone)
    lost = pod(2, "Failed", reason="DisruptionTarget", name="pool-2-old")
    plan = controller.tick([pod(0), pod(1), lost, pod(3)], status(2, workers), 0.0, 0.0)
    assert plan.snapshot is not None and (plan.snapshot.pending_shards, plan.snapshot.orphaned_shards) == (0, 2)
    assert (plan.create, plan.delete) == ((2,), ("pool-2-old",))  # counted pending too, it made 2 pods more
    # Slot 3's marker is up, so the tail is known: were the two tries pending, no more than the
    # busy workers hold, they would count as out of reach and the starting heir would go.
    pods = [pod(0), pod(1), pod(2, name="pool-2-new"), pod(3)]
    starting = controller.tick(pods, status(2, workers), 10.0, 10.0)
    assert starting.create == () and "pool-2-new" not in starting.delete


def test_a_worker_between_tries_is_kept_until_its_idle_marker_is_up() -> None:
    """worker.loop beats after each commit, before it claims again: a heartbeat without a lease
    is no proof of idleness. Only the idle marker (or no heartbeat yet) lets a running pod go."""
    controller = PoolController(POOL)
    pods = [pod(0), pod(1), pod(2)]
    between = controller.tick(pods, status(0, (*busy(0), beat(1), beat(2))), 0.0, 0.0)
    assert (between.decision.wanted, between.delete) == (1, ())  # 1 and 2 may be claiming: kept
    marked = controller.tick(pods, status(0, (*busy(0), beat(1), beat(2, idle=True))), 10.0, 10.0)
    assert marked.delete == ("pool-2",)
    unheard = controller.tick([*pods[:2], pod(5)], status(0, (*busy(0), beat(1))), 20.0, 20.0)
    assert unheard.delete == ("pool-5",)  # no heartbeat yet: it holds nothing


def test_an_idle_marker_marks_the_tail_and_idle_pods_go() -> None:
    """Two shards pending, five workers busy, three idle: once a worker's idle marker is up (it
    found nothing to claim), the pending shards are the ends of busy workers' runs, and that is
    remembered after the starved pods are gone."""
    controller = PoolController(POOL)
    pods = [pod(s) for s in range(8)]
    first = controller.tick(pods, status(2, (*busy(0, 1, 2, 3, 4), beat(5), beat(6), beat(7))), 0.0, 0.0)
    assert (first.decision.wanted, first.delete) == (7, ())  # 5 holders + 2 pending; 5-7 not marked: kept
    later = controller.tick(pods, status(2, (*busy(0, 1, 2, 3, 4), beat(5, idle=True), beat(6), beat(7))), 10.0, 10.0)
    assert later.decision.wanted == 5
    assert "wait at the end of busy workers' runs" in later.decision.reason
    assert later.delete == ("pool-5",)  # 6 and 7 go once their markers are up
    restored = PoolController.from_dict(POOL, json.loads(json.dumps(controller.to_dict())))
    after = restored.tick(pods[:5], status(2, busy(0, 1, 2, 3, 4)), 20.0, 20.0)
    assert (after.decision.wanted, after.create) == (5, ())  # no pod made for shards it cannot reach


def test_a_pod_start_is_timed_from_creation_or_its_wait_for_capacity_to_a_new_heartbeat() -> None:
    controller = PoolController(POOL)
    old = (beat(0, ("a",), token="slot-0--old"),)
    fresh = (beat(0, ("a",), token="slot-0--new"),)
    # slot 0's pod created 5 s before the tick, not started; its worker beats by 40 s: 45 s to start
    assert controller.tick([pod(0, "Pending", age_s=5.0)], status(9, old), 0.0, 0.0).snapshot.start_s is None  # type: ignore[union-attr]
    controller.tick([pod(0, age_s=25.0)], status(9, old), 20.0, 20.0)
    assert controller.tick([pod(0, age_s=45.0)], status(9, fresh), 40.0, 40.0).snapshot.start_s == 45.0  # type: ignore[union-attr]
    # a pod that waited for capacity until 100 s and beat by 130 s took 30 s to start
    waiting = pod(1, "Pending", unschedulable=True, age_s=90.0)
    controller.tick([pod(0), waiting], status(9, fresh), 100.0, 100.0)
    plan = controller.tick([pod(0), pod(1)], status(9, (*fresh, beat(1, ("b",)))), 130.0, 130.0)
    assert plan.snapshot is not None and plan.snapshot.start_s == statistics.median([45.0, 30.0])
    saved = PoolController.from_dict(POOL, json.loads(json.dumps(controller.to_dict())))
    assert saved.to_dict()["starts"] == [45.0, 30.0]


def test_scale_down_never_deletes_a_pod_whose_worker_holds_a_try() -> None:
    controller = PoolController(PoolSettings(min_workers=0, max_workers=8, deadline_s=10_000.0))
    pods = [pod(s) for s in range(6)]
    # far ahead of the deadline: 1 pod would do, but all six are working
    plan = controller.tick(pods, status(0, busy(*range(6))), 0.0, 100.0)
    assert plan.delete == ()
    assert plan.create == ()


def test_a_full_cluster_holds_then_keeps_one_probe() -> None:
    controller = PoolController(POOL)
    stuck = [pod(s, "Pending", unschedulable=True, age_s=float(100 - s)) for s in (2, 3, 4)]
    hold = controller.tick([pod(0), pod(1), *stuck], status(50, busy(0, 1)), 0.0, 0.0)
    assert (hold.create, hold.delete) == ((), ())
    later = [pod(s, "Pending", unschedulable=True, age_s=float(200 - s)) for s in (2, 3, 4)]
    probe = controller.tick([pod(0), pod(1), *later], status(50, busy(0, 1)), 100.0, 100.0)
    assert probe.delete == ("pool-4", "pool-3")  # the youngest go; the oldest waits on as the probe
    assert "probe" in probe.decision.reason


def test_an_image_that_cannot_be_pulled_fails_within_a_minute_naming_the_pod() -> None:
    controller = PoolController(POOL)
    bad = [pod(0), pod(1, "Pending", reason="ErrImagePull")]
    assert controller.tick(bad, status(50, busy(0)), 0.0, 0.0).fail is None
    assert controller.tick(bad, status(50, busy(0)), 30.0, 30.0).fail is None
    plan = controller.tick(bad, status(50, busy(0)), 61.0, 61.0)
    assert plan.fail is not None and "pool-1" in plan.fail and "ErrImagePull" in plan.fail
    assert set(plan.delete) == {"pool-0", "pool-1"}  # every pod goes with the task
    invalid = PoolController(POOL).tick([pod(0, "Pending", reason="InvalidImageName")], status(5), 0.0, 0.0)
    assert invalid.fail is not None and "InvalidImageName" in invalid.fail


def test_a_pull_that_recovers_does_not_fail() -> None:
    controller = PoolController(POOL)
    controller.tick([pod(0, "Pending", reason="ImagePullBackOff")], status(5), 0.0, 0.0)
    controller.tick([pod(0)], status(5), 30.0, 30.0)
    assert controller.tick([pod(0, "Pending", reason="ImagePullBackOff")], status(5), 70.0, 70.0).fail is None


def _crash(controller: PoolController, n: int, reason: str = "OOMKilled", *workers: WorkerStatus) -> str | None:
    """Slot 3's ``n``-th pod, failed with ``reason``: the verdict, if any."""
    plan = controller.tick([pod(3, "Failed", name=f"pool-3-{n}", reason=reason)], status(50, workers), n, n)
    return plan.fail


def test_the_same_failure_three_times_in_a_row_on_a_slot_fails_the_task() -> None:
    controller = PoolController(POOL)
    assert _crash(controller, 1) is None
    assert _crash(controller, 2) is None
    verdict = _crash(controller, 3)
    assert verdict is not None and "slot 3" in verdict and "OOMKilled" in verdict and "pool-3-3" in verdict


def test_preemptions_and_progress_do_not_make_a_crash_loop() -> None:
    controller = PoolController(POOL)
    assert _crash(controller, 1) is None
    assert _crash(controller, 2, "DisruptionTarget") is None  # the cluster's doing: not counted
    assert _crash(controller, 3, "OOMKilled", beat(3, token="slot-3--new", committed=4)) is None  # a new one committed
    assert _crash(controller, 4) is None
    assert _crash(controller, 5, "Error") is None  # a different reason starts a new streak
    assert PoolController(POOL).tick([pod(0, reason="CrashLoopBackOff")], status(5), 0, 0).fail is not None


def test_memory_survives_a_triggerer_restart_as_plain_json() -> None:
    controller = PoolController(POOL)
    _crash(controller, 1)
    _crash(controller, 2)
    saved = json.loads(json.dumps(controller.to_dict()))
    restored = PoolController.from_dict(POOL, saved)
    assert restored.decisions == controller.decisions
    assert _crash(restored, 3) is not None


def test_a_finished_job_deletes_every_pod() -> None:
    plan = PoolController(POOL).tick([pod(0), pod(1, "Succeeded")], status(0, committed=10), 0.0, 0.0)
    assert plan.done and plan.fail is None
    assert set(plan.delete) == {"pool-0", "pool-1"} and plan.create == ()
    assert plan.decision.wanted == 0


def test_a_stopped_job_fails_the_task_and_deletes_every_pod() -> None:
    stopped = dataclasses.replace(status(5, busy(0)), stopped="shard 00001: CUDA error (same_error_limit)")
    plan = PoolController(POOL).tick([pod(0), pod(1)], stopped, 0.0, 0.0)
    assert plan.fail is not None and "CUDA error" in plan.fail and not plan.done
    assert set(plan.delete) == {"pool-0", "pool-1"}


def test_a_steady_tick_over_2000_pods_asks_for_nothing_and_is_cheap() -> None:
    settings = PoolSettings(min_workers=0, max_workers=2000)
    pods = [pod(s) for s in range(2000)]
    workers = busy(*range(2000))
    controller = PoolController(settings)
    started = time.perf_counter()
    plan = controller.tick(pods, status(0, workers), 0.0, 0.0)
    took = time.perf_counter() - started
    assert (plan.create, plan.delete) == ((), ())
    assert took < 1.0, f"a steady tick over 2,000 pods took {took:.2f} s"
