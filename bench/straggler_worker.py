"""One antbatch worker of the straggler job: import once, then run each phase on a common start.

Each phase (the dynamic job, then this worker's static job) starts behind a barrier: the
worker writes its ready file and waits for the phase's go file, so every worker starts at the
same instant and the makespan measures scheduling, not which process imported torch first.
"""

from __future__ import annotations

import json
import logging
import os
import sys
import time


def main() -> None:
    phases = json.loads(sys.argv[1])
    # ANTBATCH_BENCH_LOG=DEBUG logs each steal and backup (the claimer's reasons) to worker-N.log.
    logging.basicConfig(format="%(created).3f %(message)s")
    logging.getLogger("airflow_antbatch.worker").setLevel(os.environ.get("ANTBATCH_BENCH_LOG", "WARNING"))
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
        result.update(
            shards=summary.shards_committed, rows_lost=summary.rows_lost, handed_over=summary.shards_handed_over
        )
        with open(phase["result_file"] + ".tmp", "w") as handle:  # the harness polls for the file: whole or absent
            claiming = summary.claiming
            json.dump(
                {**result, "backups": claiming.get("backups", 0), "window": claiming.get("read_ahead_window")}, handle
            )
        os.replace(phase["result_file"] + ".tmp", phase["result_file"])


if __name__ == "__main__":
    main()
