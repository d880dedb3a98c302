"""Job options, defined once on JobSpec's fields, offered as parameters, CLI flags and doc rows.

The builder (``elastic_batch_inference``) and the plan operator take the job options as
keyword arguments: ``with_job_options`` gives them a signature that lists every option with
its annotation and default, for ``help()``, IDEs that read ``inspect.signature`` and Airflow's
own introspection; ``resolve`` checks the names (a typo is a TypeError naming the options)
and fills the defaults, and ``JobSpec`` checks the values when the DAG is parsed. The CLI's
flags come from ``add_flags``/``from_args``, and the docs' tables from ``table``.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import inspect
from typing import TYPE_CHECKING, Any, TypeVar

from airflow_antbatch.spec import (
    OPTION_KEY,
    JobSpec,
    OptionDoc,
    option_doc,
    plain_field_types,
)

if TYPE_CHECKING:
    from collections.abc import Callable, Mapping

F = TypeVar("F", bound="Callable[..., Any]")


@dataclasses.dataclass(frozen=True)
class JobOption:
    """One JobSpec field as an option: its name, default, type and ``OptionDoc``."""

    name: str
    default: Any  # inspect.Parameter.empty when required
    kind: type  # int, float, bool, str, or object for structured fields
    annotation: str
    doc: OptionDoc

    @property
    def required(self) -> bool:
        return self.default is inspect.Parameter.empty

    @property
    def flags(self) -> tuple[str, ...]:
        """The CLI spellings: ``--the-name`` first, then older ones; none when spelt by hand."""
        return () if self.doc.by_hand else ("--" + self.name.replace("_", "-"), *self.doc.aliases)

    def shown_default(self) -> str:
        return shown_default(self.default, self.doc)


def shown_default(default: Any, doc: OptionDoc) -> str:
    """A default as the docs' tables and the CLI's help show it."""
    if doc.shown_default is not None:
        return doc.shown_default
    if default is inspect.Parameter.empty:
        return "required"
    if default is None:
        return "none"
    if isinstance(default, str):
        return f'`"{default}"`'
    if isinstance(default, int) and not isinstance(default, bool):
        return f"`{default:,}`"
    return f"`{default!r}`"


@functools.cache
def job_options() -> tuple[JobOption, ...]:
    """Every option, in JobSpec's field order."""
    plain = plain_field_types()
    found = []
    for field in dataclasses.fields(JobSpec):
        if OPTION_KEY not in field.metadata:
            continue
        if field.default is not dataclasses.MISSING:
            default: Any = field.default
        elif field.default_factory is not dataclasses.MISSING:
            default = field.default_factory()
        else:
            default = inspect.Parameter.empty
        doc = option_doc(field)
        kind = plain[field.name][0][0] if field.name in plain else object
        found.append(JobOption(field.name, default, kind, doc.accepts or str(field.type), doc))
    return tuple(found)


def templated() -> tuple[str, ...]:
    """The options that Jinja renders in the plan task."""
    return tuple(o.name for o in job_options() if o.doc.templated)


# -- parameters ------------------------------------------------------------------------------


def with_job_options(func: F) -> F:
    """Give ``func``, which takes the job options as ``**job``, a signature that lists them.

    The options come after ``func``'s positional parameters and before its own keyword-only
    ones. Its ``**job`` is left out, since ``resolve`` refuses anything else; an operator's
    ``**kwargs`` (BaseOperator's arguments) stays.
    """
    signature = inspect.signature(func)
    params = list(signature.parameters.values())
    head = [p for p in params if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    tail = [p for p in params if p.kind is p.KEYWORD_ONLY or (p.kind is p.VAR_KEYWORD and p.name == "kwargs")]
    options = [
        inspect.Parameter(o.name, inspect.Parameter.KEYWORD_ONLY, default=o.default, annotation=o.annotation)
        for o in job_options()
    ]
    func.__signature__ = signature.replace(parameters=[*head, *options, *tail])  # type: ignore[attr-defined]
    return func


def resolve(job: Mapping[str, Any], where: str) -> dict[str, Any]:
    """Every option's value: those given, the defaults for the others; ``where`` names the caller.

    Unknown names and missing required options are a TypeError, as for any Python call.
    """
    known = {o.name: o for o in job_options()}
    unknown = sorted(set(job) - set(known))
    if unknown:
        raise TypeError(f"{where}() got unexpected keyword argument(s) {unknown}; job options: {sorted(known)}")
    missing = [o.name for o in known.values() if o.required and o.name not in job]
    if missing:
        raise TypeError(f"{where}() missing required keyword argument(s) {missing}")
    return {name: job[name] if name in job else option.default for name, option in known.items()}


# -- CLI flags -------------------------------------------------------------------------------


def add_flags(parser: argparse.ArgumentParser) -> None:
    """A flag for every option that the CLI does not spell by hand (``OptionDoc.by_hand``)."""
    for option in job_options():
        if not option.flags:
            continue
        kwargs: dict[str, Any] = {"dest": option.name, "default": option.default, "help": _flag_help(option)}
        if option.kind is bool:
            kwargs["action"] = argparse.BooleanOptionalAction
        else:
            minimum = option.doc.minimum
            kwargs["type"] = count_at_least(minimum) if minimum is not None else option.kind
            kwargs["choices"] = option.doc.choices
        parser.add_argument(*option.flags, **kwargs)


def from_args(args: argparse.Namespace) -> dict[str, Any]:
    """The values of the flags ``add_flags`` made."""
    return {o.name: getattr(args, o.name) for o in job_options() if o.flags}


def flag_help(name: str) -> str:
    """An option's help, for a flag the CLI spells by hand."""
    return _plain(next(o for o in job_options() if o.name == name).doc.help)


def _flag_help(option: JobOption) -> str:
    return f"{_plain(option.doc.help)} (default: {_plain(option.shown_default())})"


def _plain(markdown: str) -> str:
    """Help text for a terminal: no backquotes, and % doubled (argparse formats help with %)."""
    return markdown.replace("`", "").replace("%", "%%")


def count_at_least(minimum: int) -> Callable[[str], int]:
    """An argparse type: an integer >= ``minimum``, so a bad count fails before any work starts."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"must be >= {minimum}, got {value}")
        return value

    return parse


# -- docs ------------------------------------------------------------------------------------


def table(extra: Mapping[str, tuple[Any, OptionDoc]]) -> str:
    """The Markdown table of every job option, then ``extra`` (name -> (default, doc): the
    builder's own options)."""
    lines = ["| option | default | meaning |", "|---|---|---|"]
    lines += [f"| `{o.name}` | {o.shown_default()} | {o.doc.help} |" for o in job_options()]
    lines += [f"| `{name}` | {shown_default(default, doc)} | {doc.help} |" for name, (default, doc) in extra.items()]
    return "\n".join(lines) + "\n"
