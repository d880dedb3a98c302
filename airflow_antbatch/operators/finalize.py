"""The finalize task: write the ``_SUCCESS`` manifest once every shard is committed.

It is also where the job's output becomes an Airflow Asset event, so that downstream DAGs can
be scheduled on it (``schedule=[output_root_asset("s3://lake/predictions/")]``). Assets are
static, named when the DAG is parsed, while a nightly output URI is usually templated
(``s3://lake/predictions/ds={{ ds }}/``): the Asset is therefore the output's static root, the
URI cut before its first templated path segment, and each run's details (the rendered output
URI, the manifest, rows, attempt) travel in the asset event's ``extra``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from airflow_antbatch.hooks.storage import reach, split_conn_id
from airflow_antbatch.version_compat import Asset, BaseOperator

if TYPE_CHECKING:
    from collections.abc import Sequence

    from airflow_antbatch.version_compat import Context, OperatorLineage


def output_root_asset(output_uri: str) -> Asset:
    """The Asset of a (possibly templated) output URI: its static root, as a URI.

    ``s3://lake/predictions/ds={{ ds }}/`` gives ``s3://lake/predictions``; a local absolute
    path gives a ``file://`` URI. A URI whose bucket or first path segment is templated has no
    static root, and is refused: name the Asset yourself.
    """
    static = output_uri.split("{{", 1)[0]
    if static != output_uri:
        static = static.rsplit("/", 1)[0]  # drop the partly templated segment (ds=...)
    static = split_conn_id(static.rstrip("/"))[0]  # an Asset names data, not how Airflow reaches it
    if static.startswith("/"):
        static = f"file://{static}"
    scheme, sep, rest = static.partition("://")
    if not (scheme and sep and rest):
        raise ValueError(
            f"output_uri {output_uri!r} has no static root to name an Airflow Asset after; "
            "pass output_asset=Asset(...) (or False for no Asset) to elastic_batch_inference"
        )
    return Asset(uri=static)


class FinalizeBatchInferenceOperator(BaseOperator):
    """Checks completeness from the ledger and writes the manifest; returns a compact summary.

    The manifest itself (every file with its row count) stays in the object store beside the
    output; XCom carries only what downstream tasks need to find and trust it. Each Asset in
    ``outlets`` gets an event whose ``extra`` is that summary plus the manifest's
    ``finalized_at`` (unchanged when a rerun of a finished job rewrote nothing).

    The ledger and the output are reached through ``conn_id``, or the connection that
    ``plan_uri`` names (``s3://conn_id@bucket/...``, as the plan task pushes it), when given.
    """

    template_fields: Sequence[str] = ("plan_uri",)
    ui_color = "#e8fef0"

    def __init__(
        self,
        *,
        plan_uri: str,
        storage_options: dict[str, Any] | None = None,
        conn_id: str | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        self.plan_uri = plan_uri
        self.storage_options = storage_options
        self.conn_id = conn_id
        self._summary: dict[str, Any] | None = None  # this try's, for OpenLineage

    def execute(self, context: Context) -> dict[str, Any]:
        from airflow_antbatch.finalize import finalize_job
        from airflow_antbatch.layout import MANIFEST_NAME

        manifest = finalize_job(*reach(self.plan_uri, self.conn_id, self.storage_options))
        output_uri = manifest["output"]
        summary = {
            "manifest_uri": f"{output_uri}/{MANIFEST_NAME}",
            "output_uri": output_uri,
            "plan_uri": self.plan_uri,
            "rows": manifest["rows"],
            "shards": manifest["shards"],
            "attempt": manifest["attempt"],
        }
        self.log.info(
            "Manifest %s: %d rows in %d shard files (attempt %d)",
            summary["manifest_uri"],
            summary["rows"],
            summary["shards"],
            summary["attempt"],
        )
        for outlet in self.outlets:
            if isinstance(outlet, Asset):
                extra = {**summary, "finalized_at": manifest.get("finalized_at")}
                context["outlet_events"][outlet].extra.update(extra)
        self._summary = summary
        return summary

    def get_openlineage_facets_on_complete(self, task_instance: Any) -> OperatorLineage[Any, Any]:
        """The job's inputs, models and output with its row and file counts, for OpenLineage.

        See :mod:`airflow_antbatch.operators.lineage`; the spec is read back from the plan.
        """
        from airflow_antbatch.ledger import Ledger
        from airflow_antbatch.operators.lineage import job_lineage

        summary = self._summary or task_instance.xcom_pull(task_ids=self.task_id)
        spec = Ledger.open(*reach(self.plan_uri, self.conn_id, self.storage_options)).plan.spec
        return job_lineage(spec, written=summary)
