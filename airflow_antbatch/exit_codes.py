"""Exit codes of ``antbatch`` commands, shared by the CLI and the launchers that read them."""

from __future__ import annotations

OK = 0
ERROR = 1  # a clear error was printed (bad input, bad spec, user code failed to load, ...)
USAGE = 2  # argparse's code for a bad command line
SHARDS_FAILED = 3  # the worker finished, but some shards failed for good
PREEMPTED = 75  # EX_TEMPFAIL: SIGTERM; shards in hand were released, rerun to continue
