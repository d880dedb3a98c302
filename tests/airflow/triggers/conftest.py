"""The trigger tests wait on the same planned ledger (3 shards, 2 tries each) as the sensor's."""

from tests.airflow.sensors.test_ledger import ledger  # noqa: F401
