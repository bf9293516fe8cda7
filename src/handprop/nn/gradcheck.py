"""Gradient checks: hand-written backward passes against central finite differences.

Public, because a user who writes a layer should be able to check it the way the tests
check handprop's own layers.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from handprop.nn.backend import asarray, copyto, namespace, to_host
from handprop.nn.layers import Array, Layer, batch_size
from handprop.nn.network import Network
from handprop.nn.params import ParamLayout
from handprop.nn.passes import Masks, Pass, Workspace

#: below this magnitude in both, a difference is compared absolutely, not relatively
FLOOR = 1e-8

# Differences use the fourth-order central stencil
#   f'(x) ~ (8 (f(x+h) - f(x-h)) - (f(x+2h) - f(x-2h))) / 12h,
# whose truncation error is O(h^4): with h = 1e-3 in float64 both it (~1e-12 |f^(5)|)
# and the rounding error (~1e-16 |f| / h = 1e-13) stay far below the 1e-6 the checks
# demand, even for gradient entries near 1e-5, where the plain two-point difference
# cannot get both small at once.


def relative_error(analytic: Array, numeric: Array, floor: float = FLOOR) -> float:
    """max_i |a_i - n_i| / max(|a_i| + |n_i|, floor)."""
    a, n = np.asarray(analytic, np.float64), np.asarray(numeric, np.float64)
    if a.size == 0:
        return 0.0
    return float(np.max(np.abs(a - n) / np.maximum(np.abs(a) + np.abs(n), floor)))


def numeric_gradient(f, x: Array, eps: float = 1e-3, coords: Array | None = None) -> Array:
    """Fourth-order central differences of the scalar f() in each entry of x (perturbed
    in place and restored).

    ``coords`` picks flat indices to perturb (default all); others are left at 0.
    """
    flat = namespace(x).reshape(x, (-1,))  # a view: x is contiguous
    g = np.zeros(flat.size, dtype=np.float64)
    for i in range(flat.size) if coords is None else coords:
        saved = float(flat[i])  # a value: a GPU array's flat[i] is a view
        values = []
        for step in (eps, -eps, 2 * eps, -2 * eps):
            flat[i] = saved + step
            values.append(f())
        flat[i] = saved
        g[i] = (8 * (values[0] - values[1]) - (values[2] - values[3])) / (12 * eps)
    return g.reshape(tuple(x.shape))


def gradcheck(
    net: Network,
    X: Array,
    y: Array,
    eps: float = 1e-3,
    n_coords: int | None = None,
    rng: np.random.Generator | int | None = 0,
    floor: float = FLOOR,
) -> float:
    """Max relative error between ``net.grads`` and finite differences of the loss.

    Perturbs every entry of the flat parameter vector, or ``n_coords`` entries drawn
    from ``rng`` for big networks. Use float64: in float32 the rounding noise of the
    differences is about 1e-3 and the check means little. Forward passes run in
    training mode, so a network with dropout must pin its masks
    (:meth:`Network.pin_masks`): every evaluation then sees the same ones.
    ``floor``: below it in both, differences are compared absolutely (a bias right before
    a batchnorm layer has a gradient of exactly 0, and its differences ~1e-13 of noise).
    """
    X = net.check_input(X)
    y = net.check_labels(y, X.shape[0])
    net.loss_and_grad(X, y)
    analytic = to_host(net.grads).astype(np.float64)
    coords = None
    if n_coords is not None and n_coords < net.n_params:
        coords = np.random.default_rng(rng).choice(net.n_params, n_coords, replace=False)
    numeric = numeric_gradient(lambda: net.loss_value(X, y, training=True), net.params, eps, coords)
    if coords is not None:
        analytic, numeric = analytic[coords], numeric[coords]
    return relative_error(analytic, numeric, floor)


def gradcheck_layer(
    layer: Layer,
    X: Array,
    rng: np.random.Generator | int | None = 0,
    eps: float = 1e-3,
    init: str = "glorot_normal",
    xp: Any = np,
    mask: Array | None = None,
) -> dict[str, float]:
    """Check one layer on its own against a random upstream gradient G.

    The scalar is f(X, params) = sum(layer.forward(X) * G), whose gradient with respect
    to the input is ``layer.backward(G)`` and with respect to each parameter the
    matching ``d<name>``. Returns the relative error for "X" and every parameter name.
    ``xp``: the array namespace the layer computes in (the differences are taken on
    host copies of X and the parameters, which are moved there for every evaluation).
    ``mask``: a dropout layer's keep-mask, the same for every evaluation. X is in the
    layer's layout (an image layer's: (c, h, w, n)); a mask has its samples first.
    """
    rng = np.random.default_rng(rng)
    X = np.array(X, dtype=np.float64)
    layout = ParamLayout([layer.param_shapes()])
    params = np.zeros(layout.size)
    layer.bind(layout.views(params, 0), {})
    layer.init_params(init, rng)  # on the host, from the same numbers on every backend
    if layout.size:
        params += rng.normal(0, 0.1, size=layout.size)  # nonzero biases too
    here = asarray(params, xp) if xp is not np else params
    grads = xp.zeros_like(here)
    layer.bind(layout.views(here, 0), layout.views(grads, 0))
    masks = None if mask is None else Masks({id(layer): mask}, batch_size(X))
    ctx = Pass(training=True, xp=xp, work=Workspace(), masks=masks)

    def forward() -> Array:
        if here is not params:
            copyto(here, asarray(params, xp))
        return layer.forward(asarray(X, xp), ctx)

    G = rng.normal(size=tuple(forward().shape))
    G_here = asarray(G, xp)

    def f() -> float:
        return float(xp.sum(forward() * G_here))

    forward()
    dX = to_host(layer.backward(G_here, ctx))
    errors = {"X": relative_error(dX, numeric_gradient(f, X, eps))}
    analytic = to_host(grads).copy()
    numeric = numeric_gradient(f, params, eps)
    for slot in layout.slots:
        sl = slice(slot.offset, slot.stop)
        errors[slot.name] = relative_error(analytic[sl], numeric[sl])
    return errors
