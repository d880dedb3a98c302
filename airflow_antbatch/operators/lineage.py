"""OpenLineage for a batch-inference job: the datasets it reads and writes, and its models.

Through apache-airflow-providers-openlineage's operator interface (the optional ``openlineage``
extra): its listener calls ``get_openlineage_facets_on_start`` / ``_on_complete`` on our
operators and sends what they return. Where each part is reported:

- the plan task, on start: the input datasets and the ``antbatch`` run facet (the model or
  the chain of stages, preprocess and postprocess), from its rendered fields: no store access;
- finalize, on complete: the same inputs and the output dataset with its row and file counts
  from the manifest, when the output exists and every row is accounted for. It reads the
  job's spec back from the plan (one GET, only when lineage is enabled).

Datasets are named as the OpenLineage naming spec says (``openlineage.client.naming``): S3
``s3://bucket`` + key, GCS ``gs://bucket`` + key, Azure ``abfss://container@account.dfs.core.windows.net``
+ path, local files ``file`` + path. A prefix names the dataset (``s3://lake`` +
``predictions/ds=2026-01-01``): a job's input and output are directories of files. A glob is
named by the directory before its first wildcard. Connection ids are not part of a name.

This module imports the OpenLineage client: it is imported only from those methods.
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING, Any, ClassVar

import attr
from openlineage.client.generated.base import InputDataset, OutputDataset, RunFacet
from openlineage.client.generated.output_statistics_output_dataset import OutputStatisticsOutputDatasetFacet
from openlineage.client.naming import dataset as naming

from airflow_antbatch.hooks.storage import AZURE_SCHEMES, GCS_SCHEMES, S3_SCHEMES, split_conn_id
from airflow_antbatch.version_compat import OperatorLineage

if TYPE_CHECKING:
    from collections.abc import Mapping

    from airflow_antbatch.spec import JobSpec

FACET = "antbatch"  # the run facet's key
_GLOB_CHARS = "*?["


@attr.define
class AntBatchRunFacet(RunFacet):
    """The models a run scored with: ``model``, or the ``stages`` chain, and the user hooks."""

    model: str | None = attr.field(default=None)
    stages: list[dict[str, Any]] = attr.field(factory=list)
    preprocess: str | None = attr.field(default=None)
    postprocess: str | None = attr.field(default=None)
    plan_uri: str | None = attr.field(default=None)
    attempt: int | None = attr.field(default=None)

    # Import paths and URIs, not secrets: the provider's secrets masker leaves them as they are.
    _additional_skip_redact: ClassVar[list[str]] = ["model", "stages", "preprocess", "postprocess", "plan_uri"]

    @staticmethod
    def _get_schema() -> str:
        # A custom facet with no schema of its own published: it is a RunFacet with more fields.
        return "https://openlineage.io/spec/2-0-2/OpenLineage.json#/$defs/RunFacet"


def dataset_name(uri: str, storage_options: Mapping[str, Any] | None = None) -> tuple[str, str]:
    """``(namespace, name)`` of the dataset at ``uri``; ``storage_options`` may name an Azure account."""
    plain = split_conn_id(uri)[0]
    for index, char in enumerate(plain):
        if char in _GLOB_CHARS:
            plain = plain[: plain.rfind("/", 0, index) + 1]
            break
    scheme, sep, rest = plain.partition("://")
    if not sep or scheme in ("file", "local"):
        path = os.path.abspath(rest if sep else plain).rstrip("/") or "/"
        return naming.LocalFileSystem(path).get_namespace(), path
    bucket, _, key = rest.partition("/")
    key = key.strip("/") or "/"
    named: naming.DatasetNaming
    if scheme in S3_SCHEMES:
        named = naming.S3(bucket, key)
    elif scheme in GCS_SCHEMES:
        named = naming.GCS(bucket, key)
    elif scheme in AZURE_SCHEMES and ("@" in bucket or (storage_options or {}).get("account_name")):
        container, _, host = bucket.partition("@")
        account = host.split(".", 1)[0] if host else str((storage_options or {})["account_name"])
        named = naming.ABFSS(container, account, key)
    else:
        return f"{scheme}://{bucket}", key
    return named.get_namespace(), named.get_name()


def job_lineage(spec: JobSpec, *, written: Mapping[str, Any] | None = None) -> OperatorLineage[Any, Any]:
    """The job's inputs and run facet; with finalize's summary (``written``), also the output it wrote."""
    options = spec.storage_options
    inputs = [InputDataset(*dataset_name(uri, options)) for uri in spec.input_uris]
    outputs = []
    if written is not None:
        stats = OutputStatisticsOutputDatasetFacet(rowCount=int(written["rows"]), fileCount=int(written["shards"]))
        namespace, name = dataset_name(spec.output_uri, options)
        outputs.append(OutputDataset(namespace, name, outputFacets={"outputStatistics": stats}))
    facet = AntBatchRunFacet(
        model=spec.model,
        stages=[
            {k: v for k, v in stage.to_dict().items() if k in ("name", "model", "adapter", "output_column") and v}
            for stage in spec.stages
        ],
        preprocess=spec.preprocess,
        postprocess=spec.postprocess,
        plan_uri=None if written is None else split_conn_id(str(written["plan_uri"]))[0],
        attempt=None if written is None else int(written["attempt"]),
    )
    return OperatorLineage(inputs=inputs, outputs=outputs, run_facets={FACET: facet})
