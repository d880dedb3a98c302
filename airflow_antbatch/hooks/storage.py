"""A job's Airflow connection, turned into fsspec options for the tasks that run in Airflow.

A job names its connection with ``conn_id``, or inside its URIs the way Airflow's
``ObjectStoragePath`` does: ``s3://lake_s3@bucket/key`` is ``s3://bucket/key`` reached through
connection ``lake_s3``. Only the Airflow side resolves it: plan, merge, the ledger sensor and
trigger (in the triggerer, from the connection's name: a trigger's kwargs are persisted, so
they never hold a secret), finalize, and the UI page. What reaches the workers (the plan's job
spec, a pod's arguments, a local worker's command line) holds the URIs without the connection
and no secret: workers authenticate as documented in docs/kubernetes.md (workload identity or a
Kubernetes secret as environment), the local launcher's subprocesses with the Airflow worker's
environment.

Resolution, in this order:

1. the connection is looked up (a missing one is an error, never a silent fall back to the
   environment's credentials);
2. if an installed provider registers an Airflow filesystem for the URI's scheme
   (apache-airflow-providers-amazon for ``s3``, -google for ``gs``, -microsoft-azure for
   ``abfs``, which adlfs's ``az`` maps to), the options are those its ``get_fs(conn_id)``
   builds through the provider's hook: what ``ObjectStoragePath`` would use;
3. otherwise they come from the connection's own fields (:func:`options_from_fields`; the
   table is in docs/user-guide.md).

The job's explicit ``storage_options`` win over the connection's, as in ``ObjectStoragePath``.

A process reuses what it resolved for ``OPTIONS_TTL_S``: fsspec keeps every filesystem it
builds, by its options, for the life of the process (and a provider's ``get_fs`` builds one per
call), so the API server and the triggerer, which resolve again and again, would otherwise grow
without bound. One options dict also means one client per store. A connection changed in
Airflow takes effect within that time.
"""

from __future__ import annotations

import json
import threading
import time
from typing import TYPE_CHECKING, Any

from airflow_antbatch.version_compat import BaseHook, get_fs, has_fs

if TYPE_CHECKING:
    from collections.abc import Mapping

S3_SCHEMES = frozenset({"s3", "s3a", "s3n"})
GCS_SCHEMES = frozenset({"gs", "gcs"})
AZURE_SCHEMES = frozenset({"az", "abfs", "abfss", "adl"})
# adlfs's own scheme for Blob Storage; the microsoft-azure provider registers the abfs family.
_AIRFLOW_FS_SCHEME = {"az": "abfs"}
# Azure's full URLs carry the container where a connection would be: abfs://container@account.dfs...
_AZURE_HOST_SUFFIX = ".core.windows.net"
OPTIONS_TTL_S = 600.0
_resolved: dict[tuple[str, str], tuple[float, dict[str, Any]]] = {}  # (conn_id, scheme) -> (when, options)
_resolved_lock = threading.Lock()


def split_conn_id(uri: str) -> tuple[str, str | None]:
    """``uri`` without its connection, and the connection: ``s3://c@b/k`` gives ``("s3://b/k", "c")``."""
    scheme, sep, rest = uri.partition("://")
    netloc, slash, path = rest.partition("/")
    userinfo, at, host = netloc.rpartition("@")
    if not (sep and at) or (scheme in AZURE_SCHEMES and host.endswith(_AZURE_HOST_SUFFIX)):
        return uri, None
    if not userinfo or ":" in userinfo:
        raise ValueError(
            f"{uri!r}: the part before '@' must be an Airflow connection id (s3://conn_id@bucket/key); "
            "credentials belong in the connection, not in the URI"
        )
    return f"{scheme}://{host}{slash}{path}", userinfo


def join_conn_id(uri: str, conn_id: str | None) -> str:
    """``uri`` naming ``conn_id`` (the inverse of :func:`split_conn_id`); a local path stays as it is."""
    scheme, sep, rest = uri.partition("://")
    if conn_id is None or not sep or scheme == "file":
        return uri
    return f"{scheme}://{conn_id}@{rest}"


def job_connection(conn_id: str | None, uris: Mapping[str, str | None]) -> tuple[str | None, dict[str, str | None]]:
    """A job's one connection and its URIs without it; ``uris`` maps each parameter's name to its URI.

    A job reads and writes through one connection: a URI that names another than ``conn_id``
    (or than another URI) is refused, naming the parameter.
    """
    found = conn_id
    plain: dict[str, str | None] = {}
    for name, uri in uris.items():
        if uri is None:
            plain[name] = None
            continue
        plain[name], named = split_conn_id(uri)
        if named is not None and found is not None and named != found:
            raise ValueError(
                f"{name} {uri!r} names connection {named!r} but the job's is {found!r}: "
                "a job reads and writes through one connection"
            )
        found = found or named
    return found, plain


def reach(
    uri: str, conn_id: str | None = None, base: Mapping[str, Any] | None = None, *, name: str = "plan_uri"
) -> tuple[str, dict[str, Any]]:
    """``uri`` without its connection, and the options that reach it through ``conn_id`` or the one it names."""
    conn_id, plain = job_connection(conn_id, {name: uri})
    url = str(plain[name])
    return url, storage_options(conn_id, url, base)


def storage_options(conn_id: str | None, url: str, base: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """fsspec options for ``url`` through ``conn_id`` (None: ``base`` alone), ``base`` winning."""
    if conn_id is None:
        return dict(base or {})
    return {**connection_options(conn_id, url), **(base or {})}


def connection_options(conn_id: str, url: str) -> dict[str, Any]:
    """The connection's fsspec options for ``url``'s scheme: through the provider when installed
    (the same dict again within ``OPTIONS_TTL_S``)."""
    scheme = url.partition("://")[0] if "://" in url else "file"
    key, now = (conn_id, scheme), time.monotonic()
    with _resolved_lock:
        when, options = _resolved.get(key, (-OPTIONS_TTL_S, {}))
    if now - when >= OPTIONS_TTL_S:
        conn = BaseHook.get_connection(conn_id)  # raises, naming conn_id, when it is not defined
        fs_scheme = _AIRFLOW_FS_SCHEME.get(scheme, scheme)
        if has_fs(fs_scheme):
            options = dict(get_fs(fs_scheme, conn_id).storage_options)
        else:
            options = options_from_fields(scheme, conn.login, conn.password, conn.extra_dejson)
        with _resolved_lock:
            _resolved[key] = (now, options)
    return dict(options)


def options_from_fields(
    scheme: str, login: str | None, password: str | None, extra: Mapping[str, Any]
) -> dict[str, Any]:
    """fsspec options from a connection's fields, for stores whose provider is not installed.

    - s3: login and password are the access key and secret; extra ``aws_session_token``,
      ``endpoint_url`` and ``region_name`` (the amazon provider's names);
    - gs: extra ``keyfile_dict`` (a service account's JSON) or ``key_path`` (its file) as the
      token, ``project``, ``endpoint_url``;
    - az/abfs: login and password are the account name and key; extra ``connection_string``,
      ``sas_token``, ``account_host``;
    - any scheme: extra ``storage_options``, a JSON object of fsspec options, goes on top.
    """
    options: dict[str, Any] = {}
    if scheme in S3_SCHEMES:
        options = {"key": login, "secret": password, "token": extra.get("aws_session_token")}
        options["endpoint_url"] = extra.get("endpoint_url")
        if extra.get("region_name"):
            options["client_kwargs"] = {"region_name": extra["region_name"]}
    elif scheme in GCS_SCHEMES:
        keyfile = extra.get("keyfile_dict")
        token = json.loads(keyfile) if isinstance(keyfile, str) else keyfile
        options = {"token": token or extra.get("key_path"), "project": extra.get("project")}
        options["endpoint_url"] = extra.get("endpoint_url")
    elif scheme in AZURE_SCHEMES:
        options = {"account_name": login, "account_key": password}
        options.update({k: extra.get(k) for k in ("connection_string", "sas_token", "account_host")})
    options = {k: v for k, v in options.items() if v not in (None, "")}
    options.update(extra.get("storage_options") or {})
    return options
