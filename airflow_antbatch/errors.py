"""One exception tree for the whole package.

Callers catch ``AntBatchError`` for anything this package raises on purpose; subclasses also
derive from the builtin whose meaning they share, so ``except ValueError`` keeps working::

    AntBatchError
    ├── SpecError (ValueError)                 a JobSpec field is unknown or invalid
    ├── InputError (ValueError)                input cannot be listed, read or parsed
    │   └── InputNotFoundError (FileNotFoundError)
    ├── PlanConflictError                      a plan exists for other input under this state root
    ├── StoreError (OSError)                   the object store failed or misbehaved
    │   └── UnsupportedStoreError              no atomic create-if-absent on this store
    ├── LedgerCorruptError                     a ledger file is malformed or foreign
    ├── UserCodeError                          a model/preprocess/postprocess import path or call failed
    ├── ShardError                             one shard could not be processed
    ├── WorkerError                            the worker's own machinery failed (preprocess processes)
    ├── MergeError                             a small-file merge cannot go on (plan changed, too many unreadable)
    └── JobIncompleteError                     finalize/sensor: shards not committed (or failed)

Foreign errors (fsspec, botocore, torch) are translated at the boundary with ``raise ... from``,
and every message names the file, shard or parameter it is about.
"""

from __future__ import annotations


class AntBatchError(Exception):
    """Root of every error raised on purpose by airflow-antbatch."""


class SpecError(AntBatchError, ValueError):
    """A JobSpec field is unknown, missing or invalid; the message names the field."""


class InputError(AntBatchError, ValueError):
    """The job's input cannot be listed, read or parsed; the message names the file."""


class InputNotFoundError(InputError, FileNotFoundError):
    """The input URI matches nothing."""


class PlanConflictError(AntBatchError):
    """A plan already exists under this state root for different input or job settings."""


class StoreError(AntBatchError, OSError):
    """The object store failed or answered in a way the ledger cannot trust."""


class UnsupportedStoreError(StoreError):
    """The store has no atomic create-if-absent, so exactly-once cannot be promised."""


class LedgerCorruptError(AntBatchError):
    """A file inside the ledger is malformed or was not written by airflow-antbatch."""


class UserCodeError(AntBatchError):
    """User code (model factory, preprocess or postprocess hook) failed to import or run."""


class ShardError(AntBatchError):
    """Processing one shard failed; the message names the shard and the cause."""


class WorkerError(AntBatchError):
    """The worker cannot go on for a reason that is not one shard's: e.g. its processes cannot start."""


class MergeError(AntBatchError):
    """A small-file merge cannot go on: its plan is for other objects, or too many are unreadable."""


class JobIncompleteError(AntBatchError):
    """Not every shard is committed: some are pending or failed for good."""
