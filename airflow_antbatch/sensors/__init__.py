"""Airflow sensors of airflow-antbatch: the shard-ledger sensor."""
