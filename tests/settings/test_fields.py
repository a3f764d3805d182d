"""The one option helper: limits, special values, rules, closest names, nested sections."""

from __future__ import annotations

import dataclasses
import math

import pytest

from lastlayer.settings import fields
from lastlayer.settings.fields import option


@dataclasses.dataclass(frozen=True)
class Inner:
    port: int = option(88, "Port.", minimum=1, maximum=65535)


@dataclasses.dataclass(frozen=True)
class Outer:
    count: int = option(1, "How many.", minimum=0)
    batch: int = option(
        100, "Batch (-1: all).", minimum=1, special=(-1,), rule="must be -1 (all) or at least 1"
    )
    rate: float = option(0.5, "Rate.", above=0)
    share: float = option(10, "Share.", minimum=0, below=100)
    level: str = option("INFO", "Level.", choices=fields.LOG_LEVELS)
    inner: Inner = option(factory=Inner)


def problem(name: str, value: object) -> str | None:
    (f,) = [f for f in dataclasses.fields(Outer) if f.name == name]
    return fields.problem(f, value)


@pytest.mark.parametrize(
    ("name", "value", "expected"),
    [
        ("count", 0, None),
        ("count", -1, "must be >= 0"),
        ("batch", -1, None),
        ("batch", 0, "must be -1 (all) or at least 1"),
        ("rate", 0.0, "must be > 0"),
        ("rate", math.inf, "must be a finite number"),
        ("rate", math.nan, "must be a finite number"),
        ("share", 100.0, "must be < 100"),
        ("share", 99.5, None),
        ("level", "warn", None),
        ("level", "LOUD", "must be one of DEBUG, INFO, WARN, WARNING, ERROR, FATAL"),
    ],
)
def test_a_value_is_checked_against_its_field(name, value, expected):
    assert problem(name, value) == expected


def test_problems_walk_nested_sections_with_dotted_paths():
    bad = Outer(count=-2, inner=Inner(port=70000))
    assert list(fields.problems(bad)) == [
        ("count", -2, "must be >= 0"),
        ("inner.port", 70000, "must be <= 65535"),
    ]
    assert not list(fields.problems(Outer()))


def test_declared_information_and_defaults():
    (inner,) = [f for f in dataclasses.fields(Outer) if f.name == "inner"]
    assert fields.is_section(Inner) and not fields.is_section(int)
    assert fields.default(inner) == Inner() and fields.info(inner).doc == ""
    (count,) = [f for f in dataclasses.fields(Outer) if f.name == "count"]
    assert fields.info(count).doc == "How many." and fields.default(count) == 1


def test_closest_name():
    assert fields.closest("how_many_train_steps", ["how_many_training_steps", "learning_rate"]) == (
        "how_many_training_steps"
    )
    assert fields.closest("zzz", ["count"]) is None
