"""Which filesystem reads a merge's objects: obstore where s3fs's options translate exactly."""

from __future__ import annotations

import datetime
import pathlib
from typing import Any

import fsspec
import pytest
from obstore.fsspec import FsspecStore

from airflow_antbatch import MergeError
from airflow_antbatch.object_reader import _reads, obstore_config, obstore_filesystem, reader_filesystem
from tests.s3_servers import StoreLocation

ENDPOINT = "http://127.0.0.1:8333"


@pytest.mark.parametrize(
    ("options", "config"),
    [
        ({}, {}),
        ({"client_kwargs": {"endpoint_url": ENDPOINT}}, {"endpoint": ENDPOINT}),
        ({"client_kwargs": {"region_name": "eu-west-1"}}, {"region": "eu-west-1"}),
        ({"endpoint_url": ENDPOINT, "anon": True}, {"endpoint": ENDPOINT, "skip_signature": True}),
        (
            {"key": "k", "secret": "s", "token": "t"},
            {"access_key_id": "k", "secret_access_key": "s", "session_token": "t"},
        ),
        ({"config_kwargs": {"max_pool_connections": 64}}, {}),
    ],
)
def test_s3fs_options_with_an_exact_equivalent_translate(options: dict[str, Any], config: dict[str, Any]) -> None:
    assert obstore_config(options) == config


@pytest.mark.parametrize(
    "options",
    [
        {"requester_pays": True},
        {"client_kwargs": {"verify": False}},
        {"config_kwargs": {"s3": {"addressing_style": "virtual"}}},
        {"profile": "prod"},
    ],
)
def test_options_only_s3fs_understands_keep_s3fs(options: dict[str, Any]) -> None:
    fs, why = obstore_filesystem("s3://bucket/prefix", options)
    assert fs is None and str(sorted(options)) in why
    with pytest.raises(MergeError, match=r"reader='obstore' cannot read s3://bucket/prefix"):
        reader_filesystem("s3://bucket/prefix", options, 8, reader="obstore")
    fs, name = reader_filesystem("s3://bucket/prefix", options, 8)
    assert name == "s3"


def test_a_named_profile_keeps_s3fs(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("AWS_PROFILE", "nightly")
    assert obstore_filesystem("s3://bucket/prefix", {}) == (None, "AWS_PROFILE is set")


def test_local_files_read_with_fsspec(tmp_path: pathlib.Path) -> None:
    fs, name = reader_filesystem(str(tmp_path), {}, 8)
    assert name == "file" and isinstance(fs, fsspec.implementations.local.LocalFileSystem)


def test_an_unknown_reader_is_refused() -> None:
    with pytest.raises(MergeError, match="reader must be one of"):
        reader_filesystem("s3://bucket/prefix", {}, 8, reader="boto")  # type: ignore[arg-type]


@pytest.mark.slow
def test_the_probe_trusts_obstore_only_where_it_reads(seaweedfs_location: StoreLocation) -> None:
    options = seaweedfs_location.storage_options
    url = f"{seaweedfs_location.url}/probe.bin"
    fsspec.filesystem("s3", skip_instance_cache=True, **options).pipe_file(url, b"x" * 100)
    fs, name = reader_filesystem(url, options, 8, probe=url)
    assert name == "obstore" and fs.cat_file(url) == b"x" * 100
    assert _reads(fs, f"{seaweedfs_location.url}/never-written.bin")  # missing says nothing against it
    # A store that cannot be reached (here: nothing listens) fails the probe at once.
    dead = FsspecStore(
        "s3",
        config={"endpoint": "http://127.0.0.1:9"},
        client_options={"allow_http": True},
        retry_config={"max_retries": 0, "retry_timeout": datetime.timedelta(seconds=1)},
    )
    assert not _reads(dead, url)
