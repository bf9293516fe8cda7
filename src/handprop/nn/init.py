"""Weight initialisation schemes, each filling a weight view in place from a seeded rng.

All draw in float64 from ``rng`` and cast once, so a float32 and a float64 network
built from the same seed start from the same numbers (up to rounding).
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

#: half-width of the original system's small uniform initialisation
UNIFORM_SCALE = 0.05


def uniform(W: np.ndarray, fan_in: int, fan_out: int, rng: np.random.Generator) -> None:
    """The original's small uniform init: W ~ U(-0.05, 0.05), whatever the fan."""
    W[...] = rng.uniform(-UNIFORM_SCALE, UNIFORM_SCALE, size=W.shape)


def glorot_uniform(W: np.ndarray, fan_in: int, fan_out: int, rng: np.random.Generator) -> None:
    """Glorot & Bengio (2010): W ~ U(-a, a), a = sqrt(6 / (fan_in + fan_out))."""
    a = np.sqrt(6.0 / (fan_in + fan_out))
    W[...] = rng.uniform(-a, a, size=W.shape)


def glorot_normal(W: np.ndarray, fan_in: int, fan_out: int, rng: np.random.Generator) -> None:
    """Glorot & Bengio (2010): W ~ N(0, 2 / (fan_in + fan_out))."""
    W[...] = rng.normal(0.0, np.sqrt(2.0 / (fan_in + fan_out)), size=W.shape)


def he_uniform(W: np.ndarray, fan_in: int, fan_out: int, rng: np.random.Generator) -> None:
    """He et al. (2015), for ReLU: W ~ U(-a, a), a = sqrt(6 / fan_in)."""
    a = np.sqrt(6.0 / fan_in)
    W[...] = rng.uniform(-a, a, size=W.shape)


def he_normal(W: np.ndarray, fan_in: int, fan_out: int, rng: np.random.Generator) -> None:
    """He et al. (2015), for ReLU: W ~ N(0, 2 / fan_in)."""
    W[...] = rng.normal(0.0, np.sqrt(2.0 / fan_in), size=W.shape)


Initializer = Callable[..., None]

#: init name -> function; config strings resolve through it
INITIALIZERS: dict[str, Initializer] = {
    f.__name__: f for f in (uniform, glorot_uniform, glorot_normal, he_uniform, he_normal)
}
