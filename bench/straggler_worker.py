"""One antbatch worker of the straggler job: import once, then run each phase on a common start.

Each phase (the dynamic job, then this worker's static job) starts behind a barrier: the
worker writes its ready file and waits for the phase's go file, so every worker starts at the
same instant and the makespan measures scheduling, not which process imported torch first.
"""

from __future__ import annotations

import json
import os
import sys
import time


def main() -> None:
    phases = json.loads(sys.argv[1])
    import torch  # noqa: F401

    import bench.workloads  # noqa: F401
    from airflow_antbatch.worker.run import run_worker
    from bench.systems.antbatch import worker_kwargs

    for phase in phases:
        with open(phase["ready_file"], "w") as handle:
            handle.write(str(os.getpid()))
        while not os.path.exists(phase["go_file"]):
            time.sleep(0.005)
        started = time.time()
        summary = run_worker(
            phase["plan_uri"],
            phase["worker_id"],
            torch_threads=1,
            **worker_kwargs(cpu_budget=1, preprocess_workers=0),
        )
        result = {"started": started, "ended": time.time(), "rows": summary.rows_committed}
        result.update(shards=summary.shards_committed, rows_lost=summary.rows_lost)
        with open(phase["result_file"], "w") as handle:
            json.dump({**result, "backups": summary.claiming.get("backups", 0)}, handle)


if __name__ == "__main__":
    main()
