"""``AntBatchPlugin``: registers the progress app with Airflow's API server and the UI.

Airflow finds it through the ``airflow.plugins`` entry point (always read), through the provider
info's ``plugins`` key (read when ``[core] lazy_discover_providers`` is off), or through
``plugins/antbatch_plugin.py`` copied into a plugins folder; the name keeps it loaded once.
"""

from __future__ import annotations

from airflow_antbatch.plugins.app import create_app
from airflow_antbatch.plugins.links import PAGE_ROUTE, URL_PREFIX, page_query
from airflow_antbatch.version_compat import AirflowPlugin

# The page for the job of the run or task instance the user is looking at.
_HREF = f"{URL_PREFIX}{PAGE_ROUTE}?{page_query('{DAG_ID}', '{RUN_ID}', '{TASK_ID}', '{MAP_INDEX}', quote=False)}"
_RUN_HREF = f"{URL_PREFIX}{PAGE_ROUTE}?{page_query('{DAG_ID}', '{RUN_ID}', quote=False)}"


class AntBatchPlugin(AirflowPlugin):
    name = "antbatch"
    fastapi_apps = [{"app": create_app(), "url_prefix": URL_PREFIX, "name": "AntBatch progress"}]
    external_views = [
        {
            "name": "AntBatch progress",
            "href": _HREF,
            "destination": "task_instance",
            "url_route": "antbatch_task_progress",
        },
        {
            "name": "AntBatch progress",
            "href": _RUN_HREF,
            "destination": "dag_run",
            "url_route": "antbatch_run_progress",
        },
    ]
