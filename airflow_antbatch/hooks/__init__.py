"""Airflow connections for the tasks that run in Airflow (plan, merge, sensor, trigger, finalize, UI)."""
