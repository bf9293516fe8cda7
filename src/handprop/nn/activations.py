"""Elementwise activations as layers, each with its derivative written out.

They work on arrays of any shape. Each caches only what its backward needs, and only
when training: sigmoid and tanh their output A, ReLU its input sign.
"""

from __future__ import annotations

from handprop.nn import backend as ops
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
        A = self.buffer("A", X.shape, X.dtype) if training else self.xp.empty_like(X)
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
    ops.multiply(X, 0.5, out=A)
    ops.tanh(A, out=A)
    A *= 0.5
    A += 0.5


def _sigmoid_backward(G: Array, A: Array, dX: Array) -> None:
    ops.subtract(1.0, A, out=dX)
    dX *= A
    dX *= G


class Tanh(Layer):
    """A = tanh(Z),  dA/dZ = 1 - A^2."""

    kind = "tanh"

    def forward(self, X: Array, training: bool = False) -> Array:
        A = ops.tanh(X, out=self.buffer("A", X.shape, X.dtype) if training else None)
        if training:
            self._A = A
        return A

    def backward(self, G: Array, need_input_grad: bool = True) -> Array:
        """dX = G * (1 - A^2)."""
        A = self._A
        dX = ops.multiply(A, A, out=self.buffer("dX", A.shape, A.dtype))
        ops.subtract(1.0, dX, out=dX)
        dX *= G
        return dX


class ReLU(Layer):
    """A = max(Z, 0),  dA/dZ = 1 where Z > 0, else 0 (0 at the kink, as is usual)."""

    kind = "relu"

    def forward(self, X: Array, training: bool = False) -> Array:
        if not training:
            return ops.maximum(X, 0.0)
        self._positive = ops.greater(X, 0.0, out=self.buffer("mask", X.shape, self.xp.bool))
        return ops.maximum(X, 0.0, out=self.buffer("A", X.shape, X.dtype))

    def backward(self, G: Array, need_input_grad: bool = True) -> Array:
        """dX = G where Z > 0, else 0."""
        return ops.multiply(G, self._positive, out=self.buffer("dX", G.shape, G.dtype))


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
