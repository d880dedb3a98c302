"""The filesystem that reads many small S3 objects at once: obstore where it can, else s3fs.

Merging small files is bound by the client's CPU long before the store's latency: s3fs
(aiobotocore) spends 3-5 ms of Python per GET, so one process tops out near 250 objects/s
whatever the concurrency. obstore (Rust's object_store behind fsspec's async interface,
``obstore.fsspec.FsspecStore``) spends about 0.6 ms, which lets the reads run near the
latency-bound limit. Only reading uses it; listing and every write (with its create-if-absent)
stay on s3fs through ``AtomicStore``.

obstore is used only where s3fs's options translate exactly (endpoint, region, anonymous,
explicit keys) and the credentials come from where object_store looks too (the ``AWS_*``
environment, web identity, the instance or container metadata). A named profile or a shared
credentials file is botocore's alone, so it keeps s3fs. Before the merge trusts obstore, one
object is read with it; if that fails for any reason but a missing object (a bucket in another
region, credentials object_store cannot find), the merge reads with s3fs and says why.
"""

from __future__ import annotations

import logging
import os
from typing import TYPE_CHECKING, Any, Literal, cast

import fsspec
import fsspec.asyn

from airflow_antbatch.errors import MergeError
from airflow_antbatch.store import with_connection_pool

if TYPE_CHECKING:
    from obstore.store import ClientConfig, S3Config

log = logging.getLogger(__name__)

Reader = Literal["auto", "obstore", "s3fs"]
READERS: tuple[Reader, ...] = ("auto", "obstore", "s3fs")
_S3_SCHEMES = frozenset({"s3", "s3a"})
# s3fs client_kwargs that have an exact object_store equivalent.
_CLIENT_KWARGS = {"endpoint_url": "endpoint", "region_name": "region"}
_TOP_LEVEL = {
    "endpoint_url": "endpoint",
    "key": "access_key_id",
    "secret": "secret_access_key",
    "token": "session_token",
}
# botocore settings that only size its own connection pool (object_store's is unbounded).
_POOL_ONLY_CONFIG = frozenset({"max_pool_connections"})
# Where only botocore finds credentials.
_BOTOCORE_ONLY_ENV = ("AWS_PROFILE", "AWS_DEFAULT_PROFILE", "AWS_SHARED_CREDENTIALS_FILE", "AWS_CONFIG_FILE")


def obstore_config(options: dict[str, Any]) -> dict[str, Any] | None:
    """object_store's S3 config for these s3fs options, or None where one has no exact match."""
    config: dict[str, Any] = {}
    for key, value in options.items():
        if key in _TOP_LEVEL:
            config[_TOP_LEVEL[key]] = value
        elif key == "anon":
            config["skip_signature"] = bool(value)
        elif key == "client_kwargs":
            if set(value) - set(_CLIENT_KWARGS):
                return None
            config.update({_CLIENT_KWARGS[k]: v for k, v in value.items()})
        elif key == "config_kwargs":
            if set(value) - _POOL_ONLY_CONFIG:
                return None
        else:
            return None
    return config


def _botocore_only_credentials() -> str | None:
    named = [name for name in _BOTOCORE_ONLY_ENV if os.environ.get(name)]
    if named:
        return f"{named[0]} is set"
    if "AWS_ACCESS_KEY_ID" not in os.environ and os.path.exists(os.path.expanduser("~/.aws/credentials")):
        return "credentials come from ~/.aws/credentials"
    return None


def obstore_filesystem(url: str, options: dict[str, Any]) -> tuple[fsspec.asyn.AsyncFileSystem | None, str]:
    """obstore's async fsspec filesystem for ``url``'s store, or None and why it does not apply."""
    scheme = url.split("://", 1)[0] if "://" in url else "file"
    if scheme not in _S3_SCHEMES:
        return None, f"{scheme}:// is not S3"
    config = obstore_config(options)
    if config is None:
        return None, f"storage options {sorted(options)} have no exact obstore equivalent"
    why = _botocore_only_credentials()
    if why:
        return None, why
    try:
        from obstore.fsspec import FsspecStore
    except ImportError:
        return None, "obstore is not installed (pip install 'airflow-antbatch[s3]')"
    endpoint = str(config.get("endpoint") or os.environ.get("AWS_ENDPOINT_URL") or "")
    client_options: ClientConfig = {"allow_http": endpoint.startswith("http://")}
    return FsspecStore("s3", config=cast("S3Config", config), client_options=client_options), "obstore"


def reader_filesystem(
    url: str, options: dict[str, Any], concurrency: int, *, reader: Reader = "auto", probe: str | None = None
) -> tuple[fsspec.AbstractFileSystem, str]:
    """The filesystem to read ``url``'s objects with, and its name.

    ``auto`` takes obstore where it applies and ``probe`` (one object's URL) reads with it;
    ``obstore`` insists (and fails where it does not apply); ``s3fs`` is plain fsspec.
    """
    if reader not in READERS:
        raise MergeError(f"reader must be one of {list(READERS)}, got {reader!r}")
    if reader != "s3fs":
        fast, why = obstore_filesystem(url, options)
        if fast is None and reader == "obstore":
            raise MergeError(f"reader='obstore' cannot read {url}: {why}")
        if fast is not None and (reader == "obstore" or probe is None or _reads(fast, probe)):
            return fast, "obstore"
        if fast is None:
            log.info("reading with s3fs: %s", why)
    fs, _ = fsspec.core.url_to_fs(url, **with_connection_pool(url, options, concurrency))
    return fs, fs.protocol if isinstance(fs.protocol, str) else fs.protocol[0]


def _reads(fs: fsspec.AbstractFileSystem, url: str) -> bool:
    """Whether ``fs`` can read the object at ``url`` (a missing object says nothing against it)."""
    try:
        fs.cat_file(url)
    except FileNotFoundError:
        return True
    except Exception as exc:
        log.warning("obstore could not read %s (%r); reading with s3fs instead", url, exc)
        return False
    return True
