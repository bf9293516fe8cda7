"""Optimizers over the flat parameter vector: ``step(params, grads)`` updates in place.

An optimizer sees two flat vectors of the same layout and nothing else; its state
(velocity, moments) is flat vectors of that layout too, allocated once on the first
step, so a checkpoint is a few flat arrays and no step allocates. Every update is
written with ``out=`` and in-place operators; hyperparameters are cast to the vector's
dtype once, so float32 stays float32.

L2 weight decay adds ``weight_decay * W`` to the gradient of the weights (the gradient
of ``weight_decay / 2 * ||W||^2``), not of the biases: ``decay_mask`` marks the weights.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from handprop.nn import backend as ops
from handprop.nn import checks
from handprop.nn.backend import namespace
from handprop.nn.layers import Array
from handprop.nn.threads import rowwise


class Optimizer:
    """Base: learning rate and its schedule, step count, weight decay, and flat state
    vectors.

    The optimizer owns the learning rate: ``lr`` is the base rate, and
    :meth:`set_epoch` sets the rate of an epoch, the base times the ``schedule``'s
    factor (a :class:`~handprop.nn.Schedule`; none: the base throughout).
    """

    kind: str = ""
    #: names of the flat state vectors, allocated like ``params`` on the first step
    state_names: tuple[str, ...] = ()

    def __init__(
        self,
        lr: float,
        weight_decay: float = 0.0,
        decay_mask: Array | None = None,
        schedule: Any = None,
    ) -> None:
        self.base_lr = self.lr = checks.positive("learning rate", float(lr))
        self.schedule = schedule
        self.weight_decay = checks.nonnegative("weight decay", weight_decay)
        self.decay_mask = decay_mask
        self.t = 0  # steps taken
        self.state: dict[str, Array] = {}
        self._decay: Array | None = None  # weight_decay where decayed, else 0
        self._buf: Array | None = None  # the gradient with weight decay
        self._tmp: Array | None = None  # a second work vector, for Adam and RMSprop

    def set_epoch(self, epoch: int) -> None:
        """The learning rate of ``epoch`` (counted from 1): lr(epoch) = base * factor."""
        factor = 1.0 if self.schedule is None else self.schedule.factor(epoch)
        self.lr = self.base_lr * factor

    def _prepare(self, params: Array) -> None:
        if self._buf is not None:
            return
        xp = namespace(params)
        self._buf = xp.empty_like(params)
        self._tmp = xp.empty_like(params)
        for name in self.state_names:
            self.state.setdefault(name, xp.zeros_like(params))
        if self.weight_decay:
            mask = np.ones(params.shape, bool) if self.decay_mask is None else self.decay_mask
            decay = ops.to_host(mask) * self.weight_decay
            self._decay = ops.asarray(decay, xp, dtype=params.dtype)

    def gradient(self, params: Array, grads: Array) -> Array:
        """grads plus the weight-decay term, in the work buffer (grads is not touched)."""
        g = self._buf
        if self._decay is not None:
            ops.multiply(params, self._decay, out=g)
            g += grads
        else:
            ops.copyto(g, grads)
        return g

    def step(self, params: Array, grads: Array) -> None:
        self._prepare(params)
        self.t += 1
        self._update(params, self.gradient(params, grads))

    def _update(self, params: Array, g: Array) -> None:
        raise NotImplementedError

    def state_dict(self) -> dict[str, Any]:
        """Flat arrays (NumPy, copied from the device) and scalars that, restored, make
        the next step identical."""
        return {"t": np.array(self.t), **{k: ops.to_host(v) for k, v in self.state.items()}}

    def load_state_dict(self, state: dict[str, Any], params: Array) -> None:
        """Restore :meth:`state_dict` for the parameter vector ``params`` (on whatever
        backend it lives: the state goes there).

        Raises
        ------
        ValueError
            The step count is not an integer >= 0, or a state vector is missing (after
            a step), unknown, or not shaped and typed like ``params``.
        """
        t = np.asarray(state.get("t", -1))
        if t.shape != () or t.dtype.kind not in "iu" or t < 0:
            raise ValueError(f"the step count must be an integer >= 0, got {t.tolist()!r}")
        unknown = set(state) - {"t", *self.state_names}
        if unknown:
            raise ValueError(f"state {sorted(unknown)[0]!r} is not one of {self.kind}'s")
        missing = [name for name in self.state_names if name not in state]
        if missing and t > 0:
            raise ValueError(f"{self.kind} state {missing[0]!r} is missing after {t} steps")
        dtype = ops.host_dtype(params.dtype)
        for name in self.state_names:
            if name in state:
                value = np.asarray(state[name])
                if value.shape != tuple(params.shape) or value.dtype != dtype:
                    raise ValueError(
                        f"{self.kind} state {name!r} is {value.dtype}{list(value.shape)}, "
                        f"expected {dtype}{list(params.shape)} like the parameters"
                    )
                self.state[name] = ops.asarray(np.array(value), namespace(params))
        self.t = int(t)


class GD(Optimizer):
    """Gradient descent, full-batch or on mini-batches (then called SGD):
    p <- p - lr g."""

    kind = "gd"

    def _update(self, params: Array, g: Array) -> None:
        g *= self.lr
        params -= g


class SGD(GD):
    kind = "sgd"


class Momentum(Optimizer):
    """Heavy-ball momentum: v <- mu v + g;  p <- p - lr v."""

    kind = "momentum"
    state_names = ("velocity",)

    def __init__(self, lr: float, momentum: float = 0.9, **kw: Any) -> None:
        super().__init__(lr, **kw)
        self.momentum = checks.in_interval("momentum", float(momentum), 0, 1)

    def _update(self, params: Array, g: Array) -> None:
        v = self.state["velocity"]
        v *= self.momentum
        v += g
        ops.multiply(v, self.lr, out=g)
        params -= g


class Nesterov(Momentum):
    """Nesterov momentum (as in Sutskever et al. 2013, in the form that needs no
    look-ahead evaluation):  v <- mu v + g;  p <- p - lr (g + mu v)."""

    kind = "nesterov"

    def _update(self, params: Array, g: Array) -> None:
        v = self.state["velocity"]
        v *= self.momentum
        v += g
        g *= self.lr  # lr g
        params -= g
        ops.multiply(v, self.lr * self.momentum, out=g)  # lr mu v
        params -= g


class Adam(Optimizer):
    """Adam (Kingma & Ba 2015), bias-corrected:
    m <- b1 m + (1 - b1) g;  v <- b2 v + (1 - b2) g^2;
    p <- p - lr_t m / (sqrt(v) + eps_t),  lr_t = lr sqrt(1 - b2^t) / (1 - b1^t),
    eps_t = eps sqrt(1 - b2^t), which is p - lr m_hat / (sqrt(v_hat) + eps) exactly.
    """

    kind = "adam"
    state_names = ("m", "v")

    def __init__(
        self, lr: float, beta1: float = 0.9, beta2: float = 0.999, eps: float = 1e-8, **kw: Any
    ) -> None:
        super().__init__(lr, **kw)
        self.beta1 = checks.in_interval("beta1", float(beta1), 0, 1)
        self.beta2 = checks.in_interval("beta2", float(beta2), 0, 1)
        self.eps = checks.positive("eps", float(eps))

    def _update(self, params: Array, g: Array) -> None:
        # elementwise only: a large vector (a CNN's 225k parameters) is cut into one
        # block per thread, with the same result whatever the count
        rowwise(self._update_block, params, g, self.state["m"], self.state["v"], self._tmp)

    def _update_block(self, params: Array, g: Array, m: Array, v: Array, tmp: Array) -> None:
        b1, b2, t = self.beta1, self.beta2, self.t
        ops.multiply(g, 1 - b1, out=tmp)
        m *= b1
        m += tmp  # m = b1 m + (1 - b1) g
        ops.multiply(g, g, out=tmp)
        tmp *= 1 - b2
        v *= b2
        v += tmp  # v = b2 v + (1 - b2) g^2
        c2 = float(np.sqrt(1 - b2**t))
        ops.sqrt(v, out=tmp)
        tmp += self.eps * c2
        ops.divide(m, tmp, out=tmp)
        tmp *= self.lr * c2 / (1 - b1**t)
        params -= tmp


class RMSprop(Optimizer):
    """RMSprop (Tieleman & Hinton 2012): s <- rho s + (1 - rho) g^2;
    p <- p - lr g / (sqrt(s) + eps)."""

    kind = "rmsprop"
    state_names = ("s",)

    def __init__(self, lr: float, rho: float = 0.9, eps: float = 1e-8, **kw: Any) -> None:
        super().__init__(lr, **kw)
        self.rho = checks.in_interval("rho", float(rho), 0, 1)
        self.eps = checks.positive("eps", float(eps))

    def _update(self, params: Array, g: Array) -> None:
        s, tmp = self.state["s"], self._tmp
        ops.multiply(g, g, out=tmp)
        tmp *= 1 - self.rho
        s *= self.rho
        s += tmp  # s = rho s + (1 - rho) g^2
        ops.sqrt(s, out=tmp)
        tmp += self.eps
        g /= tmp
        g *= self.lr
        params -= g


#: optimizer name -> class; config strings resolve through it
OPTIMIZERS: dict[str, type[Optimizer]] = {
    cls.kind: cls for cls in (GD, SGD, Momentum, Nesterov, Adam, RMSprop)
}
