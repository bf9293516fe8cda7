"""The cheap checks of hyperparameters given to nn's classes directly.

A run's config is validated once, when it is read (:mod:`handprop.config`, with the
file and line); the optimizers, schedules and layers trust it. These checks are for
library users building the classes by hand: a wrong value is one ``ConfigError`` that
names it, in the same words wherever it is refused.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import Any

from handprop.errors import ConfigError


def positive(name: str, value: Any, shown: Any = None) -> float:
    """``value`` as a float, refused unless finite and > 0."""
    x = float(value)
    if not (math.isfinite(x) and x > 0):
        raise ConfigError(f"{name} must be a finite number > 0, got {_shown(value, shown)!r}")
    return x


def nonnegative(name: str, value: Any) -> float:
    """``value`` as a float, refused unless finite and >= 0."""
    x = float(value)
    if not (math.isfinite(x) and x >= 0):
        raise ConfigError(f"{name} must be >= 0, got {value!r}")
    return x


def in_interval(
    name: str,
    value: Any,
    low: float,
    high: float,
    *,
    open_low: bool = False,
    open_high: bool = True,
) -> float:
    """``value`` as a float, refused outside the interval (by default [low, high)); NaN
    is outside every interval."""
    x = float(value)
    inside = (low < x if open_low else low <= x) and (x < high if open_high else x <= high)
    if not inside:
        interval = f"{'(' if open_low else '['}{low:g}, {high:g}{')' if open_high else ']'}"
        raise ConfigError(f"{name} must be in {interval}, got {value!r}")
    return x


def one_of(what: str, value: Any, known: Iterable[str]) -> Any:
    """``value``, refused unless one of ``known``."""
    known = tuple(known)
    if value not in known:
        raise ConfigError(f"unknown {what} {value!r}; known: {', '.join(known)}")
    return value


def require(ok: bool, message: str) -> None:
    """Refuse with ``message`` unless ``ok``."""
    if not ok:
        raise ConfigError(message)


def _shown(value: Any, shown: Any) -> Any:
    return value if shown is None else shown
