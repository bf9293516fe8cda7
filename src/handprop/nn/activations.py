"""Elementwise activations as layers, each with its derivative written out.

They work on arrays of any shape. Each caches only what its backward needs, and only
when training: sigmoid and tanh their output A, ReLU its input sign.
"""

from __future__ import annotations

import numpy as np

from handprop.nn.layers import Array, Layer
from handprop.nn.threads import rowwise


class Sigmoid(Layer):
    """A = 1 / (1 + exp(-Z)),  dA/dZ = A (1 - A).

    Computed as A = (1 + tanh(Z / 2)) / 2, the same function: NumPy's float32 tanh is
    vectorised and costs 0.7x its exp, and it cannot overflow, where exp(-Z) does for
    Z below about -88. Far in the negative tail the result loses relative (not
    absolute) precision: for Z = -20 it is 0 instead of 2e-9, an error of 2e-9.
    """

    kind = "sigmoid"

    def forward(self, X: Array, training: bool = False) -> Array:
        A = self.buffer("A", X.shape, X.dtype) if training else np.empty_like(X)
        rowwise(_sigmoid, X, A)
        if training:
            self._A = A
        return A

    def backward(self, G: Array, need_input_grad: bool = True) -> Array:
        """dX = G * A * (1 - A)."""
        dX = self.buffer("dX", G.shape, G.dtype)
        rowwise(_sigmoid_backward, G, self._A, dX)
        return dX


def _sigmoid(X: Array, A: Array) -> None:
    half = X.dtype.type(0.5)
    np.multiply(X, half, out=A)
    np.tanh(A, out=A)
    A *= half
    A += half


def _sigmoid_backward(G: Array, A: Array, dX: Array) -> None:
    np.subtract(1, A, out=dX)
    dX *= A
    dX *= G


class Tanh(Layer):
    """A = tanh(Z),  dA/dZ = 1 - A^2."""

    kind = "tanh"

    def forward(self, X: Array, training: bool = False) -> Array:
        A = np.tanh(X, out=self.buffer("A", X.shape, X.dtype) if training else None)
        if training:
            self._A = A
        return A

    def backward(self, G: Array, need_input_grad: bool = True) -> Array:
        """dX = G * (1 - A^2)."""
        A = self._A
        dX = np.multiply(A, A, out=self.buffer("dX", A.shape, A.dtype))
        np.subtract(1, dX, out=dX)
        dX *= G
        return dX


class ReLU(Layer):
    """A = max(Z, 0),  dA/dZ = 1 where Z > 0, else 0 (0 at the kink, as is usual)."""

    kind = "relu"

    def forward(self, X: Array, training: bool = False) -> Array:
        if not training:
            return np.maximum(X, 0, dtype=X.dtype)
        self._positive = np.greater(X, 0, out=self.buffer("mask", X.shape, np.dtype(bool)))
        return np.maximum(X, 0, out=self.buffer("A", X.shape, X.dtype))

    def backward(self, G: Array, need_input_grad: bool = True) -> Array:
        """dX = G where Z > 0, else 0."""
        return np.multiply(G, self._positive, out=self.buffer("dX", G.shape, G.dtype))


class Identity(Layer):
    """A = Z,  dA/dZ = 1."""

    kind = "identity"

    def forward(self, X: Array, training: bool = False) -> Array:
        return X

    def backward(self, G: Array, need_input_grad: bool = True) -> Array:
        """dX = G."""
        return G


#: activation name -> layer class; config strings and model files resolve through it
ACTIVATIONS: dict[str, type[Layer]] = {cls.kind: cls for cls in (Sigmoid, Tanh, ReLU, Identity)}
