"""The plan task: list the input, cut shards, write the plan once, size the worker fan-out."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from airflow_antbatch.errors import PlanConflictError, SpecError
from airflow_antbatch.hooks.storage import job_connection, join_conn_id, storage_options
from airflow_antbatch.layout import PLAN_URI_KEY
from airflow_antbatch.options import job_options, resolve, templated, with_job_options
from airflow_antbatch.spec import JobSpec, ModelStage
from airflow_antbatch.version_compat import AirflowFailException, BaseOperator

if TYPE_CHECKING:
    from collections.abc import Sequence

    from airflow_antbatch.version_compat import Context, OperatorLineage

_TRUE = frozenset({"true", "1", "yes", "on"})
_FALSE = frozenset({"false", "0", "no", "off", "", "none"})


class PlanBatchInferenceOperator(BaseOperator):
    """Writes the job plan into the ledger and returns one kwargs dict per worker to map over.

    A rerun with unchanged input reuses the stored plan, so cleared or retried runs skip the
    committed shards; a changed input fails unless ``force_rerun`` is true, which starts a fresh
    attempt. The plan URI is pushed to XCom under ``plan_uri`` for the sensor and finalize.
    The job fields are those of :class:`~airflow_antbatch.spec.JobSpec`; they are validated
    when the DAG is parsed, and the URI and import-path fields are templated. ``stages`` (a
    chain of models: dicts or :class:`~airflow_antbatch.spec.ModelStage`) replaces ``model``;
    it is kept as dicts, so that the import paths inside are templated too.

    ``conn_id`` (or URIs such as ``s3://conn_id@bucket/in/``) names the Airflow connection
    that this task reads the input and writes the ledger through
    (:mod:`airflow_antbatch.hooks.storage`); the plan, and the workers, get the URIs without it.
    The plan URI pushed to XCom names it again, for the sensor, finalize and the UI page.
    """

    template_fields: Sequence[str] = (*templated(), "force_rerun")
    # Templated job options this class reads itself (``__init__`` sets every templated one).
    input_uri: str | list[str]
    output_uri: str
    state_uri: str | None
    stages: list[dict[str, Any]]
    ui_color = "#e8f0fe"

    @with_job_options
    def __init__(
        self,
        *,
        max_workers: int = 4,
        min_shards_per_worker: int = 1,
        force_rerun: bool | str = False,
        conn_id: str | None = None,
        **kwargs: Any,
    ) -> None:
        names = {o.name for o in job_options()}
        job = resolve({k: kwargs.pop(k) for k in list(kwargs) if k in names}, type(self).__name__)
        super().__init__(**kwargs)
        self.conn_id = conn_id
        for name, value in (("max_workers", max_workers), ("min_shards_per_worker", min_shards_per_worker)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be an int >= 1, got {value!r}")
        input_uri, stages = job["input_uri"], job["stages"]
        job["input_uri"] = input_uri if isinstance(input_uri, str) else list(input_uri)
        # Set fields only: the task's rendered view shows what the DAG author wrote.
        job["stages"] = [
            {k: v for k, v in ModelStage.from_value(stage, i).to_dict().items() if v is not None}
            for i, stage in enumerate(stages)
        ]
        for name in templated():  # attributes, for Jinja to render
            setattr(self, name, job.pop(name))
        job["keep_columns"] = tuple(job["keep_columns"])
        job["storage_options"] = dict(job["storage_options"] or {})
        self.options: dict[str, Any] = job
        self.max_workers = max_workers
        self.min_shards_per_worker = min_shards_per_worker
        self.force_rerun = force_rerun
        self.job_spec()  # a bad setting fails when the DAG is parsed, not at 2 a.m.

    def connection(self) -> tuple[str | None, dict[str, str | None]]:
        """The job's connection and its URIs without it (see :func:`~airflow_antbatch.hooks.storage.job_connection`)."""
        inputs = [self.input_uri] if isinstance(self.input_uri, str) else self.input_uri
        uris = {"output_uri": self.output_uri, "state_uri": self.state_uri}
        return job_connection(self.conn_id, {**{f"input_uri[{i}]": u for i, u in enumerate(inputs)}, **uris})

    def job_spec(self) -> JobSpec:
        """The JobSpec from the (rendered, at run time) fields, its URIs without the connection."""
        _, uris = self.connection()
        output_uri, state_uri = str(uris.pop("output_uri")), uris.pop("state_uri")
        inputs = tuple(str(uri) for uri in uris.values())
        rendered = {name: getattr(self, name) for name in templated()}
        rendered.update(
            input_uri=inputs[0] if isinstance(self.input_uri, str) else inputs,
            output_uri=output_uri,
            stages=tuple(ModelStage.from_value(stage, i) for i, stage in enumerate(self.stages)),
            state_uri=state_uri,
        )
        return JobSpec(**rendered, **self.options)

    def get_openlineage_facets_on_start(self) -> OperatorLineage[Any, Any]:
        """The job's inputs and models, for OpenLineage (see :mod:`airflow_antbatch.operators.lineage`)."""
        from airflow_antbatch.operators.lineage import job_lineage

        return job_lineage(self.job_spec())

    def execute(self, context: Context) -> list[dict[str, str]]:
        from airflow_antbatch.planning import SHARDS_PER_WORKER, plan_job

        force = as_bool(self.force_rerun, "force_rerun")
        spec, conn_id = self.job_spec(), self.connection()[0]
        try:
            options = storage_options(conn_id, spec.output_uri, spec.storage_options)
            result = plan_job(
                spec, force=force, storage_options=options, min_shards=SHARDS_PER_WORKER * self.max_workers
            )
        except (SpecError, PlanConflictError) as exc:
            raise AirflowFailException(str(exc)) from exc  # a retry cannot fix the settings
        shards = len(result.plan.shards)
        if result.reused:
            self.log.info("Reusing plan %s (%d shards): input unchanged, commits kept", result.plan_uri, shards)
        else:
            why = " (force_rerun)" if force else ""
            self.log.info("Wrote plan %s: %d shards, attempt %d%s", result.plan_uri, shards, result.plan.attempt, why)
        context["ti"].xcom_push(key=PLAN_URI_KEY, value=join_conn_id(result.plan_uri, conn_id))
        workers = worker_count(shards, self.max_workers, self.min_shards_per_worker)
        self.log.info("Fanning out to %d workers (max_workers %d)", workers, self.max_workers)
        return [
            {"plan_uri": result.plan_uri, "worker_id": f"worker-{i}", "slot": f"{i}/{workers}"} for i in range(workers)
        ]


def worker_count(shards: int, max_workers: int, min_shards_per_worker: int = 1) -> int:
    """Few workers for a small night: each gets at least ``min_shards_per_worker`` shards to share.

    The count is an upper bound on parallelism, not a split: workers pull shards, so a slow
    start, a late pod or a retry simply takes whatever is left.
    """
    return max(1, min(max_workers, shards // min_shards_per_worker))


def as_bool(value: object, name: str) -> bool:
    """Templated params render to strings ("True", "false") unless the DAG renders native objects."""
    if isinstance(value, bool):
        return value
    text = str(value).strip().lower()
    if text in _TRUE:
        return True
    if text in _FALSE:
        return False
    raise AirflowFailException(f"{name} must be true or false, got {value!r}")
