"""Fused elementwise formulas: each written twice, side by side, as the same maths.

A layer's pass calls one function per formula (``kernels.sigmoid_backward(G, A, dX)``
for dX = G A (1 - A)) and reads as that formula. Here each function is declared once,
with both of its bodies:

- the **unfused formula**, the path of NumPy and of every other array API namespace:
  a few whole-array passes into arrays that exist already (``out=``, in-place
  operators), exactly what the layers ran before they called this module;
- the **fused kernel**, the path of CuPy: the same formula as the body of one CUDA
  elementwise kernel (``cupy.ElementwiseKernel``), compiled on first use, one launch
  where the unfused formula takes two to five. On a GPU a small network's step is bound
  by launches, not by arithmetic (a launch costs a few microseconds of Python and CuPy
  dispatch), and a fused kernel also reads and writes each value once.

Calling conventions are CuPy's: the inputs, then the outputs (written in place and
returned; a tuple when there are several). ``T`` is the floating dtype of the arrays
(float32 or float64); Python floats given for ``T`` parameters are cast to it, as NumPy
casts a Python float in ``a *= 0.5``. Keyword arguments (work arrays) are for the
unfused formula only.

Every kernel has a test against its unfused formula: on the CPU the kernel body itself
is run element by element in Python (tests/nn/cuda_c.py), on a GPU CuPy compiles and
runs it (``HANDPROP_TEST_BACKENDS=...,cupy``, benchmarks/gpu_check.sh).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from handprop.nn import backend as ops
from handprop.nn.threads import rowwise

Array = Any

log = logging.getLogger("handprop.kernels")


@dataclass
class Fused:
    """One formula: ``reference`` (the unfused passes, any namespace) and ``body`` (one
    CUDA kernel with ``inputs`` and ``outputs`` declared as ``cupy.ElementwiseKernel``'s
    ``in_params`` and ``out_params``), called alike: ``fused(*inputs, *outputs)``.

    ``launch`` calls the kernel where the formula's arguments are not the kernel's
    (softmax cross-entropy makes its outputs there and sums its row losses)."""

    name: str
    inputs: str
    outputs: str
    body: str
    reference: Callable[..., Any]
    launch: Callable[..., Any] | None = None
    #: why the kernel could not be used (its first launch, which compiles it, failed):
    #: the unfused formula runs instead, on CuPy too, and the tests fail saying this
    failed: str | None = None
    _kernel: Any = field(default=None, repr=False)
    _launched: bool = field(default=False, repr=False)

    def __call__(self, *args: Any, **work: Any) -> Any:
        if self.failed is None and _on_cupy(args[0]):  # the first input: always an array
            if self._launched:
                return self._launch(args)
            try:  # the first launch compiles the kernel
                out = self._launch(args)
            except Exception as exc:
                self.failed = f"{type(exc).__name__}: {exc}"
                log.warning(
                    "handprop: kernel %s unused, its first launch failed: %s", self.name, exc
                )
                return self.reference(*args, **work)
            self._launched = True
            return out
        return self.reference(*args, **work)

    def _launch(self, args: tuple[Any, ...]) -> Any:
        if self.launch is not None:
            return self.launch(self.kernel(), *args)
        return self.kernel()(*args)

    def kernel(self) -> Any:
        """The CuPy kernel (compiled by CuPy on its first launch, cached on disk)."""
        if self._kernel is None:
            import cupy

            self._kernel = cupy.ElementwiseKernel(
                self.inputs, self.outputs, self.body, f"handprop_{self.name}"
            )
        return self._kernel


def _on_cupy(a: Any) -> bool:
    return not isinstance(a, np.ndarray) and type(a).__module__.startswith("cupy")


#: every fused formula, by name (the tests walk it)
FUSED: dict[str, Fused] = {}


def fused(
    inputs: str, outputs: str, body: str, launch: Callable[..., Any] | None = None
) -> Callable[[Callable[..., Any]], Fused]:
    """Declare the decorated unfused formula together with its CUDA kernel body."""

    def declare(reference: Callable[..., Any]) -> Fused:
        kernel = Fused(reference.__name__, inputs, outputs, body, reference, launch)
        kernel.__doc__ = reference.__doc__
        FUSED[kernel.name] = kernel
        return kernel

    return declare


# -- activations ------------------------------------------------------------------------


@fused("T X", "T A", "A = T(0.5) * tanh(T(0.5) * X) + T(0.5);")
def sigmoid(X: Array, A: Array) -> Array:
    """A = 1 / (1 + exp(-X)) = (1 + tanh(X / 2)) / 2 (cannot overflow; NumPy's float32
    tanh costs 0.7x its exp)."""
    ops.multiply(X, 0.5, out=A)
    ops.tanh(A, out=A)
    A *= 0.5
    A += 0.5
    return A


@fused("T G, T A", "T dX", "dX = ((T(1) - A) * A) * G;")
def sigmoid_backward(G: Array, A: Array, dX: Array) -> Array:
    """dX = G A (1 - A), A the sigmoid's output."""
    ops.subtract(1.0, A, out=dX)  # 1 - A
    dX *= A  # A (1 - A)
    dX *= G  # G A (1 - A)
    return dX


@fused("T G, T A", "T dX", "dX = (T(1) - A * A) * G;")
def tanh_backward(G: Array, A: Array, dX: Array) -> Array:
    """dX = G (1 - A^2), A the tanh's output."""
    ops.multiply(A, A, out=dX)
    ops.subtract(1.0, dX, out=dX)
    dX *= G
    return dX


# NaN stays NaN (as NumPy's maximum keeps it): NaN > 0 is false, NaN != NaN is true
@fused(
    "T X",
    "bool positive, T A",
    "positive = X > T(0); A = (positive || X != X) ? X : T(0);",
)
def relu(X: Array, positive: Array, A: Array) -> tuple[Array, Array]:
    """A = max(X, 0) and the mask X > 0 that the backward pass needs (A may be X)."""
    ops.greater(X, 0.0, out=positive)
    ops.maximum(X, 0.0, out=A)
    return positive, A


@fused("T G, bool positive", "T dX", "dX = G * T(positive);")
def relu_backward(G: Array, positive: Array, dX: Array) -> Array:
    """dX = G where X > 0, else 0 (G * 0 where not: a NaN in G stays NaN)."""
    return ops.multiply(G, positive, out=dX)


@fused("T X, bool keep, T scale", "T M, T A", "M = T(keep) * scale; A = X * M;")
def dropout(X: Array, keep: Array, scale: float, M: Array, A: Array) -> tuple[Array, Array]:
    """M = keep / (1 - p) (``scale`` = 1 / (1 - p)) and A = X M."""
    # the scale as an array of X's dtype: a Python float times a boolean mask would
    # compute in float64 (2.6x slower) before the cast into M
    ops.multiply(keep, ops.namespace(X).asarray(scale, dtype=X.dtype), out=M)
    ops.multiply(X, M, out=A)
    return M, A


# -- softmax and cross-entropy ------------------------------------------------------------

# One thread per row of the (n, k) logits: its maximum, the sum of exp (and of the
# shifted logits, for smoothed targets), its loss and its row of G = (P - Y) / count, in
# one pass over k values (k = 10 classes).
_SOFTMAX_CROSS_ENTROPY = """
T top = Z[i * k];
for (int j = 1; j < k; j++) { top = fmax(top, Z[i * k + j]); }
T total = T(0);
T shifted = T(0);
for (int j = 0; j < k; j++) {
    G[i * k + j] = exp(Z[i * k + j] - top); total += G[i * k + j]; shifted += Z[i * k + j] - top;
}
int label = y;
T on = T(1) - smooth;
T spread = smooth / T(k);
loss = log(total) - on * (Z[i * k + label] - top) - spread * shifted;
for (int j = 0; j < k; j++) {
    G[i * k + j] = (G[i * k + j] / total - on * T(j == label) - spread) * inv_count;
}
"""


def _softmax_cross_entropy_launch(
    kernel: Any, Z: Array, y: Array, count: int, smoothing: float
) -> tuple:
    """The row kernel into a fresh G (n, k) and row losses (n,), then the loss: their
    sum / count (a 0-d array: reading it would make the host wait)."""
    import cupy

    n, k = Z.shape
    G = cupy.empty((n, k), dtype=Z.dtype)
    losses = cupy.empty((n,), dtype=Z.dtype)
    # raw arrays indexed i * k + j: handed over flat (C order), so no stride can differ
    Z = cupy.ascontiguousarray(Z).reshape(-1)
    kernel(Z, y, k, 1.0 / count, smoothing, G.reshape(-1), losses)
    return losses.sum() / count, G


@fused(
    "raw T Z, int64 y, int32 k, T inv_count, T smooth",
    "raw T G, T loss",
    _SOFTMAX_CROSS_ENTROPY,
    launch=_softmax_cross_entropy_launch,
)
def softmax_cross_entropy(Z: Array, y: Array, count: int, smoothing: float) -> tuple[Any, Array]:
    """(loss, G): loss = -sum_i sum_j Y_ij log softmax(Z)_ij / count and
    G = (softmax(Z) - Y) / count, Z (n, k) logits, y (n,) class ids, and the targets
    Y = (1 - smoothing) onehot(y) + smoothing / k (plain one-hot for smoothing 0).

    With s_ij = Z_ij - max_j Z_ij: -sum_j Y_ij log P_ij = log sum_j exp s_ij
    - (1 - smoothing) s_i,y_i - (smoothing / k) sum_j s_ij, since sum_j Y_ij = 1."""
    xp, k = ops.namespace(Z), Z.shape[1]
    # Work on the (k, n) transpose: with k = 10 classes, reductions over a row of
    # length 10 run element by element, while over the k rows of the transpose
    # they run as whole-vector operations (2.4x faster for 18000 x 10).
    S = ops.copy(Z.T)  # (k, n) logits
    S -= xp.max(S, axis=0)  # shifted: column max 0
    at = ops.label_positions(S, y)  # where the true classes sit
    S_y = ops.take_labels(S, at)  # shifted logit of the true class
    if smoothing:
        S_y = (1 - smoothing) * S_y + (smoothing / k) * xp.sum(S, axis=0)
    ops.exp(S, out=S)
    total = xp.sum(S, axis=0)  # >= 1
    loss = ops.scalar(xp.sum(xp.log(total) - S_y)) / count
    S /= total  # P^T = softmax(Z)^T
    ops.add_at_labels(S, at, -(1.0 - smoothing))  # P - Y without building Y
    if smoothing:
        S -= smoothing / k
    S *= 1.0 / count
    return loss, S.T  # (n, k), a transposed view


# -- optimizer updates --------------------------------------------------------------------
# ``decay`` is the weight-decay vector (weight_decay where decayed, else 0) or 0.0 for
# none; ``grads`` is never written. The unfused formulas first form g = grads + decay p
# in the work vector ``g``, as the optimizers always did.


def decayed(params: Array, grads: Array, decay: Any, g: Array) -> Array:
    """g = grads + decay * params (g = grads when there is no decay)."""
    if isinstance(decay, float):
        ops.copyto(g, grads)
    else:
        ops.multiply(params, decay, out=g)
        g += grads
    return g


def flush_subnormal(a: Array) -> None:
    """Set ``a``'s subnormal entries to 0 in place, and leave every other entry as it is.

    An optimizer's state for a parameter whose gradient stays 0 (a dead ReLU's weights)
    shrinks at every step (m by b1, v by b2, a velocity by mu) down into the subnormal
    numbers, below the smallest normal one (2^-126 in float32), and stays there: the
    smallest subnormal times 0.7 rounds back to itself. A CPU computes on subnormal
    numbers up to 50 times slower: fast99.toml's Adam step grew from 0.6 ms to 3 ms
    over its one epoch, as a quarter of its 213k m values went subnormal. Their share
    of an update is far below the last bit of any parameter not itself within 1e-27 of
    0, so 0 changes the parameters nothing. (A GPU computes on them at full speed: the
    fused kernels keep them.)

    How: ``a + c - c`` with ``c`` = 2^(nmant + 1) times the smallest normal number
    (2^-102 in float32). Half the spacing of the numbers near ``c`` is the smallest
    normal number, so ``a + c`` rounds to ``c`` for every subnormal ``a``, and the
    result is 0; from 2^(nmant + 2) ``c`` (2^-77) up, ``c`` is below half of ``a``'s
    last bit, so both steps give ``a`` back exactly. Between the two, ``a`` moves by
    at most twice ``c`` (2^-101), again nothing an update could show.
    """
    info = ops.namespace(a).finfo(a.dtype)
    c = float(info.smallest_normal) * 2.0 / float(info.eps)  # eps = 2^-nmant
    a += c
    a -= c


@fused("T grads, T decay, T lr", "T p", "p -= lr * (grads + decay * p);")
def gd_step(grads: Array, decay: Any, lr: float, p: Array, *, g: Array) -> Array:
    """p <- p - lr g."""
    decayed(p, grads, decay, g)
    g *= lr
    p -= g
    return p


@fused(
    "T grads, T decay, T mu, T lr",
    "T p, T v",
    "T g = grads + decay * p; v = mu * v + g; p -= lr * v;",
)
def momentum_step(
    grads: Array, decay: Any, mu: float, lr: float, p: Array, v: Array, *, g: Array
) -> tuple[Array, Array]:
    """v <- mu v + g;  p <- p - lr v."""
    decayed(p, grads, decay, g)
    v *= mu
    v += g
    flush_subnormal(v)
    ops.multiply(v, lr, out=g)
    p -= g
    return p, v


@fused(
    "T grads, T decay, T mu, T lr, T lr_mu",
    "T p, T v",
    "T g = grads + decay * p; v = mu * v + g; p = (p - lr * g) - lr_mu * v;",
)
def nesterov_step(
    grads: Array, decay: Any, mu: float, lr: float, lr_mu: float, p: Array, v: Array, *, g: Array
) -> tuple[Array, Array]:
    """v <- mu v + g;  p <- p - lr (g + mu v)  (``lr_mu`` = lr mu)."""
    decayed(p, grads, decay, g)
    v *= mu
    v += g
    flush_subnormal(v)
    g *= lr  # lr g
    p -= g
    ops.multiply(v, lr_mu, out=g)  # lr mu v
    p -= g
    return p, v


_ADAM = """
T g = grads + decay * p;
m = b1 * m + c1 * g;
v = b2 * v + c2 * (g * g);
p -= (m / (sqrt(v) + eps_t)) * step;
"""


@fused("T grads, T decay, T b1, T c1, T b2, T c2, T eps_t, T step", "T p, T m, T v", _ADAM)
def adam_step(
    grads: Array,
    decay: Any,
    b1: float,
    c1: float,
    b2: float,
    c2: float,
    eps_t: float,
    step: float,
    p: Array,
    m: Array,
    v: Array,
    *,
    g: Array,
    tmp: Array,
) -> tuple[Array, Array, Array]:
    """m <- b1 m + c1 g;  v <- b2 v + c2 g^2;  p <- p - step m / (sqrt(v) + eps_t)
    (c1 = 1 - b1, c2 = 1 - b2; the bias corrections are in ``step`` and ``eps_t``)."""
    decayed(p, grads, decay, g)

    # elementwise only: a large vector (cnn_deep.toml's 0.9M parameters) is cut into
    # one block per thread (threads.MIN_PARALLEL), with the same result whatever the count
    def block(p: Array, g: Array, m: Array, v: Array, tmp: Array) -> None:
        ops.multiply(g, c1, out=tmp)
        m *= b1
        m += tmp  # m = b1 m + (1 - b1) g
        ops.multiply(g, g, out=tmp)
        tmp *= c2
        v *= b2
        v += tmp  # v = b2 v + (1 - b2) g^2
        flush_subnormal(m)
        flush_subnormal(v)
        ops.sqrt(v, out=tmp)
        tmp += eps_t
        ops.divide(m, tmp, out=tmp)
        tmp *= step
        p -= tmp

    rowwise(block, p, g, m, v, tmp)
    return p, m, v


@fused(
    "T grads, T decay, T rho, T c, T eps, T lr",
    "T p, T s",
    "T g = grads + decay * p; s = rho * s + c * (g * g); p -= (g / (sqrt(s) + eps)) * lr;",
)
def rmsprop_step(
    grads: Array,
    decay: Any,
    rho: float,
    c: float,
    eps: float,
    lr: float,
    p: Array,
    s: Array,
    *,
    g: Array,
    tmp: Array,
) -> tuple[Array, Array]:
    """s <- rho s + c g^2;  p <- p - lr g / (sqrt(s) + eps)  (c = 1 - rho)."""
    decayed(p, grads, decay, g)
    ops.multiply(g, g, out=tmp)
    tmp *= c
    s *= rho
    s += tmp  # s = rho s + (1 - rho) g^2
    flush_subnormal(s)
    ops.sqrt(s, out=tmp)
    tmp += eps
    g /= tmp
    g *= lr
    p -= g
    return p, s
