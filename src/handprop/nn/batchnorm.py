"""Batch normalization (Ioffe & Szegedy 2015), forward and backward by hand.

One class for both kinds of input: dense activations (n, d) are normalized per
feature, convolution maps (c, h, w, n) (an image batch, stored batch-last: see
:mod:`handprop.nn.conv`) per channel, over the batch and every position (the statistics
of channel j come from all h*w*n of its values).

Where the running statistics live
---------------------------------
``running_mean`` and ``running_var`` are slots of the network's ONE flat parameter
vector, after ``gamma`` and ``beta``, but they are not trained: their gradient is always
exactly 0, and every optimizer (GD, momentum, Adam, RMSprop) leaves an entry whose
gradient and state are 0 unchanged; weight decay spares them (``build_optimizer``'s
decay mask holds only the ``W`` slots). Only a training forward pass writes them.
Being in the flat vector, they are saved and loaded with the model (``params`` of
model.npz), kept bit-exactly by checkpoints (``params``) and by early stopping's best
parameters, and shared, like every weight, by the thread shards of
:class:`~handprop.scale.DataParallel` (an inference pass split over threads reads them).

The statistics of a split batch
-------------------------------
A training batch split over thread shards (and MPI ranks) must be normalized with the
statistics of the *whole* batch, or the result would depend on the split. Each shard's
pass then carries a ``batch_sums`` hook (:meth:`BatchSums.hook`): each shard's layer
sums its rows and one reduction (a barrier among the shards, then an Allreduce over
the ranks) gives every shard the totals: sum x (and the count) for the mean,
sum (x - mean)^2 for the variance, and in the backward pass sum G and sum G x_hat. Each
shard writes only its own part of dgamma and dbeta into its gradient vector, which
DataParallel sums as it sums every other gradient. Shard 0 alone updates the running
averages (its pass says ``update_running``; the shards share the vector; MPI ranks each
update their own copy with the same global statistics).

The passes are written against the array API standard (``xp``, the namespace of the
network's arrays); a batch split over threads is a NumPy thing, and the reduction that
shares statistics sums on the host (a GPU network trains as one shard).
"""

from __future__ import annotations

import functools
import math
import threading
from collections.abc import Callable
from typing import Any

import numpy as np

from handprop.errors import ShapeError
from handprop.nn import backend as ops
from handprop.nn import checks
from handprop.nn.layers import Array, ItemSpec, Layer, Setting
from handprop.nn.passes import INFERENCE, Pass

#: PyTorch's defaults: running = (1 - momentum) running + momentum batch, eps in sqrt
MOMENTUM = 0.1
EPS = 1e-5


class BatchNorm(Layer):
    """Batch normalization over the batch (and, for images, every position).

    Training, per feature/channel j over its m values (m = n, or n*h*w for images)::

        mu = mean(x)   var = mean((x - mu)^2)   sigma = sqrt(var + eps)
        x_hat = (x - mu) / sigma            y = gamma x_hat + beta

    and the running averages ``running <- (1 - momentum) running + momentum batch``
    (the variance's with the unbiased m / (m - 1) factor, as PyTorch does). Inference:
    ``y = gamma (x - running_mean) / sqrt(running_var + eps) + beta``.

    Backward, with G = dL/dy (sums over the m values of the feature)::

        dbeta  = sum G        dgamma = sum G x_hat
        dx_hat = gamma G
        dvar   = sum dx_hat (x - mu) (-1/2) sigma^-3 = -(gamma / (2 sigma^2)) sum G x_hat
        dmu    = -sum dx_hat / sigma + dvar * mean(-2 (x - mu)) = -(gamma / sigma) sum G
        dx     = dx_hat / sigma + dvar 2 (x - mu) / m + dmu / m
               = (gamma / (m sigma)) (m G - sum G - x_hat sum(G x_hat))

    (the mean of x - mu is 0, which drops dvar's term from dmu; 2 (x - mu) dvar / m
    = -(gamma / (m sigma)) x_hat sum(G x_hat) since x - mu = sigma x_hat).

    Parameters
    ----------
    c : int            features (dense input (n, c)) or channels (image input (c, h, w, n))
    momentum : float   weight of the batch in the running averages, in (0, 1]
    eps : float        added to the variance before the square root, > 0

    Parameters in the flat vector: ``gamma`` (c,), ``beta`` (c,), and the running
    averages ``running_mean`` (c,), ``running_var`` (c,), which are not trained (their
    gradient is always 0; see the module's docstring).
    """

    kind = "batchnorm"
    #: "batchnorm" or "batchnorm momentum=0.01 eps=1e-3": per feature or per channel
    spec = ItemSpec(
        "batchnorm", (Setting("momentum", float), Setting("eps", float)), input_size="c"
    )
    #: slots that are never < 0, checked when a model file is loaded (a negative
    #: variance would make sqrt(running_var + eps) NaN, and every prediction with it)
    nonnegative = (("running_var", "running variance"),)

    def __init__(self, c: int, momentum: float = MOMENTUM, eps: float = EPS) -> None:
        self.c = int(c)
        if self.c < 1:
            raise ShapeError(f"batchnorm needs >= 1 features or channels, got {c}")
        self.momentum = checks.in_interval(
            "batchnorm momentum", momentum, 0, 1, open_low=True, open_high=False
        )
        self.eps = checks.positive("batchnorm eps", eps)

    def param_shapes(self) -> dict[str, tuple[int, ...]]:
        c = (self.c,)
        return {"gamma": c, "beta": c, "running_mean": c, "running_var": c}

    def output_shape(self, input_shape: tuple[int, ...]) -> tuple[int, ...]:
        if len(input_shape) not in (1, 3) or input_shape[0] != self.c:
            raise ShapeError(
                f"batchnorm over {self.c} features expects inputs of shape ({self.c},) or "
                f"({self.c}, h, w), got {input_shape}"
            )
        return input_shape

    def macs(self, input_shape: tuple[int, ...]) -> int:
        return 4 * math.prod(input_shape)  # a few elementwise passes per value

    def init_params(self, scheme: str, rng: np.random.Generator) -> None:
        """gamma 1, beta 0: the identity on normalized values; running mean 0, var 1."""
        self.gamma[...] = 1
        self.beta[...] = 0
        self.running_mean[...] = 0
        self.running_var[...] = 1

    def get_config(self) -> dict[str, Any]:
        return {"c": self.c, "momentum": self.momentum, "eps": self.eps}

    def onnx(self, graph: Any, label: str) -> None:
        """The inference form: gamma (x - running_mean) / sqrt(running_var + eps) + beta."""
        names = ("gamma", "beta", "running_mean", "running_var")
        inputs = [graph.weight(getattr(self, n), f"{label}.{n}") for n in names]
        graph.node("BatchNormalization", [graph.current, *inputs], label, epsilon=self.eps)

    # -- passes ------------------------------------------------------------------------

    def forward(self, X: Array, ctx: Pass = INFERENCE) -> Array:
        xp = ctx.xp

        def each(v: Array) -> Array:  # a (c,) vector against X: (c, 1, 1, 1) for images
            return v if X.ndim == 2 else xp.reshape(v, (self.c, 1, 1, 1))

        if not ctx.training:
            scale = self.gamma / xp.sqrt(self.running_var + self.eps)  # (c,)
            shift = self.beta - self.running_mean * scale
            Z = X * each(scale)
            Z += each(shift)
            return Z
        local = math.prod(X.shape) // self.c  # values per feature in these rows
        sums, m = _total_and_count(ctx, _sum(X), local)
        mean = xp.astype(sums / max(m, 1), X.dtype)
        # x - mu is kept for backward (x_hat = (x - mu) / sigma is never stored)
        xc = ops.subtract(X, each(mean), out=ctx.buffer(self, "xc", X.shape, X.dtype))
        var = ctx.total(_dot(xc, xc)) / max(m, 1)  # biased: the batch's own variance
        inv = xp.astype(1.0 / xp.sqrt(var + self.eps), X.dtype)  # 1 / sigma
        scale = self.gamma * inv  # gamma / sigma
        self._xc, self._inv, self._scale, self._m = xc, inv, scale, m
        if ctx.update_running:  # one writer for a vector the shards share
            momentum = self.momentum if ctx.momentum is None else ctx.momentum
            mom = xp.asarray(momentum, dtype=X.dtype)
            keep = 1.0 - mom  # 1 - momentum, rounded in X's dtype
            unbiased = var * (m / (m - 1) if m > 1 else 1.0)
            self.running_mean *= keep
            self.running_mean += mom * mean
            self.running_var *= keep
            self.running_var += xp.astype(momentum * unbiased, X.dtype)
        Z = ops.multiply(xc, each(scale), out=ctx.buffer(self, "Z", X.shape, X.dtype))
        Z += each(self.beta)  # gamma x_hat + beta
        return Z

    def backward(self, G: Array, ctx: Pass, need_input_grad: bool = True) -> Array | None:
        """dx = (gamma / (m sigma)) (m G - sum G - x_hat sum(G x_hat)) (see the class)."""
        xp = ctx.xp

        def each(v: Array) -> Array:  # a (c,) vector against G: (c, 1, 1, 1) for images
            return v if G.ndim == 2 else xp.reshape(v, (self.c, 1, 1, 1))

        xc, inv, scale, m = self._xc, self._inv, self._scale, self._m
        sum_g = _sum(G)  # this shard's dbeta
        sum_gx = _dot(G, xc) * inv  # this shard's dgamma = sum G x_hat
        self.dbeta[...] = xp.astype(sum_g, G.dtype)
        self.dgamma[...] = xp.astype(sum_gx, G.dtype)
        self.drunning_mean[...] = 0  # not trained: an optimizer never moves them
        self.drunning_var[...] = 0
        if ctx.batch_sums is not None:  # the whole batch's sums, for dx
            both = ctx.total(xp.concat([sum_g, sum_gx]))
            sum_g, sum_gx = both[: self.c], both[self.c :]
        if not need_input_grad:
            return None
        # dx = (gamma / sigma) (G - sum G / m) - (x - mu) gamma sum(G x_hat) / (m sigma^2)
        k = xp.astype(scale * inv * sum_gx / m, G.dtype)
        xc *= each(k)  # x - mu is not needed after this pass
        dX = ops.multiply(G, each(scale), out=ctx.buffer(self, "dX", G.shape, G.dtype))
        dX -= xc
        dX -= each(xp.astype(scale * sum_g / m, G.dtype))
        return dX


def _total_and_count(ctx: Pass, sums: Array, count: int) -> tuple[Array, float]:
    """The whole batch's per-feature ``sums`` (c,) and ``count`` of values each summed,
    from this worker's (:meth:`Pass.total`); alone, the count is known without a
    reduction (nor, on a GPU, a wait for the device)."""
    if ctx.batch_sums is None:
        return sums, count
    xp = ctx.xp
    totals = ctx.total(xp.concat([sums, xp.asarray([count], dtype=xp.float64)]))
    return totals[:-1], float(totals[-1])


def _sum(A: Array) -> Array:
    """The sum per feature of rows (n, d), or per channel of an image batch (c, h, w,
    n): (c,) float64. Each sample's positions are summed in A's dtype, the samples in
    float64."""
    xp = ops.namespace(A)
    if A.ndim == 2:
        return xp.sum(A, axis=0, dtype=xp.float64)
    c, n = A.shape[0], A.shape[-1]
    per_sample = xp.sum(xp.reshape(A, (c, -1, n)), axis=1)  # (c, n)
    return xp.sum(per_sample, axis=1, dtype=xp.float64)


def _dot(A: Array, B: Array) -> Array:
    """The sum of A * B per feature or channel (as :func:`_sum`): (c,) float64."""
    xp = ops.namespace(A)
    if A.ndim == 2:
        return xp.sum(A * B, axis=0, dtype=xp.float64)
    c, n = A.shape[0], A.shape[-1]
    per_sample = ops.position_dots(xp.reshape(A, (c, -1, n)), xp.reshape(B, (c, -1, n)))
    return xp.sum(per_sample, axis=1, dtype=xp.float64)


class BatchSums:
    """Sums of the shards' (and ranks') partial statistics, one reduction at a time:
    the ``batch_sums`` of the passes of one split batch (shard k's: :meth:`hook`).

    Every shard calls it with its index and its part, in the same order (the layers'
    order in forward, then backward); the last to arrive adds the parts in index order
    (the same numbers whatever the arrival order), Allreduces them over the ranks, and
    releases every shard with the totals. One shard alone (an MPI rank's unsplit rows)
    sums over the ranks at once.
    """

    def __init__(self, parties: int, world: Any) -> None:
        self.world = world
        self.parts: list[Array | None] = [None] * parties
        self.total: Array | None = None
        self.error: BaseException | None = None
        self.barrier = threading.Barrier(parties, action=self._sum) if parties > 1 else None

    def _sum(self) -> None:
        # the parts are float64 on the host (NumPy threads), or one on a device (an MPI
        # rank's GPU network), whose total goes through the host for the ranks' sum
        total = np.array(ops.to_host(self.parts[0]), dtype=np.float64)
        for part in self.parts[1:]:
            total += ops.to_host(part)
        self.world.sum(total)  # over the ranks (nothing to do in one process)
        self.total = ops.asarray(total, ops.namespace(self.parts[0]))

    def __call__(self, k: int, part: Array) -> Array:
        self.parts[k] = part
        if self.barrier is None:
            self._sum()
        else:
            try:
                self.barrier.wait()
            except threading.BrokenBarrierError:
                if self.error is not None:  # another shard failed: report its error
                    raise self.error from None
                raise
        return self.total  # type: ignore[return-value]  # set by _sum before release

    def hook(self, k: int) -> Callable[[Array], Array]:
        """Shard ``k``'s ``batch_sums``: its part in, the whole batch's total out."""
        return functools.partial(self, k)

    def guard(self, fn: Callable[..., Any]) -> Callable[..., Any]:
        """``fn`` whose failure releases the shards waiting for it (they raise its error
        instead of waiting forever)."""

        def run(*args: Any) -> Any:
            try:
                return fn(*args)
            except threading.BrokenBarrierError:
                raise
            except BaseException as exc:
                self.error = exc
                if self.barrier is not None:
                    self.barrier.abort()
                raise

        return run


__all__ = ["EPS", "MOMENTUM", "BatchNorm", "BatchSums"]
