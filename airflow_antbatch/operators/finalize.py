"""The finalize task: write the ``_SUCCESS`` manifest once every shard is committed."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from airflow_antbatch.version_compat import BaseOperator

if TYPE_CHECKING:
    from collections.abc import Sequence

    from airflow_antbatch.version_compat import Context


class FinalizeBatchInferenceOperator(BaseOperator):
    """Checks completeness from the ledger and writes the manifest; returns a compact summary.

    The manifest itself (every file with its row count) stays in the object store beside the
    output; XCom carries only what downstream tasks need to find and trust it.
    """

    template_fields: Sequence[str] = ("plan_uri",)
    ui_color = "#e8fef0"

    def __init__(self, *, plan_uri: str, storage_options: dict[str, Any] | None = None, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.plan_uri = plan_uri
        self.storage_options = storage_options

    def execute(self, context: Context) -> dict[str, Any]:
        from airflow_antbatch.finalize import MANIFEST_NAME, finalize_job

        manifest = finalize_job(self.plan_uri, self.storage_options)
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
        return summary
