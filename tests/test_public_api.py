"""The package's public surface: explicit, sorted, and every name importable."""

from __future__ import annotations

import airflow_antbatch


def test_all_is_sorted_and_importable() -> None:
    assert airflow_antbatch.__all__ == sorted(airflow_antbatch.__all__)
    for name in airflow_antbatch.__all__:
        assert getattr(airflow_antbatch, name) is not None


def test_every_error_derives_from_the_root() -> None:
    errors = [getattr(airflow_antbatch, n) for n in airflow_antbatch.__all__ if n.endswith("Error")]
    assert all(issubclass(e, airflow_antbatch.AntBatchError) for e in errors)
