"""The layer protocol and the affine (Dense) and Flatten layers."""

from __future__ import annotations

from math import prod
from typing import Any

import numpy as np

from handprop.errors import ConfigError, ShapeError
from handprop.nn import backend as ops

#: an array of the network's namespace (NumPy, CuPy, ...)
Array = Any


class Layer:
    """A differentiable map with explicit forward and backward passes.

    A layer declares the shapes of its parameters (:meth:`param_shapes`); the network
    allocates one flat parameter vector and one flat gradient vector and binds views
    into them with :meth:`bind` (``self.W``, ``self.dW``, ...). ``backward`` writes the
    parameter gradients into those views (overwriting, never accumulating) and returns
    the gradient with respect to the layer's input. It never updates the parameters.
    """

    #: name in the layer registry and in model files
    kind: str = ""
    #: the array namespace of the network's arrays (set by the network when it binds)
    xp: Any = np

    def param_shapes(self) -> dict[str, tuple[int, ...]]:
        """Names and shapes of this layer's parameters, in layout order."""
        return {}

    def bind(self, params: dict[str, Array], grads: dict[str, Array]) -> None:
        """Attach views into the flat vectors: ``self.<name>`` and ``self.d<name>``."""
        for name, view in params.items():
            setattr(self, name, view)
        for name, view in grads.items():
            setattr(self, "d" + name, view)

    def output_shape(self, input_shape: tuple[int, ...]) -> tuple[int, ...]:
        """Shape of one sample's output given one sample's input shape."""
        return input_shape

    def work_size(self, input_shape: tuple[int, ...]) -> int:
        """Elements per sample of the arrays an inference forward pass allocates."""
        return prod(self.output_shape(input_shape))

    def macs(self, input_shape: tuple[int, ...]) -> int:
        """Multiply-adds per sample of a forward pass (one per output element for an
        elementwise layer); it decides when a batch is worth splitting over threads."""
        return prod(self.output_shape(input_shape))

    def forward(self, X: Array, training: bool = False) -> Array:
        raise NotImplementedError

    def backward(self, G: Array, need_input_grad: bool = True) -> Array | None:
        """Parameter gradients into ``d<name>``; returns dL/dX, or None when the
        caller says it is not needed (the first layer: nothing consumes dL/dX there)."""
        raise NotImplementedError

    def buffer(self, name: str, shape: tuple[int, ...], dtype: Any) -> Array:
        """A work array kept on the layer and reused while its shape stays the same.

        Training calls forward and backward on same-shaped batches again and again;
        reusing their outputs' memory saves the allocation and the page faults of a
        fresh multi-megabyte array per pass. Only training passes use buffers, so an
        inference result handed to a user is never overwritten later.
        """
        key = "_buf_" + name
        buf = self.__dict__.get(key)
        if buf is None or buf.shape != shape or buf.dtype != dtype:
            buf = self.xp.empty(shape, dtype=dtype)
            setattr(self, key, buf)
        return buf

    def init_params(self, scheme: str, rng: np.random.Generator) -> None:
        """Fill this layer's parameters in place (no-op for parameter-free layers)."""

    def get_config(self) -> dict[str, Any]:
        """JSON-able constructor arguments; ``{"type": kind, **config}`` rebuilds it."""
        return {}

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v!r}" for k, v in self.get_config().items())
        return f"{type(self).__name__}({args})"


class Dense(Layer):
    """Affine map Z = X @ W + b.   X: (n, d_in)  W: (d_in, d_out)  b: (d_out,)"""

    kind = "dense"

    def __init__(self, d_in: int, d_out: int) -> None:
        self.d_in = int(d_in)
        self.d_out = int(d_out)
        if min(self.d_in, self.d_out) < 1:
            raise ShapeError(f"dense needs sizes >= 1, got d_in={d_in}, d_out={d_out}")

    def param_shapes(self) -> dict[str, tuple[int, ...]]:
        return {"W": (self.d_in, self.d_out), "b": (self.d_out,)}

    def output_shape(self, input_shape: tuple[int, ...]) -> tuple[int, ...]:
        return (self.d_out,)

    def macs(self, input_shape: tuple[int, ...]) -> int:
        return self.d_in * self.d_out

    def forward(self, X: Array, training: bool = False) -> Array:
        if training:
            self._X = X  # all that backward needs
            Z = ops.matmul(X, self.W, out=self.buffer("Z", (X.shape[0], self.d_out), X.dtype))
        else:
            Z = X @ self.W  # (n, d_out)
        Z += self.b
        return Z

    def backward(self, G: Array, need_input_grad: bool = True) -> Array | None:
        """G = dL/dZ (n, d_out) -> dL/dX (n, d_in)."""
        ops.matmul(self._X.T, G, out=self.dW)  # dW = X^T G      (d_in, d_out)
        ops.sum(G, axis=0, out=self.db)  # db = sum_rows G (d_out,)
        if not need_input_grad:
            return None  # skips a GEMM as large as the forward one
        dX = self.buffer("dX", self._X.shape, G.dtype)
        return ops.matmul(G, self.W.T, out=dX)  # dX = G W^T      (n, d_in)

    def init_params(self, scheme: str, rng: np.random.Generator) -> None:
        from handprop.nn.init import INITIALIZERS

        INITIALIZERS[scheme](self.W, fan_in=self.d_in, fan_out=self.d_out, rng=rng)
        self.b[...] = 0

    def get_config(self) -> dict[str, Any]:
        return {"d_in": self.d_in, "d_out": self.d_out}


class Flatten(Layer):
    """Reshape (n, ...) -> (n, prod(...)); backward restores the input shape."""

    kind = "flatten"

    def output_shape(self, input_shape: tuple[int, ...]) -> tuple[int, ...]:
        return (prod(input_shape),)  # Python ints: exact however large

    def forward(self, X: Array, training: bool = False) -> Array:
        if training:
            self._shape = X.shape
        return self.xp.reshape(X, (X.shape[0], -1))

    def backward(self, G: Array, need_input_grad: bool = True) -> Array:
        """dX = G reshaped to the input's shape."""
        return self.xp.reshape(G, self._shape)


#: the number of values a dropout mask's random draw takes (16-bit integers)
MASK_DRAWS = 2**16
#: a batch's mask is drawn in blocks of whole rows of about this many entries, each
#: from its own stream: a worker draws the blocks its rows touch, so the mask does not
#: depend on how the rows are split over threads or ranks (18000 x 100: 7 blocks)
MASK_BLOCK = 2**18


def keep_mask(key: int, p: float, shape: tuple[int, ...], lo: int, hi: int) -> np.ndarray:
    """Rows [lo, hi) of the boolean keep-mask of a batch of ``shape``: each entry True
    with probability 1 - p, a function of ``key`` alone (on the host).

    The batch's rows fall into blocks of ``max(1, MASK_BLOCK // entries per row)``;
    block b's entries are the 16-bit quarters of the 64-bit words of an SFC64 stream
    seeded with (key, b), in order, kept when at least round(p 2^16): 1 - p to within
    2^-17. Raw words cost a quarter of float32 uniforms (18000 x 100: 1.1 ms against
    5.3 ms); a worker pays for the blocks its rows touch, not the batch's."""
    per_row = prod(shape[1:])
    block = max(1, MASK_BLOCK // max(per_row, 1))
    threshold = min(round(p * MASK_DRAWS), MASK_DRAWS - 1)
    out = np.empty((hi - lo, *shape[1:]), dtype=bool)
    for b in range(lo // block, -(-hi // block)):
        first, last = b * block, min((b + 1) * block, shape[0])
        count = (last - first) * per_row
        words = np.random.SFC64([key, b]).random_raw(-(-count // 4))
        # little-endian quarters, so every machine reads the same numbers
        draws = words.astype("<u8", copy=False).view("<u2")[:count]
        a, z = max(first, lo), min(last, hi)
        rows = draws.reshape(last - first, *shape[1:])[a - first : z - first]
        np.greater_equal(rows, threshold, out=out[a - lo : z - lo])
    return out


class Dropout(Layer):
    """Inverted dropout: in training, A = X * M / (1 - p) with M_ij ~ Bernoulli(1 - p);
    at inference, A = X. dA/dX = M / (1 - p).

    Scaling by 1/(1 - p) while training keeps the expected activation unchanged, so
    inference needs no rescaling. Each batch's mask is :func:`keep_mask` of one key drawn
    from ``self.rng``, which the training loop sets (seeded per epoch, so a resumed run
    draws the same masks). A worker that holds rows [lo, lo + m) of a batch of n rows is
    handed ``rows = (key, n, lo)`` and draws only its rows of that batch's mask, so a run
    is the same on any number of threads or ranks. ``fixed_mask`` pins one mask (for
    gradient checks). Masks are drawn on the host and moved to the network's device, so
    every backend draws the same masks.
    """

    kind = "dropout"

    def __init__(self, p: float = 0.5) -> None:
        p = float(p)
        if not 0 <= p < 1:
            raise ConfigError(f"dropout probability must be in [0, 1), got {p!r}")
        self.p = p
        self.rng: np.random.Generator = np.random.default_rng(0)
        self.fixed_mask: Array | None = None
        #: (the batch's key, its number of rows, the first of this worker's rows)
        self.rows: tuple[int, int, int] | None = None

    def next_key(self) -> int:
        """The key of the next batch's mask: one draw from ``self.rng``."""
        return int(self.rng.integers(2**63))

    def forward(self, X: Array, training: bool = False) -> Array:
        if not training or self.p == 0:
            self._M = None
            return X
        mask = self.fixed_mask
        if mask is None:
            key, n, lo = self.rows or (self.next_key(), X.shape[0], 0)
            mask = keep_mask(key, self.p, (n, *X.shape[1:]), lo, lo + X.shape[0])
        # M = mask / (1 - p) and A = X * M, each one pass into a work array kept for the
        # next batch of the same shape (no fresh arrays, no page faults per step)
        M = self.buffer("M", X.shape, X.dtype)
        # the scale as an array of X's dtype: a Python float times a boolean mask would
        # compute in float64 (2.6x slower) before the cast into M
        scale = self.xp.asarray(1.0 / (1.0 - self.p), dtype=X.dtype)
        ops.multiply(ops.asarray(mask, self.xp), scale, out=M)
        self._M = M
        return ops.multiply(X, M, out=self.buffer("A", X.shape, X.dtype))

    def backward(self, G: Array, need_input_grad: bool = True) -> Array:
        """dX = G * M / (1 - p)."""
        if self._M is None:
            return G
        return ops.multiply(G, self._M, out=self.buffer("dX", G.shape, G.dtype))

    def get_config(self) -> dict[str, Any]:
        return {"p": self.p}
