"""Optimizers over the flat parameter vector: ``step(params, grads)`` updates in place.

An optimizer sees two flat vectors of the same layout and nothing else; its state is
flat vectors of that layout too, allocated once, so a checkpoint is a few flat arrays.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from handprop.errors import ConfigError
from handprop.nn.layers import Array


class Optimizer:
    kind: str = ""

    def __init__(self, lr: float) -> None:
        if not np.isfinite(lr) or lr <= 0:
            raise ConfigError(f"learning rate must be a finite number > 0, got {lr!r}")
        self.lr = float(lr)
        self.t = 0  # steps taken

    def step(self, params: Array, grads: Array) -> None:
        raise NotImplementedError

    def state_dict(self) -> dict[str, Any]:
        """Flat arrays and scalars that, restored, make the next step identical."""
        return {"t": np.array(self.t)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.t = int(state["t"])


class GD(Optimizer):
    """Plain gradient descent: params <- params - lr * grads."""

    kind = "gd"

    def __init__(self, lr: float) -> None:
        super().__init__(lr)
        self._buf: Array | None = None

    def step(self, params: Array, grads: Array) -> None:
        if self._buf is None or self._buf.shape != grads.shape or self._buf.dtype != grads.dtype:
            self._buf = np.empty_like(grads)
        # lr cast to the vector's dtype once, so float32 stays float32
        np.multiply(grads, params.dtype.type(self.lr), out=self._buf)
        params -= self._buf
        self.t += 1


OPTIMIZERS: dict[str, type[Optimizer]] = {"gd": GD}
