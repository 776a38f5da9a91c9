"""Ranges of numeric options, declared next to the options: every configuration dataclass lists each numeric field
in its ``RANGES`` table, and :func:`check_ranges` refuses a value outside it with one line naming the option and
the range, for YAML files, ``--set`` and CLI flags alike (they all fill the same dataclasses)."""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

from alambic.errors import AlambicError


@dataclass(frozen=True)
class Range:
    low: float | None = None
    high: float | None = None
    low_open: bool = False
    """The low end is excluded (``> low``)."""
    high_open: bool = False
    """The high end is excluded (``< high``)."""

    def contains(self, value: float) -> bool:
        if isinstance(value, float) and math.isnan(value):
            return False
        if self.low is not None and (value <= self.low if self.low_open else value < self.low):
            return False
        return self.high is None or (value < self.high if self.high_open else value <= self.high)

    def describe(self) -> str:
        if self.high is None:
            return f"{'>' if self.low_open else '>='} {self.low:g}"
        if self.low is None:
            return f"{'<' if self.high_open else '<='} {self.high:g}"
        return f"in {'(' if self.low_open else '['}{self.low:g}, {self.high:g}{')' if self.high_open else ']'}"


POSITIVE = Range(1)
"""Counts and sizes: at least 1."""
NON_NEGATIVE = Range(0)
"""Weights, counts where 0 switches something off, seconds."""
ABOVE_ZERO = Range(0, low_open=True)
"""Rates, temperatures, epsilons."""
FRACTION = Range(0, 1, high_open=True)
"""Shares of a whole that must leave some of it: [0, 1)."""
PROBABILITY = Range(0, 1, low_open=True, high_open=True)
"""(0, 1)."""
UNIT_INTERVAL = Range(0, 1)
"""Mixing weights and probabilities that may be 0 or 1: [0, 1]."""


def check_value(name: str, value, allowed: Range) -> None:
    """One line naming the option and its range when ``value`` (a number, or a tuple checked element by element)
    lies outside ``allowed``; None means unset and is not checked."""
    if value is None:
        return
    for item in value if isinstance(value, tuple) else (value,):
        if not allowed.contains(item):
            raise AlambicError(f"{name} must be {allowed.describe()}, got {value!r}")


def check_ranges(options, prefix: str = "") -> None:
    """:func:`check_value` for every field of ``options`` (a dataclass with a ``RANGES`` table)."""
    for name, allowed in type(options).RANGES.items():
        check_value(f"{prefix}{name}", getattr(options, name), allowed)


def numeric_fields(options_type) -> list[str]:
    """The fields of a dataclass that hold numbers (int, float, optional, or tuples of them)."""
    names = []
    for item in dataclasses.fields(options_type):
        kind = str(item.type)
        if any(word in kind for word in ("int", "float")) and "str" not in kind and "list" not in kind:
            names.append(item.name)
    return names
