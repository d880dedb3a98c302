"""The worker side: pulls shards from the ledger and scores them. Imports no Airflow."""
