import os

# Before torch loads: OpenMP threads that spin while they wait steal the cores that the
# preprocess processes need (docs/operations.md, "Performance notes"); waiting passively costs little.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

from airflow_antbatch.cli import main  # noqa: E402

raise SystemExit(main())
