"""The merge task: pack a night's small objects into Parquet packs before the job plans.

It runs on the Airflow worker (reading is I/O-bound and async, so one process at high
concurrency is the right shape); the workers then read a few large packs instead of every
object. A retried or cleared merge resumes: packs already written are kept.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from airflow_antbatch.hooks.storage import job_connection, join_conn_id, storage_options
from airflow_antbatch.version_compat import BaseOperator

if TYPE_CHECKING:
    from collections.abc import Sequence

    from airflow_antbatch.object_reader import Reader
    from airflow_antbatch.version_compat import Context

INPUT_URI_KEY = "input_uri"


class SmallFileMergeOperator(BaseOperator):
    """Packs the objects under ``sources`` (or named in ``list_file``) into ``output_uri``.

    Returns the merge's counts (objects, bytes, packs, unreadable objects with reasons) and
    pushes the packs' location under the XCom key ``input_uri``, for the plan task.

    :param sources: prefixes, globs or objects (templated, e.g. ``s3://lake/images/ds={{ ds }}/``).
    :param output_uri: where the packs go (templated); a rerun over other objects is refused.
    :param list_file: a text file naming one object URL per line (templated).
    :param target_pack_bytes: the size packs aim for (default 128 MiB).
    :param concurrency: objects read at once.
    :param max_unreadable: objects that may vanish or fail before the merge fails.
    :param storage_options: fsspec options (no credentials: use the environment or a connection).
    :param conn_id: the Airflow connection to read and write through (or name it in the URIs:
        ``s3://conn_id@bucket/...``); the pushed ``input_uri`` names it, for the plan task.
    :param small_object_bytes: merge only if the median object is smaller than this; otherwise
        the task passes its one source on as the job's input (the builder's ``"auto"``).
    :param reader: what reads the objects: ``"auto"`` (obstore on S3 where s3fs's options
        translate, else s3fs), ``"obstore"`` or ``"s3fs"``.
    """

    template_fields: Sequence[str] = ("sources", "output_uri", "list_file")
    ui_color = "#eef3fe"

    def __init__(
        self,
        *,
        sources: str | Sequence[str] = (),
        output_uri: str,
        list_file: str | None = None,
        target_pack_bytes: int | None = None,
        concurrency: int | None = None,
        max_unreadable: int | None = None,
        storage_options: dict[str, Any] | None = None,
        small_object_bytes: int | None = None,
        reader: Reader = "auto",
        conn_id: str | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        self.conn_id = conn_id
        self.sources = [sources] if isinstance(sources, str) else list(sources)
        self.output_uri = output_uri
        self.list_file = list_file
        self.target_pack_bytes = target_pack_bytes
        self.concurrency = concurrency
        self.max_unreadable = max_unreadable
        self.storage_options = storage_options
        self.small_object_bytes = small_object_bytes
        self.reader = reader
        if small_object_bytes is not None and (len(self.sources) != 1 or list_file):
            raise ValueError(
                "merging only small objects (small_object_bytes) takes exactly one source and no list file"
            )

    def execute(self, context: Context) -> dict[str, Any]:
        from airflow_antbatch.merge import merge_small_files

        limits = {
            "target_pack_bytes": self.target_pack_bytes,
            "concurrency": self.concurrency,
            "max_unreadable": self.max_unreadable,
        }
        sources = {f"sources[{i}]": uri for i, uri in enumerate(self.sources)}
        conn_id, uris = job_connection(
            self.conn_id, {**sources, "output_uri": self.output_uri, "list_file": self.list_file or None}
        )
        output_uri, list_file = str(uris.pop("output_uri")), uris.pop("list_file")
        result = merge_small_files(
            [str(uri) for uri in uris.values()],
            output_uri,
            list_file=list_file,
            storage_options=storage_options(conn_id, output_uri, self.storage_options),
            small_object_bytes=self.small_object_bytes,
            reader=self.reader,
            **{k: v for k, v in limits.items() if v is not None},
        )
        if not result.merged:
            self.log.info(
                "Not merging: the median of %d objects is at least %d bytes; the job reads %s as it is",
                result.objects,
                self.small_object_bytes,
                self.sources[0],
            )
            context["ti"].xcom_push(key=INPUT_URI_KEY, value=join_conn_id(str(uris["sources[0]"]), conn_id))
            return result.to_dict()
        self.log.info(
            "Packed %d objects (%d bytes) into %d packs under %s: %d written now, %d kept from an earlier try; "
            "%d unreadable; %.0f objects/s read with %s",
            result.objects,
            result.bytes,
            result.packs,
            result.output_uri,
            result.packs_written,
            result.packs_skipped,
            len(result.unreadable),
            result.objects_per_s,
            result.reader,
        )
        for path, why in result.unreadable[:20]:
            self.log.warning("Skipped %s: %s", path, why)
        context["ti"].xcom_push(key=INPUT_URI_KEY, value=join_conn_id(result.output_uri, conn_id))
        return result.to_dict()
