"""``elastic_batch_inference``: the one-call builder of a batch-inference job in a DAG.

    plan -> worker x N (mapped, one per worker, not per shard) -> wait_for_shards -> finalize

Workers are launched by a *launcher*: ``local`` runs each as a subprocess on the Airflow
worker. A launcher is an operator class that takes the mapped kwargs ``plan_uri``,
``worker_id`` and ``slot`` (``"I/N"``, its share of the plan) plus ``storage_options``, runs
the same ``antbatch worker`` command, and may offer ``launcher_defaults(max_workers=...)`` for
its own defaults; a pod launcher registers beside ``local`` without changing the builder. The
registry holds import paths, so that parsing a DAG imports only the launcher it uses (a pod
launcher pulls in the kubernetes client). A launcher class with ``launches_pool = True``
(``kubernetes-pool``) owns the whole fan-out in one task that decides success from the ledger:
the group is then ``plan -> pool -> finalize``.
"""

from __future__ import annotations

import datetime as dt
import importlib
from typing import TYPE_CHECKING, Any

from airflow_antbatch.layout import PLAN_URI_KEY
from airflow_antbatch.operators.finalize import FinalizeBatchInferenceOperator, output_root_asset
from airflow_antbatch.operators.merge import INPUT_URI_KEY, SmallFileMergeOperator
from airflow_antbatch.operators.plan import PlanBatchInferenceOperator
from airflow_antbatch.options import resolve, with_job_options
from airflow_antbatch.sensors.ledger import ShardLedgerSensor
from airflow_antbatch.spec import OptionDoc
from airflow_antbatch.version_compat import TaskGroup, TriggerRule

if TYPE_CHECKING:
    from collections.abc import Mapping

    from airflow_antbatch.version_compat import Asset, BaseOperator

# "auto" merges when the median object is smaller than this: below it, first-byte latency
# rather than bandwidth sets the read time on object stores.
SMALL_OBJECT_BYTES = 2**20

# launcher name -> "module:OperatorClass"
LAUNCHERS: dict[str, str] = {
    "local": "airflow_antbatch.operators.local_worker:LocalBatchWorkerOperator",
    "kubernetes": "airflow_antbatch.operators.kubernetes_worker:KubernetesBatchWorkerOperator",
    "kubernetes-pool": "airflow_antbatch.operators.kubernetes_pool:ElasticBatchInferenceOperator",
}


# The builder's own options (beyond the job options, which JobSpec documents): the docs'
# option tables are made from these and the builder's signature (scripts/option_tables.py).
BUILDER_OPTIONS: dict[str, OptionDoc] = {
    "launcher": OptionDoc(
        "how workers run: `local` = one `antbatch worker` subprocess per mapped task, `kubernetes` = "
        "one pod per mapped task, `kubernetes-pool` = one task that owns a pool of worker pods and "
        "succeeds from the ledger (see Kubernetes)"
    ),
    "max_workers": OptionDoc(
        "fan-out: `max(1, min(max_workers, shards // min_shards_per_worker))` workers (a pod "
        "launcher's pool: at most this many pods)"
    ),
    "min_shards_per_worker": OptionDoc("shards each worker gets at least, so a small night gets few workers"),
    "worker_retries": OptionDoc(
        "Airflow retries of a worker task: a retried worker skips committed shards and takes its own "
        "old claims back at once"
    ),
    "worker_retry_delay": OptionDoc("the delay between those retries", shown_default="10 s"),
    "poke_interval": OptionDoc("how often the ledger sensor checks the ledger", shown_default="10 s"),
    "sensor_timeout": OptionDoc(
        "how long the sensor waits; it also fails when shards are left and no worker runs for 3 lease TTLs",
        shown_default="24 h",
    ),
    "deferrable_sensor": OptionDoc(
        "True: the sensor waits in the triggerer (`ShardLedgerTrigger`), not in a worker slot, logging "
        "shards committed, rows/s and ETA each `poke_interval`; False pokes; None follows the "
        "deployment's `[operators] default_deferrable` (False unless set; it used to be True)"
    ),
    "output_asset": OptionDoc(
        "finalize emits an Airflow Asset: True = the output's static root, or an `Asset` of yours, or False for none"
    ),
    "force_rerun": OptionDoc(
        'start a fresh attempt that recomputes everything (a template such as `"{{ params.force_rerun }}"` works)'
    ),
    "worker_kwargs": OptionDoc(
        "to the launcher's operator: for `local` `cpu_budget`, `preprocess_workers`, `torch_threads`; "
        "for pods an image, resources, secrets"
    ),
    "merge_small_files": OptionDoc(
        'pack small objects into Parquet packs first (True, or `"auto"`: when the median object is '
        "under 1 MiB; see Many small files)"
    ),
    "merge_output_uri": OptionDoc("where the packs go", shown_default="`OUT/_packs`"),
    "merge_kwargs": OptionDoc(
        "to the merge operator: `target_pack_bytes`, `concurrency`, `max_unreadable`, `list_file`, `reader`"
    ),
    "conn_id": OptionDoc(
        "the Airflow connection that merge, plan, the sensor, finalize and the UI page reach the stores "
        "through (or URIs such as `s3://conn_id@bucket/in/`); workers never get it"
    ),
}


def launcher_operator(name: str) -> type[BaseOperator]:
    """The worker operator class registered as launcher ``name``."""
    if name not in LAUNCHERS:
        raise ValueError(f"unknown launcher {name!r}; available launchers: {', '.join(sorted(LAUNCHERS))}")
    module, _, attr = LAUNCHERS[name].partition(":")
    cls: type[BaseOperator] = getattr(importlib.import_module(module), attr)
    return cls


@with_job_options
def elastic_batch_inference(
    group_id: str = "batch_inference",
    *,
    launcher: str = "local",
    max_workers: int = 4,
    min_shards_per_worker: int = 1,
    worker_retries: int = 2,
    worker_retry_delay: dt.timedelta = dt.timedelta(seconds=10),
    poke_interval: float = 10.0,
    sensor_timeout: float = 24 * 3600.0,
    deferrable_sensor: bool | None = None,
    output_asset: Asset | bool = True,
    force_rerun: bool | str = False,
    worker_kwargs: Mapping[str, Any] | None = None,
    merge_small_files: bool | str = False,
    merge_output_uri: str | None = None,
    merge_kwargs: Mapping[str, Any] | None = None,
    conn_id: str | None = None,
    **job: Any,
) -> TaskGroup:
    """Build the job's task group inside the current DAG and return it.

    ``job`` holds the job options, JobSpec's fields (listed in this function's signature and
    in the docs' option tables, made from JobSpec). They are validated now (a typo fails DAG
    parsing, not the nightly run); URIs, import paths and
    ``force_rerun`` may be Jinja templates such as ``"s3://lake/x/ds={{ ds }}/"`` or
    ``"{{ params.force_rerun }}"``. Give ``model`` for one model or ``stages`` for a chain.
    ``worker_kwargs`` go to the launcher's operator (e.g. an image or resources for a pod
    launcher, ``cpu_budget`` or ``preprocess_workers`` for ``local``).

    The sensor runs once every worker task has ended, whatever its state, and succeeds when
    every shard is committed: a failed worker task does not fail the job if others finished
    its shards. The DAG run's state follows the sensor and finalize. ``deferrable_sensor=True``
    waits in the triggerer, not in a worker slot; ``False`` pokes; the default, None, follows
    the deployment's ``[operators] default_deferrable`` (False unless set), as the provider's
    operators do. It used to default to True: pass ``deferrable_sensor=True`` to keep that.
    Why the change: the sensor starts only once every worker task has ended, so its first
    check nearly always settles the job and deferring buys little, while on a deployment with
    no triggerer a deferred sensor would never resume.

    Finalize emits ``output_asset``: by default the Asset of the output's static root (see
    :func:`output_root_asset`), with the run's output URI and manifest in the event's ``extra``;
    pass an ``Asset`` to name it yourself, or ``False`` for none.

    ``merge_small_files=True`` puts a :class:`SmallFileMergeOperator` first: the objects under
    ``input_uri`` are packed into Parquet packs at ``merge_output_uri`` (default
    ``OUTPUT/_packs``) and the job reads the packs, its preprocess hook getting each object's
    ``path`` and ``data`` bytes. ``"auto"`` merges only when the median object of the one
    ``input_uri`` is under ``SMALL_OBJECT_BYTES``, and otherwise lets the job read the input as
    it is (the format is then inferred from the file names). ``merge_kwargs`` go to the merge
    operator (``target_pack_bytes``, ``concurrency``, ``max_unreadable``, ``list_file``, ``reader``).

    ``conn_id`` (or URIs such as ``s3://conn_id@bucket/in/``) is the Airflow connection that
    merge, plan, the sensor, finalize and the UI page reach the stores through; the sensor
    and finalize learn it from the plan URI that the plan task pushes. Workers never get it:
    they authenticate with the Kubernetes secrets or workload identity of ``worker_kwargs``
    (the local launcher: with the Airflow worker's environment).
    """
    if merge_small_files not in (False, True, "auto"):
        raise ValueError(f"merge_small_files must be True, False or 'auto', got {merge_small_files!r}")
    worker_cls = launcher_operator(launcher)
    job = resolve(job, "elastic_batch_inference")
    input_uri, output_uri, storage_options = job["input_uri"], job["output_uri"], job["storage_options"]
    with TaskGroup(group_id=group_id) as group:
        merge = None
        if merge_small_files:
            merge = SmallFileMergeOperator(
                task_id="merge",
                sources=input_uri,
                output_uri=merge_output_uri or f"{output_uri.rstrip('/')}/_packs",
                storage_options=storage_options,
                small_object_bytes=SMALL_OBJECT_BYTES if merge_small_files == "auto" else None,
                conn_id=conn_id,
                **(merge_kwargs or {}),
            )
            job["input_uri"] = f"{{{{ ti.xcom_pull(task_ids='{merge.task_id}', key='{INPUT_URI_KEY}') }}}}"
            job["input_format"] = "parquet" if merge_small_files is True else None
        plan = PlanBatchInferenceOperator(
            task_id="plan",
            **job,
            max_workers=max_workers,
            min_shards_per_worker=min_shards_per_worker,
            force_rerun=force_rerun,
            conn_id=conn_id,
        )
        plan_uri = f"{{{{ ti.xcom_pull(task_ids='{plan.task_id}', key='{PLAN_URI_KEY}') }}}}"
        defaults = getattr(worker_cls, "launcher_defaults", None)
        launcher_kwargs = {**(defaults(max_workers=max_workers) if defaults else {}), **(worker_kwargs or {})}
        first: Any  # the fan-out's first and last task
        if getattr(worker_cls, "launches_pool", False):
            # One task owns the whole fan-out and succeeds from the ledger: no mapping, no sensor.
            first = last = worker_cls(
                task_id="pool",
                plan_uri=plan_uri,
                storage_options=storage_options,
                max_workers=max_workers,
                retries=worker_retries,
                retry_delay=worker_retry_delay,
                **launcher_kwargs,
            )
        else:
            workers = worker_cls.partial(
                task_id="worker",
                storage_options=storage_options,
                retries=worker_retries,
                retry_delay=worker_retry_delay,
                map_index_template="{{ task.worker_id }}",
                **launcher_kwargs,
            ).expand_kwargs(plan.output)
            sensor = ShardLedgerSensor(
                task_id="wait_for_shards",
                plan_uri=plan_uri,
                storage_options=storage_options,
                poke_interval=poke_interval,
                timeout=sensor_timeout,
                deferrable=deferrable_sensor,  # False: poke mode, holding a worker slot while it waits
                # Runs when every worker task has ended, failed ones included, as long as the plan
                # succeeded (a failed plan marks it upstream_failed instead of running it).
                trigger_rule=TriggerRule.ALL_DONE_MIN_ONE_SUCCESS,
                # It starts after the workers ended: shards left with no live worker are abandoned.
                stall_timeout=max(3 * job["lease_ttl_s"], 2 * poke_interval),
            )
            workers >> sensor
            plan >> sensor
            first, last = workers, sensor
        if output_asset is True:
            output_asset = output_root_asset(output_uri)
        finalize = FinalizeBatchInferenceOperator(
            task_id="finalize",
            plan_uri=plan_uri,
            storage_options=storage_options,
            outlets=[output_asset] if output_asset else [],
        )
        if merge is not None:
            merge >> plan
        plan >> first
        last >> finalize
    return group
