"""Airflow operators of airflow-antbatch: plan, local worker, finalize."""
