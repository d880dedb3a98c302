"""Provider metadata, read by Airflow through the ``apache_airflow_provider`` entry point.

The one place that lists what the provider offers; a test imports every module named here.
``package-name`` must be the installed distribution's name, or provider discovery refuses it.
Airflow's provider-info schema has no key for task-group builders, so
``airflow_antbatch.task_group.elastic_batch_inference`` is documented rather than listed.
"""

from __future__ import annotations

from typing import Any

from airflow_antbatch import __version__

INTEGRATION = "AntBatch"


def get_provider_info() -> dict[str, Any]:
    return {
        "package-name": "airflow-antbatch",
        "name": "AntBatch",
        "description": (
            "Elastic, fault-tolerant batch inference with PyTorch models over large datasets in object stores, "
            "with an object-store shard ledger for exactly-once output"
        ),
        "versions": [__version__],
        "integrations": [
            {
                "integration-name": INTEGRATION,
                "external-doc-url": "https://arxiv.org/abs/2404.09686",
                "tags": ["software"],
            }
        ],
        "operators": [
            {
                "integration-name": INTEGRATION,
                "python-modules": [
                    "airflow_antbatch.operators.finalize",
                    "airflow_antbatch.operators.kubernetes_pool",
                    "airflow_antbatch.operators.kubernetes_worker",
                    "airflow_antbatch.operators.local_worker",
                    "airflow_antbatch.operators.merge",
                    "airflow_antbatch.operators.plan",
                ],
            }
        ],
        "sensors": [
            {
                "integration-name": INTEGRATION,
                "python-modules": ["airflow_antbatch.sensors.ledger"],
            }
        ],
        "triggers": [
            {
                "integration-name": INTEGRATION,
                "python-modules": ["airflow_antbatch.triggers.ledger", "airflow_antbatch.triggers.pool"],
            }
        ],
        # Connections of the amazon, google and microsoft-azure providers, turned into fsspec
        # options: the provider defines no connection type of its own.
        "hooks": [{"integration-name": INTEGRATION, "python-modules": ["airflow_antbatch.hooks.storage"]}],
        # The progress page; Airflow reads this key only with [core] lazy_discover_providers off,
        # so the distribution also declares the plugin under the airflow.plugins entry point.
        "plugins": [{"name": "antbatch", "plugin-class": "airflow_antbatch.plugins.plugin.AntBatchPlugin"}],
        "extra-links": ["airflow_antbatch.plugins.links.AntBatchJobLink"],
    }
