"""Elementwise activations as layers, each with its derivative written out.

They work on arrays of any shape. Each caches only what its backward needs, and only
when training: sigmoid and tanh their output A, ReLU its input sign.
"""

from __future__ import annotations

import numpy as np

from handprop.nn.layers import Array, Layer


class Sigmoid(Layer):
    """A = 1 / (1 + exp(-Z)),  dA/dZ = A (1 - A).

    Computed as 0.5 * (1 + tanh(Z / 2)), which is the same function but never evaluates
    exp of a large argument, so |Z| up to 1e4 and beyond gives no overflow warning.
    """

    kind = "sigmoid"

    def forward(self, X: Array, training: bool = False) -> Array:
        A = np.multiply(X, 0.5)
        np.tanh(A, out=A)
        A *= 0.5
        A += 0.5
        if training:
            self._A = A
        return A

    def backward(self, G: Array) -> Array:
        """dX = G * A * (1 - A)."""
        A = self._A
        dX = np.subtract(1, A, dtype=A.dtype)
        dX *= A
        dX *= G
        return dX


class Tanh(Layer):
    """A = tanh(Z),  dA/dZ = 1 - A^2."""

    kind = "tanh"

    def forward(self, X: Array, training: bool = False) -> Array:
        A = np.tanh(X)
        if training:
            self._A = A
        return A

    def backward(self, G: Array) -> Array:
        """dX = G * (1 - A^2)."""
        A = self._A
        dX = np.multiply(A, A)
        np.subtract(1, dX, out=dX)
        dX *= G
        return dX


class ReLU(Layer):
    """A = max(Z, 0),  dA/dZ = 1 where Z > 0, else 0 (0 at the kink, as is usual)."""

    kind = "relu"

    def forward(self, X: Array, training: bool = False) -> Array:
        if training:
            self._positive = X > 0
        return np.maximum(X, 0, dtype=X.dtype)

    def backward(self, G: Array) -> Array:
        """dX = G where Z > 0, else 0."""
        return np.multiply(G, self._positive, dtype=G.dtype)


class Identity(Layer):
    """A = Z,  dA/dZ = 1."""

    kind = "identity"

    def forward(self, X: Array, training: bool = False) -> Array:
        return X

    def backward(self, G: Array) -> Array:
        """dX = G."""
        return G


#: activation name -> layer class; config strings and model files resolve through it
ACTIVATIONS: dict[str, type[Layer]] = {cls.kind: cls for cls in (Sigmoid, Tanh, ReLU, Identity)}
