"""The Airflow UI plugin: a progress page for each job, inside the Airflow UI (Airflow 3.1+).

``plugin.AntBatchPlugin`` is what Airflow loads; ``app`` serves the page and its JSON; ``links``
is the extra link from the sensor and worker tasks to the page, light enough for DAG parsing.
"""
