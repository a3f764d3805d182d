"""Options declared once: a dataclass field carries its default, help text and limits.

Every option of lastlayer (the command-line flags, the config objects of the Python API, the job
options file) is a field made by :func:`option`. Its ``metadata`` holds an :class:`OptionInfo`:
the help text, limits (``minimum``, ``above``, ``maximum``, ``below``, ``choices``, ``finite``, ``nonempty``),
values accepted whatever the limits say (``special``, e.g. ``-1`` for "all"), aliases, and an
``unsupported`` note for options that are accepted only to say what to use instead. :func:`problem`
checks a value against its field, :func:`check` an object of options (its fields, then the rules
between them) as flags, and a :class:`Checked` dataclass checks itself when it is made;
:func:`closest` gives the "did you mean" hint for an unknown name. How a problem is shown
(``--flag=value: ...`` or ``worker.count: ..., got -1``) is the caller's choice.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
from collections.abc import Iterable, Iterator
from dataclasses import MISSING, dataclass
from typing import Any, get_type_hints

from lastlayer.errors import UsageError

#: The log levels retrain.py's ``--logging_verbosity`` and the options file's ``log_level`` take.
LOG_LEVELS = ("DEBUG", "INFO", "WARN", "WARNING", "ERROR", "FATAL")


@dataclass(frozen=True)
class OptionInfo:
    """What a field declares besides its type and default.

    Attributes:
        doc: one or two sentences of help.
        minimum, above, maximum, below: numeric limits (``>=``, ``>``, ``<=``, ``<``).
        choices: allowed values of a string option (compared upper-cased when ``upper_choices``).
        finite: a float must be finite (not NaN or infinite).
        nonempty: a string (each string of a list) must hold more than white space: a name or a
            path, where "" would mean nothing.
        special: values accepted whatever the limits say (``-1`` = all, ``0`` = off, ...).
        rule: the text of a limit problem, replacing the generic one (e.g. "must be -1 (all) or at
            least 1").
        aliases: other accepted names (read with a warning by the options file).
        unsupported: set for an option accepted only to say what to use instead; the text says it.
        refused: with ``unsupported``, giving the option is an error rather than a warning.
        metavar: the placeholder shown by ``--help``.
        multiple: a list option given once per value (``--image a --image b``).
    """

    doc: str
    minimum: float | None = None
    above: float | None = None
    maximum: float | None = None
    below: float | None = None
    choices: tuple[str, ...] | None = None
    upper_choices: bool = True
    finite: bool = True
    nonempty: bool = False
    special: tuple[Any, ...] = ()
    rule: str | None = None
    aliases: tuple[str, ...] = ()
    unsupported: str | None = None
    refused: bool = False
    metavar: str | None = None
    multiple: bool = False


def option(default: Any = MISSING, doc: str = "", *, factory: Any = MISSING, **declared: Any) -> Any:
    """A dataclass field with its :class:`OptionInfo`; no default (and no ``factory``) means required."""
    info = OptionInfo(doc, **declared)
    if factory is not MISSING:
        return dataclasses.field(default_factory=factory, metadata={"option": info})
    return dataclasses.field(default=default, metadata={"option": info})


def info(f: dataclasses.Field[Any]) -> OptionInfo:
    """The :class:`OptionInfo` of a field made by :func:`option` (a bare field gets an empty one)."""
    found = f.metadata.get("option")
    return found if isinstance(found, OptionInfo) else OptionInfo("")


def default(f: dataclasses.Field[Any]) -> Any:
    """The field's default value (a fresh one for factories), or ``MISSING`` when it is required."""
    if f.default is not MISSING:
        return f.default
    if f.default_factory is not MISSING:
        return f.default_factory()
    return MISSING


def is_section(kind: Any) -> bool:
    """Whether a field's type is itself a dataclass of options (a nested section)."""
    return isinstance(kind, type) and dataclasses.is_dataclass(kind)


def _number_text(x: float) -> str:
    return str(int(x)) if float(x).is_integer() else str(x)


def problem(f: dataclasses.Field[Any], value: Any) -> str | None:
    """What is wrong with ``value`` for field ``f`` under its declared limits, or ``None``.

    The text has no option name and no value (``must be >= 0``); ``rule`` replaces the generic text.
    """
    meta = info(f)
    if value is None or any(value == s and type(value) is type(s) for s in meta.special):
        return None
    if isinstance(value, float) and meta.finite and not math.isfinite(value):
        return "must be a finite number"
    if meta.nonempty and any(isinstance(v, str) and not v.strip() for v in _values(value)):
        return meta.rule or "must not be empty: give a name"
    if isinstance(value, int | float) and not isinstance(value, bool):
        checks = (
            (meta.minimum, lambda lim: value >= lim, ">="),
            (meta.above, lambda lim: value > lim, ">"),
            (meta.maximum, lambda lim: value <= lim, "<="),
            (meta.below, lambda lim: value < lim, "<"),
        )
        for limit, ok, sign in checks:
            if limit is not None and not ok(limit):
                return meta.rule or f"must be {sign} {_number_text(limit)}"
    if meta.choices is not None and isinstance(value, str):
        shown = value.upper() if meta.upper_choices else value
        if shown not in meta.choices:
            return meta.rule or f"must be one of {', '.join(meta.choices)}"
    return None


def _values(value: Any) -> list[Any]:
    return list(value) if isinstance(value, list | tuple) else [value]


def problems(obj: Any, prefix: str = "") -> Iterator[tuple[str, Any, str]]:
    """``(path, value, problem)`` for every field of ``obj`` (nested sections included) that breaks
    its limits; paths are dotted (``worker.count``)."""
    hints = get_type_hints(type(obj))
    for f in dataclasses.fields(obj):
        value = getattr(obj, f.name)
        path = f"{prefix}.{f.name}" if prefix else f.name
        if is_section(hints[f.name]) and dataclasses.is_dataclass(value):
            yield from problems(value, path)
            continue
        text = problem(f, value)
        if text is not None:
            yield path, value, text


def closest(name: str, valid: Iterable[str]) -> str | None:
    """The valid name most like ``name`` (for "did you mean ...?"), or ``None`` when none is close."""
    found = difflib.get_close_matches(name, list(valid), n=1)
    return found[0] if found else None


def flag_problem(name: str, value: Any, why: str) -> UsageError:
    """The error for flag ``--name`` with ``value``: ``--name=value: why``."""
    return UsageError(f"--{name}={value!r}: {why}")


def check(obj: Any) -> None:
    """Check the fields of the options object ``obj`` against their declared limits (a section, itself
    :class:`Checked`, was checked when it was made), then the rules between them (its
    ``cross_problems()``, when it has one).

    Raises:
        UsageError: naming the first offending flag and what to do.
    """
    hints = get_type_hints(type(obj))
    for f in dataclasses.fields(obj):
        value = getattr(obj, f.name)
        if not is_section(hints[f.name]) and (why := problem(f, value)) is not None:
            raise flag_problem(f.name, value, why)
    for name, value, why in getattr(obj, "cross_problems", tuple)():
        raise flag_problem(name, value, why)


class Checked:
    """A dataclass of options that is checked (:func:`check`) when it is made, so that every one in
    existence is valid: the command line builds and checks its options once, and what it hands on
    needs no second look."""

    def __post_init__(self) -> None:
        check(self)

    def cross_problems(self) -> Iterator[tuple[str, Any, str]]:
        """``(flag, value, why)`` of each rule between its fields that it breaks (none here)."""
        return iter(())
