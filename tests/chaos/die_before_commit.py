"""``antbatch worker`` that kills its whole process group between writing a shard and committing it.

Usage: ``python -m tests.chaos.die_before_commit NTH MARKER -- <antbatch arguments>``. The worker
runs unchanged until the NTH shard it finishes: its try's own output file has been put, then,
where the loop would run the fencing read before the commit, the wrapper records whether that
file is durable in MARKER and sends SIGKILL to its process group (a pod dying there). The fault
lives here, not in the product.
"""

from __future__ import annotations

import itertools
import json
import os
import pathlib
import runpy
import signal
import sys

from airflow_antbatch import layout
from airflow_antbatch.ledger import Lease, Ledger
from airflow_antbatch.store import AtomicStore


def arm(nth: int, marker: pathlib.Path) -> None:
    """Patch the fencing read, the step between the durable output and the commit."""
    holds = Ledger.holds
    calls = itertools.count(1)

    def die_on_nth(self: Ledger, lease: Lease) -> bool:
        if next(calls) == nth:
            spec = self.plan.spec
            output = AtomicStore(spec.output_uri, dict(spec.storage_options))
            file = layout.output_name(self.plan.attempt, lease.shard_id, lease.epoch)
            durable = output.read(file) is not None
            record = {
                "shard": lease.shard_id,
                "epoch": lease.epoch,
                "file": file,
                "output_durable": durable,
                "pid": os.getpid(),
            }
            marker.write_text(json.dumps(record))
            os.killpg(os.getpgid(0), signal.SIGKILL)
        return holds(self, lease)

    Ledger.holds = die_on_nth  # type: ignore[method-assign]


def main(argv: list[str]) -> None:
    nth, marker, sep, *rest = argv
    if sep != "--":
        raise SystemExit("usage: python -m tests.chaos.die_before_commit NTH MARKER -- <antbatch arguments>")
    arm(int(nth), pathlib.Path(marker))
    sys.argv = ["antbatch", *rest]
    runpy.run_module("airflow_antbatch", run_name="__main__", alter_sys=True)


if __name__ == "__main__":
    main(sys.argv[1:])
