"""airflow-antbatch's UI plugin, for deployments that load plugins from a plugins folder.

Copy this file into ``[core] plugins_folder``. Where the ``airflow-antbatch`` distribution is
installed with pip, Airflow already loads the plugin through its ``airflow.plugins`` entry point,
and this file then defines nothing, so that the plugin is not registered twice (Airflow would
report the second copy as an import error).
"""

from __future__ import annotations

from importlib.metadata import entry_points

if not any(ep.value.startswith("airflow_antbatch.") for ep in entry_points(group="airflow.plugins")):
    from airflow_antbatch.plugins.plugin import AntBatchPlugin

    __all__ = ["AntBatchPlugin"]
