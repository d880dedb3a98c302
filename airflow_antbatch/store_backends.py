"""Per-object-store create-if-absent, reads and error mapping behind ``AtomicStore``.

Each cloud store has one conditional write that the service itself arbitrates (ADR 0001):

- S3 (s3fs): ``PutObject`` with ``If-None-Match: *``; a lost race is HTTP 412;
- GCS (gcsfs): an upload with ``ifGenerationMatch=0`` (succeeds only if no live generation
  exists); gcsfs turns the 412 into ``FileExistsError``;
- Azure Blob (adlfs): ``Put Blob`` with ``If-None-Match: *`` (``upload_blob(overwrite=False)``);
  the SDK turns the 409/412 into ``ResourceExistsError`` and adlfs into ``FileExistsError``.

The clients are optional extras, so nothing here imports them: errors are recognised by the
modules already loaded.
"""

from __future__ import annotations

import logging
import sys
import time
from typing import TYPE_CHECKING, Any

from airflow_antbatch.errors import StoreError

if TYPE_CHECKING:
    import fsspec

S3_PROTOCOLS = frozenset({"s3", "s3a"})
GCS_PROTOCOLS = frozenset({"gs", "gcs"})
AZURE_PROTOCOLS = frozenset({"az", "abfs", "abfss"})
# The extra that brings each protocol's client: named in the one-line error when it is missing.
EXTRAS = {
    **dict.fromkeys(S3_PROTOCOLS, "s3"),
    **dict.fromkeys(GCS_PROTOCOLS, "gcs"),
    **dict.fromkeys(AZURE_PROTOCOLS, "azure"),
}
# AWS answers 409 ConditionalRequestConflict while a competing conditional write is in flight.
_CONFLICT_RETRIES = 5
# Client exceptions that mean "the store could not be reached or answered an error" but are no
# OSError: botocore's, aiohttp's (s3fs, gcsfs), gcsfs's HttpError, google-auth's, Azure's.
_TRANSPORT_ERRORS = (
    ("botocore.exceptions", "BotoCoreError"),
    ("aiohttp", "ClientError"),
    ("gcsfs.retry", "HttpError"),
    ("google.auth.exceptions", "GoogleAuthError"),
    ("azure.core.exceptions", "AzureError"),
)


def cloud_kind(protocols: set[str]) -> str | None:
    """``s3``, ``gcs`` or ``azure`` for a filesystem speaking one of ``protocols``, else None."""
    for kind, known in (("s3", S3_PROTOCOLS), ("gcs", GCS_PROTOCOLS), ("azure", AZURE_PROTOCOLS)):
        if protocols & known:
            return kind
    return None


def quiet_client_logs(kind: str) -> None:
    """The Azure SDK logs every request and response at INFO (about 30 lines each), which the
    worker's INFO logging would print for every claim and heartbeat: keep it to warnings, unless
    the user configured that logger themselves."""
    if kind == "azure":
        http_log = logging.getLogger("azure.core.pipeline.policies.http_logging_policy")
        if http_log.level == logging.NOTSET:
            http_log.setLevel(logging.WARNING)


def missing_client_message(url: str) -> str | None:
    """The one line to show when ``url``'s store client is not installed, naming the extra."""
    for part in url.split("::"):
        protocol = part.split("://", 1)[0] if "://" in part else ""
        extra = EXTRAS.get(protocol)
        if extra is not None:
            return (
                f"{url!r}: the {protocol}:// store needs its client, which is not installed: "
                f'pip install "airflow-antbatch[{extra}]"'
            )
    return None


def is_client_error(exc: BaseException) -> bool:
    """An exception of a loaded store client's transport or service error types."""
    for module, name in _TRANSPORT_ERRORS:
        cls = getattr(sys.modules.get(module), name, None)
        if isinstance(cls, type) and isinstance(exc, cls):
            return True
    return False


def cloud_create(kind: str, fs: fsspec.AbstractFileSystem, path: str, data: bytes) -> bool:
    """One conditional write; True if it created ``path``, False if something was there."""
    if kind == "s3":
        return _s3_create(fs, path, data)
    try:
        # gcsfs: ifGenerationMatch=0; adlfs: overwrite=False, i.e. If-None-Match: *.
        fs.pipe_file(path, data, mode="create")
        return True
    except FileExistsError:
        return False


def cloud_read(kind: str, fs: fsspec.AbstractFileSystem, path: str) -> bytes:
    """One GET and nothing else, never answered from fsspec's listing cache.

    s3fs would first ask for the size (a HEAD), which fsspec answers from its listing cache, as
    "not found" for a file another process wrote since this one listed the folder; gcsfs's and
    adlfs's ``cat_file`` are one GET (one ``download_blob``) with one connection.
    """
    if kind == "gcs":
        return bytes(fs.cat_file(path))
    return bytes(fs.cat_file(path, max_concurrency=1))


def version_of(info: dict[str, Any]) -> str:
    """What changes when an object is rewritten: the GCS generation (its ETag is the MD5 on the
    emulator, the same for the same bytes), else the ETag (S3, Azure), else mtime and size."""
    tag = info.get("generation") or info.get("ETag") or info.get("etag")
    if tag:
        return str(tag)
    when = info.get("mtime") or info.get("LastModified") or info.get("created") or ""
    return f"{when}:{info.get('size')}"


def _s3_create(fs: fsspec.AbstractFileSystem, path: str, data: bytes) -> bool:
    for attempt in range(_CONFLICT_RETRIES):
        try:
            fs.pipe_file(path, data, mode="create")
            return True
        except FileExistsError:
            return False
        except OSError as exc:
            status, code = _s3_error_status(exc)
            # Servers word a lost race differently (moto: FileExistsError; SeaweedFS:
            # EINVAL carrying a 412): every 412 PreconditionFailed means "already exists".
            if status == 412 or code == "PreconditionFailed":
                return False
            if status == 409 and attempt + 1 < _CONFLICT_RETRIES:
                time.sleep(0.05 * (attempt + 1))
                continue
            raise
    raise StoreError(f"create of {path} kept conflicting with concurrent writers")


def _s3_error_status(exc: BaseException) -> tuple[int | None, str | None]:
    """HTTP status and error code of the botocore error behind an s3fs exception, if any."""
    cause: BaseException | None = exc
    while cause is not None:
        response = getattr(cause, "response", None)
        if isinstance(response, dict):
            status = response.get("ResponseMetadata", {}).get("HTTPStatusCode")
            code = response.get("Error", {}).get("Code")
            return status, code
        cause = cause.__cause__
    return None, None
