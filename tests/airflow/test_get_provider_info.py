"""Provider metadata: discoverable, valid against Airflow's schema, and every module it names imports."""

from __future__ import annotations

import importlib
import importlib.metadata
import inspect
import json
import pathlib

import airflow
import jsonschema  # type: ignore[import-untyped]
from airflow.sdk import BaseOperator

from airflow_antbatch.get_provider_info import get_provider_info


def test_package_name_is_the_installed_distribution() -> None:
    info = get_provider_info()
    assert set(importlib.metadata.packages_distributions()["airflow_antbatch"]) == {info["package-name"]}
    assert info["versions"][0] == importlib.metadata.version(info["package-name"])


def test_the_entry_point_returns_it() -> None:
    [entry] = [
        e
        for e in importlib.metadata.entry_points(group="apache_airflow_provider")
        if e.dist is not None and e.dist.name == "airflow-antbatch"
    ]
    assert entry.load() is get_provider_info


def test_it_is_valid_against_airflows_provider_info_schema() -> None:
    schema = json.loads((pathlib.Path(airflow.__file__).parent / "provider_info.schema.json").read_text())
    jsonschema.validate(get_provider_info(), schema)


def test_every_module_it_names_imports_and_defines_an_operator() -> None:
    info = get_provider_info()
    modules = [m for key in ("operators", "sensors") for entry in info[key] for m in entry["python-modules"]]
    assert modules
    for name in modules:
        module = importlib.import_module(name)
        classes = [
            obj
            for obj in vars(module).values()
            if inspect.isclass(obj) and issubclass(obj, BaseOperator) and obj.__module__ == name
        ]
        assert classes, f"{name} defines no operator or sensor"
    integrations = {i["integration-name"] for i in info["integrations"]}
    assert {e["integration-name"] for key in ("operators", "sensors") for e in info[key]} <= integrations


def test_airflow_discovers_the_provider() -> None:
    from airflow.providers_manager import ProvidersManager

    provider = ProvidersManager().providers["airflow-antbatch"]  # type: ignore[no-untyped-call]
    assert provider.data["name"] == "AntBatch"
