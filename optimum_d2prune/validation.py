"""Strict checks of configuration values, shared by every option group. No torch at import time.

Numbers: Python, numpy and 0-d torch scalars are accepted and converted to Python numbers; booleans are refused
where a number is expected (`block_size=True` is a mistake, not 1); non-finite floats are refused. Every refusal is a
`ConfigError` naming the field, the value and the allowed range.
"""

from __future__ import annotations

import dataclasses
import math
import numbers
import re
from collections.abc import Mapping, Sequence
from typing import Any, ClassVar, Optional

from .errors import ConfigError


def _scalar(value: Any) -> Any:
    """A numpy or 0-d torch scalar as its Python value; anything else unchanged."""
    item = getattr(value, "item", None)
    if item is not None and not isinstance(value, (bool, numbers.Number)) and getattr(value, "ndim", 0) == 0:
        return item()
    return value


def as_float(name: str, value: Any, low: Optional[float] = None, high: Optional[float] = None, *,
             low_open: bool = False, high_open: bool = True) -> float:
    """`value` as a finite float in the range (inclusive `low` unless `low_open`, exclusive `high` unless not
    `high_open`)."""
    value = _scalar(value)
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(float(value)):
        raise ConfigError(f"`{name}` must be a finite number{_range(low, high, low_open, high_open)}, got {value!r}.")
    value = float(value)
    if (low is not None and (value < low or (low_open and value == low))) or (
            high is not None and (value > high or (high_open and value == high))):
        raise ConfigError(f"`{name}` must be a number{_range(low, high, low_open, high_open)}, got {value!r}.")
    return value


def as_int(name: str, value: Any, low: Optional[int] = None, high: Optional[int] = None) -> int:
    """`value` as an int in [low, high]; floats with an integral value and booleans are refused."""
    value = _scalar(value)
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise ConfigError(f"`{name}` must be an integer{_range(low, high, False, False)}, got {value!r}.")
    value = int(value)
    if (low is not None and value < low) or (high is not None and value > high):
        raise ConfigError(f"`{name}` must be an integer{_range(low, high, False, False)}, got {value}.")
    return value


def as_bool(name: str, value: Any) -> bool:
    value = _scalar(value)
    if not isinstance(value, bool):
        raise ConfigError(f"`{name}` must be True or False, got {value!r}.")
    return value


def as_choice(name: str, value: Any, choices: Sequence[str]) -> str:
    if not isinstance(value, str) or value not in choices:
        raise ConfigError(f"`{name}` must be one of {tuple(choices)}, got {value!r}.")
    return value


def as_regex_list(name: str, value: Any) -> list[str]:
    """A list of valid regular expressions (a single string is refused: it is iterable, but not a list)."""
    if isinstance(value, str) or not isinstance(value, Sequence) or not all(isinstance(p, str) for p in value):
        raise ConfigError(f"`{name}` must be a list of regex strings, got {value!r}.")
    for pattern in value:
        try:
            re.compile(pattern)
        except re.error as err:
            raise ConfigError(f"`{name}` holds an invalid regex {pattern!r}: {err}.") from None
    return list(value)


def _range(low: Optional[float], high: Optional[float], low_open: bool, high_open: bool) -> str:
    if low is None and high is None:
        return ""
    if high is None:
        return f" {'>' if low_open else '>='} {low}"
    if low is None:
        return f" {'<' if high_open else '<='} {high}"
    return f" in {'(' if low_open else '['}{low}, {high}{')' if high_open else ']'}"


class OptionGroup:
    """Base of the option dataclasses (a method's knobs, an allocation rule's, the reconstruction's, the runtime):
    built from a dict with unknown names refused, validated in `__post_init__`, serialised as a plain dict."""

    #: how the group is named in errors, e.g. "`method_options` of d2prune"
    group_name: ClassVar[str] = "options"

    @classmethod
    def build(cls, value: Any, defaults: Optional[Mapping[str, Any]] = None) -> Any:
        """`value` (an instance, a dict or None) as an instance; a dict is applied over `defaults`."""
        if isinstance(value, cls):
            return value
        if value is None:
            value = {}
        if not isinstance(value, Mapping):
            raise ConfigError(f"{cls.group_name} must be a dict or a {cls.__name__}, got {type(value).__name__}.")
        known = [f.name for f in dataclasses.fields(cls)]
        unknown = sorted(set(value) - set(known))
        if unknown:
            raise ConfigError(f"{cls.group_name} has no option(s) {unknown}; its options are {known}.")
        return cls(**{**(defaults or {}), **value})

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)
