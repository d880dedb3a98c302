"""JobSpec: the one contract between the Airflow side and the workers.

The planner writes it into the ledger; workers read it back by URI. It is plain JSON with a
version number, so that a worker image and an Airflow deployment of different releases can
tell when they do not speak the same language.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import types
import typing
from collections.abc import Callable, Mapping
from typing import Any

from airflow_antbatch import layout
from airflow_antbatch.errors import SpecError

SPEC_VERSION = 1
INPUT_FORMATS = ("parquet", "jsonl", "csv")
AUTOCAST_DTYPES = ("bfloat16", "float16")
# The worker's own pipeline stages: a model stage of the same name would share their timings.
RESERVED_STAGE_NAMES = ("read", "preprocess", "postprocess", "write")
# The default postprocess's column (worker/inference.py); a kept stage output may not take it.
_DEFAULT_OUTPUT_COLUMN = "prediction"
# Credentials belong in the environment (Kubernetes secrets, Airflow connections), never in a
# spec that is written into the object store next to the data.
_SECRET_OPTION_KEYS = frozenset(
    {"key", "secret", "token", "password", "aws_access_key_id", "aws_secret_access_key", "session_token"}
)


@dataclasses.dataclass(frozen=True, kw_only=True)
class ModelStage:
    """One model of a chain: its own batch size, device and threads, run as its own stage.

    ``adapter`` (``pkg.module:fn``, fn(previous_output, RecordBatch) -> model input) turns the
    previous stage's output into this stage's input; without it the output is passed as is.
    ``output_column`` keeps this stage's output as an output column.
    """

    name: str
    model: str
    batch_size: int | None = None
    device: str | None = None
    threads: int | None = None
    adapter: str | None = None
    output_column: str | None = None
    autocast_dtype: str | None = None
    compile: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_value(cls, value: object, index: int) -> ModelStage:
        if isinstance(value, ModelStage):
            _validate_stage(value, index)  # built by hand in DAG code: checked like a dict
            return value
        where = f"job spec field 'stages[{index}]'"
        if not isinstance(value, Mapping):
            raise SpecError(f"{where} must be an object with 'name' and 'model', got {value!r}")
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(value) - known)
        if unknown:
            raise SpecError(f"{where} has unknown field(s) {unknown}; known fields: {sorted(known)}")
        missing = sorted({"name", "model"} - set(value))
        if missing:
            raise SpecError(f"{where} is missing field(s) {missing}")
        stage = cls(**value)
        _validate_stage(stage, index)
        return stage


@dataclasses.dataclass(frozen=True)
class OptionDoc:
    """How a JobSpec field is offered to DAG authors and CLI users.

    The builder's and the plan operator's parameters, the CLI's flags and the docs' option
    tables are all made from these (``airflow_antbatch/options.py``), so an option is added
    by adding a field here.
    """

    help: str
    templated: bool = False  # rendered by Jinja in the plan task (URIs and import paths)
    by_hand: bool = False  # the CLI spells this flag itself (a list, a group of two, a global flag)
    aliases: tuple[str, ...] = ()  # older CLI spellings, still accepted
    minimum: int | None = None  # checked here (ints) and by the CLI's argument parser
    choices: tuple[str, ...] | None = None  # the values allowed (or None), checked here and by the CLI
    shown_default: str | None = None  # the default as the docs show it, where repr would not do
    accepts: str | None = None  # the parameter annotation, where wider than the field's type


OPTION_KEY = "antbatch_option"


def _option(default: Any = dataclasses.MISSING, *, factory: Callable[[], Any] | None = None, **doc: Any) -> Any:
    metadata = {OPTION_KEY: OptionDoc(**doc)}
    if factory is not None:
        return dataclasses.field(default_factory=factory, metadata=metadata)
    return dataclasses.field(default=default, metadata=metadata)


@dataclasses.dataclass(frozen=True, kw_only=True)
class JobSpec:
    """What to score, with which model, and where the results and the ledger live.

    Every field but ``spec_version`` is a job option: its ``OptionDoc`` says how it is offered.
    """

    input_uri: str | tuple[str, ...] = _option(
        help="a file, a directory, a glob, or a list of them (Parquet, JSONL or CSV)",
        templated=True,
        by_hand=True,
        accepts="str | Sequence[str]",
    )
    output_uri: str = _option(help="where one Parquet file per shard and `_SUCCESS` go", templated=True, by_hand=True)
    model: str | None = _option(
        None,
        help="`pkg.mod:factory` or a saved model URL (`.pt2` torch.export, `.pt` TorchScript); give it or `stages`",
        templated=True,
        by_hand=True,
    )
    stages: tuple[ModelStage, ...] = _option(
        (),
        help="a chain of models instead of `model`: dicts or `ModelStage`s, in chain order (see Model chains)",
        templated=True,
        by_hand=True,
        accepts="Sequence[Mapping[str, Any] | ModelStage]",
    )
    input_format: str | None = _option(
        None,
        help="`parquet`, `jsonl` or `csv`",
        aliases=("--format",),
        choices=INPUT_FORMATS,
        shown_default="from the file names",
    )
    preprocess: str | None = _option(
        None,
        help="`pkg.mod:fn`, fn(RecordBatch) -> model input",
        templated=True,
        shown_default="numeric columns as one float32 matrix",
    )
    postprocess: str | None = _option(
        None,
        help="`pkg.mod:fn`, fn(output, RecordBatch) -> dict of columns",
        templated=True,
        shown_default="the output as column `prediction`",
    )
    batch_size: int = _option(256, help="rows per model call", minimum=1)
    id_column: str | None = _option(None, help="an input column copied next to the predictions, to join them back")
    keep_columns: tuple[str, ...] = _option(
        (), help="more input columns copied to the output", by_hand=True, accepts="Sequence[str]"
    )
    state_uri: str | None = _option(
        None, help="where the ledger lives", templated=True, aliases=("--state",), shown_default="`OUT/_antbatch`"
    )
    lease_ttl_s: float = _option(
        60.0, help="seconds of silent heartbeat before a worker's shards are taken over", aliases=("--lease-ttl",)
    )
    max_shard_rows: int = _option(
        100_000,
        help="rows per shard at most. Parquet: counted, and cut between row groups (a bigger row group "
        "is a shard alone). JSONL and CSV: estimated from the first 64 KiB of up to 8 files spread over "
        "the listing (files that small are counted); small files are packed whole and bigger ones cut "
        "into byte ranges at line starts, so that a shard holds about this many rows and may span "
        "files; CSV whose sample holds a quoted value spanning lines is not cut",
        minimum=1,
    )
    target_shard_bytes: int = _option(
        128 * 2**20,
        help="input bytes per shard at most, cut as for `max_shard_rows`",
        minimum=1,
        shown_default="128 MiB",
    )
    max_shard_attempts: int = _option(
        3,
        help="failed tries before a shard fails for good (and the job with it)",
        minimum=1,
        aliases=("--max-attempts",),
    )
    device: str = _option("cpu", help="the torch device the models run on (a stage may set its own)")
    autocast_dtype: str | None = _option(
        None,
        help="run every model under `torch.autocast` (`bfloat16` or `float16`); a stage may set its own",
        choices=AUTOCAST_DTYPES,
    )
    compile: str | None = _option(
        None, help="`torch.compile` every model with this backend (e.g. `inductor`); a stage may set its own"
    )
    quarantine_limit: int = _option(
        10,
        help="records per shard that kill their preprocess process twice go to `OUT/_quarantine/` "
        "(listed in the manifest) instead of failing the shard; one more fails it",
        minimum=0,
    )
    # A broken hook or model fails every shard alike.
    same_error_limit: int = _option(
        5,
        help="the job stops once a worker sees the same error (type and message) on this many shards in "
        "a row with no commit between: every worker stops claiming and the run fails naming the error "
        "once, instead of trying every shard `max_shard_attempts` times",
        minimum=1,
    )
    backup_tries: bool = _option(
        True,
        help="an idle worker races a much slower worker's last shards with a backup try, and the first "
        "commit wins (docs/adr/0002-ledger-protocol.md, Backups)",
    )
    storage_options: Mapping[str, Any] = _option(
        factory=dict,
        help="fsspec options without credentials (e.g. an S3 endpoint)",
        by_hand=True,
        accepts="Mapping[str, Any] | None",
        shown_default="none",
    )
    spec_version: int = SPEC_VERSION

    def __post_init__(self) -> None:
        # Normalise list-like inputs so that a spec read back from JSON compares equal.
        if isinstance(self.input_uri, list):
            object.__setattr__(self, "input_uri", tuple(self.input_uri))
        if isinstance(self.keep_columns, list):
            object.__setattr__(self, "keep_columns", tuple(self.keep_columns))
        object.__setattr__(self, "storage_options", dict(self.storage_options or {}))
        if isinstance(self.stages, list | tuple):
            object.__setattr__(self, "stages", tuple(ModelStage.from_value(v, i) for i, v in enumerate(self.stages)))
        _validate(self)

    @property
    def model_stages(self) -> tuple[ModelStage, ...]:
        """The chain with every default filled in: one stage for ``model``, else ``stages``."""
        if not self.stages:
            assert self.model is not None  # _validate guarantees one of the two
            return (
                ModelStage(
                    name="model",
                    model=self.model,
                    batch_size=self.batch_size,
                    device=self.device,
                    autocast_dtype=self.autocast_dtype,
                    compile=self.compile,
                ),
            )
        return tuple(
            dataclasses.replace(
                stage,
                batch_size=stage.batch_size or self.batch_size,
                device=stage.device or self.device,
                autocast_dtype=stage.autocast_dtype or self.autocast_dtype,
                compile=stage.compile or self.compile,
            )
            for stage in self.stages
        )

    @property
    def state_root(self) -> str:
        """Where the ledger lives: ``state_uri``, or ``_antbatch`` beside the output."""
        return self.state_uri or layout.default_state_root(self.output_uri)

    @property
    def input_uris(self) -> tuple[str, ...]:
        return self.input_uri if isinstance(self.input_uri, tuple) else (self.input_uri,)

    def to_dict(self) -> dict[str, Any]:
        out = dataclasses.asdict(self)
        out["input_uri"] = list(self.input_uri) if isinstance(self.input_uri, tuple) else self.input_uri
        out["keep_columns"] = list(self.keep_columns)
        out["stages"] = [stage.to_dict() for stage in self.stages]
        return out

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> JobSpec:
        if not isinstance(data, Mapping):
            raise SpecError(f"job spec must be a JSON object, got {type(data).__name__}")
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise SpecError(f"unknown job spec field(s) {unknown}; known fields: {sorted(known)}")
        missing = sorted(f for f in ("input_uri", "output_uri") if f not in data)
        if missing:
            raise SpecError(f"job spec is missing required field(s) {missing}")
        version = data.get("spec_version", SPEC_VERSION)
        if version != SPEC_VERSION:
            raise SpecError(f"job spec field 'spec_version' is {version!r}; this release reads version {SPEC_VERSION}")
        return cls(**data)

    @classmethod
    def from_json(cls, text: str | bytes, *, source: str = "job spec") -> JobSpec:
        try:
            data = json.loads(text)
        except json.JSONDecodeError as exc:
            raise SpecError(f"{source} is not valid JSON: {exc}") from exc
        return cls.from_dict(data)


def _check_type(name: str, value: object, types: type | tuple[type, ...], allow_none: bool = False) -> None:
    if value is None and allow_none:
        return
    # bool is an int subclass; a spec saying batch_size=true is a mistake, not 1.
    if isinstance(value, bool) and bool not in (types if isinstance(types, tuple) else (types,)):
        raise SpecError(f"job spec field '{name}' must be {_type_name(types)}, got {value!r}")
    if not isinstance(value, types):
        raise SpecError(f"job spec field '{name}' must be {_type_name(types)}, got {value!r}")


def _type_name(types: type | tuple[type, ...]) -> str:
    seq = types if isinstance(types, tuple) else (types,)
    return " or ".join(t.__name__ for t in seq)


def _check_positive(name: str, value: float) -> None:
    if value <= 0:
        raise SpecError(f"job spec field '{name}' must be > 0, got {value!r}")


def _validate(spec: JobSpec) -> None:
    _check_type("input_uri", spec.input_uri, (str, tuple))
    if not spec.input_uris or not all(isinstance(u, str) and u for u in spec.input_uris):
        raise SpecError(f"job spec field 'input_uri' must be a non-empty URI or list of URIs, got {spec.input_uri!r}")
    for name, (kinds, allow_none) in plain_field_types().items():
        _check_type(name, getattr(spec, name), kinds, allow_none=allow_none)
    if not spec.output_uri:
        raise SpecError("job spec field 'output_uri' must not be empty")
    _validate_models(spec)
    for field in dataclasses.fields(spec):
        doc, value = field.metadata.get(OPTION_KEY), getattr(spec, field.name)
        if doc is not None and doc.minimum is not None and value < doc.minimum:
            raise SpecError(f"job spec field '{field.name}' must be >= {doc.minimum}, got {value!r}")
        if doc is not None and doc.choices is not None and value is not None and value not in doc.choices:
            raise SpecError(f"job spec field '{field.name}' must be one of {list(doc.choices)}, got {value!r}")
    _check_non_empty("compile", spec.compile)
    _check_positive("lease_ttl_s", spec.lease_ttl_s)
    _check_type("keep_columns", spec.keep_columns, tuple)
    if not all(isinstance(c, str) for c in spec.keep_columns):
        raise SpecError(f"job spec field 'keep_columns' must be a list of column names, got {spec.keep_columns!r}")
    if spec.id_column is not None and spec.id_column in spec.keep_columns:
        raise SpecError(f"job spec field 'keep_columns' repeats the id column {spec.id_column!r}")
    secrets = credential_keys(spec.storage_options)
    if secrets:
        raise SpecError(
            f"job spec field 'storage_options' holds credentials {secrets}: pass them through the "
            "environment (Kubernetes secret, Airflow connection), not the spec"
        )


@functools.cache
def plain_field_types() -> dict[str, tuple[tuple[type, ...], bool]]:
    """JobSpec's fields of plain types (str, int, float or bool, maybe None), read off their type
    hints: name -> (the types a value may have, whether it may be None). ``_validate`` checks
    them, so that a new field of such a type is checked without another line; an int will do
    for a float."""
    hints = typing.get_type_hints(JobSpec)
    found: dict[str, tuple[tuple[type, ...], bool]] = {}
    for field in dataclasses.fields(JobSpec):
        hint = hints[field.name]
        members = typing.get_args(hint) if isinstance(hint, types.UnionType) else (hint,)
        plain = tuple(m for m in members if m is not type(None))
        if plain and all(m in (str, int, float, bool) for m in plain):
            found[field.name] = ((*plain, int) if float in plain else plain, type(None) in members)
    return found


def option_doc(field: dataclasses.Field[Any]) -> OptionDoc:
    """The field's ``OptionDoc``."""
    doc: OptionDoc = field.metadata[OPTION_KEY]
    return doc


def credential_keys(storage_options: Mapping[str, Any]) -> list[str]:
    """Keys of fsspec options that hold credentials, which belong in the environment instead."""
    return sorted(_SECRET_OPTION_KEYS & set(storage_options))


def _check_autocast(where: str, value: object) -> None:
    if value is not None and value not in AUTOCAST_DTYPES:
        raise SpecError(f"{where} must be one of {list(AUTOCAST_DTYPES)} or null, got {value!r}")


def _validate_models(spec: JobSpec) -> None:
    if not isinstance(spec.stages, tuple):  # lists became tuples in __post_init__
        raise SpecError(f"job spec field 'stages' must be a list of stage objects, got {spec.stages!r}")
    if (spec.model is None) == (not spec.stages):
        raise SpecError(
            "job spec needs exactly one of 'model' (one model) or 'stages' (a chain of models), "
            f"got model={spec.model!r} and {len(spec.stages)} stage(s)"
        )
    if spec.model is not None:
        if not spec.model:
            raise SpecError("job spec field 'model' must not be empty")
    names = [stage.name for stage in spec.stages]
    repeated = sorted({n for n in names if names.count(n) > 1})
    if repeated:
        raise SpecError(f"job spec field 'stages' repeats the stage name(s) {repeated}")
    if spec.stages and spec.stages[0].adapter is not None:
        raise SpecError(
            f"job spec field 'stages[0]' ({spec.stages[0].name!r}) cannot have an adapter: "
            "the preprocess hook makes the first model's input"
        )
    columns = [s.output_column for s in spec.stages if s.output_column]
    taken = {spec.id_column, *spec.keep_columns, *([] if spec.postprocess else [_DEFAULT_OUTPUT_COLUMN])}
    clash = sorted({c for c in columns if columns.count(c) > 1 or c in taken})
    if clash:
        raise SpecError(
            f"job spec field 'stages' keeps output column(s) {clash} twice or over an id/keep column "
            f"or the default postprocess's {_DEFAULT_OUTPUT_COLUMN!r}"
        )


def _validate_stage(stage: ModelStage, index: int) -> None:
    field = f"stages[{index}]"
    for name in ("name", "model"):
        _check_type(f"{field}.{name}", getattr(stage, name), str)
    if not stage.name.isidentifier() or stage.name in RESERVED_STAGE_NAMES:
        raise SpecError(
            f"job spec field '{field}.name' must be an identifier (letters, digits, _) other than "
            f"{list(RESERVED_STAGE_NAMES)}, got {stage.name!r}"
        )
    if not stage.model:
        raise SpecError(f"job spec field '{field}.model' must not be empty")
    for name in ("batch_size", "threads"):
        value = getattr(stage, name)
        _check_type(f"{field}.{name}", value, int, allow_none=True)
        if value is not None:
            _check_positive(f"{field}.{name}", value)
    for name in ("device", "adapter", "output_column", "autocast_dtype", "compile"):
        _check_type(f"{field}.{name}", getattr(stage, name), str, allow_none=True)
        _check_non_empty(f"{field}.{name}", getattr(stage, name))  # "" would silently mean "unset"
    _check_autocast(f"job spec field '{field}.autocast_dtype'", stage.autocast_dtype)


def _check_non_empty(name: str, value: str | None) -> None:
    if value == "":
        raise SpecError(f"job spec field '{name}' must not be empty (leave it out instead)")
