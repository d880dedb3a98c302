"""The "AntBatch progress" extra link of the sensor and worker tasks, opening the job's page.

Airflow 3 computes extra links on the worker when a task ends, in every terminal state, and
stores them in XCom for the UI. The page's address depends only on the task instance and the
API server's ``[api] base_url``, so ``get_link`` builds it from ``ti_key`` there: nothing needs
pushing during ``execute``, and a task that fails early still gets its link.
"""

from __future__ import annotations

from typing import TYPE_CHECKING
from urllib.parse import quote as url_quote

from airflow_antbatch.version_compat import BaseOperatorLink, conf

if TYPE_CHECKING:
    from airflow_antbatch.version_compat import BaseOperator, TaskInstanceKey

URL_PREFIX = "/antbatch"  # where the API server mounts the plugin's app
PAGE_ROUTE = "/job"


def page_query(
    dag_id: str, run_id: str, task_id: str | None = None, map_index: str | None = None, *, quote: bool = True
) -> str:
    """The page's query string; ``quote=False`` keeps the UI's ``{DAG_ID}``-style placeholders."""
    fields = {"dag_id": dag_id, "run_id": run_id, "task_id": task_id, "map_index": map_index}
    return "&".join(f"{k}={url_quote(v, safe='') if quote else v}" for k, v in fields.items() if v is not None)


class AntBatchJobLink(BaseOperatorLink):
    """Opens the progress page of the job this task belongs to."""

    name = "AntBatch progress"

    def get_link(self, operator: BaseOperator, *, ti_key: TaskInstanceKey) -> str:
        base = (conf.get("api", "base_url", fallback="") or "").rstrip("/")
        query = page_query(ti_key.dag_id, ti_key.run_id, ti_key.task_id, str(ti_key.map_index))
        return f"{base}{URL_PREFIX}{PAGE_ROUTE}?{query}"
