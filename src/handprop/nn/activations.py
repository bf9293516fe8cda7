"""Elementwise activations as layers, each with its derivative written out.

They work on arrays of any shape. Each caches only what its backward needs, and only
when training: sigmoid and tanh their output A, ReLU its input sign.
"""

from __future__ import annotations

from typing import Any

from handprop.nn import backend as ops
from handprop.nn import kernels
from handprop.nn.layers import Array, Layer
from handprop.nn.passes import INFERENCE, Pass


class Sigmoid(Layer):
    """A = 1 / (1 + exp(-Z)),  dA/dZ = A (1 - A).

    Computed as A = (1 + tanh(Z / 2)) / 2, the same function: NumPy's float32 tanh is
    vectorised and costs 0.7x its exp, and it cannot overflow, where exp(-Z) does for
    Z below about -88. Far in the negative tail the result loses relative (not
    absolute) precision: for Z = -20 it is 0 instead of 2e-9, an error of 2e-9.
    """

    kind = "sigmoid"
    is_activation = True
    onnx_op = "Sigmoid"

    @staticmethod
    def slope(A: Array) -> Array:
        return A * (1 - A)

    def forward(self, X: Array, ctx: Pass = INFERENCE) -> Array:
        A = ctx.buffer(self, "A", X.shape, X.dtype)
        kernels.sigmoid(X, A)  # A = (1 + tanh(X / 2)) / 2
        if ctx.training:
            self._A = A
        return A

    def backward(self, G: Array, ctx: Pass, need_input_grad: bool = True) -> Array:
        """dX = G * A * (1 - A)."""
        return kernels.sigmoid_backward(G, self._A, ctx.buffer(self, "dX", G.shape, G.dtype))


class Tanh(Layer):
    """A = tanh(Z),  dA/dZ = 1 - A^2."""

    kind = "tanh"
    is_activation = True
    onnx_op = "Tanh"

    @staticmethod
    def slope(A: Array) -> Array:
        return 1 - A * A

    def forward(self, X: Array, ctx: Pass = INFERENCE) -> Array:
        A = ops.tanh(X, out=ctx.buffer(self, "A", X.shape, X.dtype))
        if ctx.training:
            self._A = A
        return A

    def backward(self, G: Array, ctx: Pass, need_input_grad: bool = True) -> Array:
        """dX = G * (1 - A^2)."""
        return kernels.tanh_backward(G, self._A, ctx.buffer(self, "dX", G.shape, G.dtype))


class ReLU(Layer):
    """A = max(Z, 0),  dA/dZ = 1 where Z > 0, else 0 (0 at the kink, as is usual)."""

    kind = "relu"
    is_activation = True
    has_dead_units = True
    onnx_op = "Relu"

    def forward(self, X: Array, ctx: Pass = INFERENCE) -> Array:
        if not ctx.training:
            return ops.maximum(X, 0.0)
        positive = ctx.buffer(self, "mask", X.shape, ctx.xp.bool)
        A = ctx.buffer(self, "A", X.shape, X.dtype)
        self._positive, A = kernels.relu(X, positive, A)  # X > 0, max(X, 0)
        return A

    def backward(self, G: Array, ctx: Pass, need_input_grad: bool = True) -> Array:
        """dX = G where Z > 0, else 0."""
        dX = ctx.buffer(self, "dX", G.shape, G.dtype)
        return kernels.relu_backward(G, self._positive, dX)


class Identity(Layer):
    """A = Z,  dA/dZ = 1."""

    kind = "identity"
    is_activation = True

    def onnx(self, graph: Any, label: str) -> None:
        """No node."""

    def forward(self, X: Array, ctx: Pass = INFERENCE) -> Array:
        return X

    def backward(self, G: Array, ctx: Pass, need_input_grad: bool = True) -> Array:
        """dX = G."""
        return G


#: the activations a config's ``activation`` names (``Network.from_spec``); layer items
#: and model files resolve through LAYERS, which holds every layer kind
ACTIVATIONS: dict[str, type[Layer]] = {cls.kind: cls for cls in (Sigmoid, Tanh, ReLU, Identity)}
