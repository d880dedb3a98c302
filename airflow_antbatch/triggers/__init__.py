"""Airflow triggers of airflow-antbatch: the shard-ledger trigger behind the deferrable sensor."""
