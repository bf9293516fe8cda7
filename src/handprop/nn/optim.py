"""Optimizers over the flat parameter vector: ``step(params, grads)`` updates in place.

An optimizer sees two flat vectors of the same layout and nothing else; its state
(velocity, moments) is flat vectors of that layout too, allocated once on the first
step, so a checkpoint is a few flat arrays and no step allocates. Every update is one
formula of :mod:`handprop.nn.kernels`: ``out=`` and in-place passes on the CPU, one
fused kernel on a GPU; hyperparameters are cast to the vector's dtype, so float32
stays float32.

L2 weight decay adds ``weight_decay * W`` to the gradient of the weights (the gradient
of ``weight_decay / 2 * ||W||^2``), not of the biases: ``decay_mask`` marks the weights.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from handprop.nn import backend as ops
from handprop.nn import checks, kernels
from handprop.nn.backend import namespace
from handprop.nn.layers import Array


class Optimizer:
    """Base: learning rate and its schedule, step count, weight decay, and flat state
    vectors.

    The optimizer owns the learning rate: ``lr`` is the base rate, and
    :meth:`set_epoch` sets the rate of an epoch, the base times the ``schedule``'s
    factor (a :class:`~handprop.nn.Schedule`; none: the base throughout). A per-step
    schedule ("onecycle") sets it again before every step of the epoch.
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
        self.epoch, self.steps, self.taken = 1, 1, 0  # the epoch, its steps, taken of them
        self.state: dict[str, Array] = {}
        self._decay: Array | None = None  # weight_decay where decayed, else 0
        self._buf: Array | None = None  # the gradient with weight decay
        self._tmp: Array | None = None  # a second work vector, for Adam and RMSprop

    def set_epoch(self, epoch: int, steps: int = 1) -> None:
        """The learning rate of ``epoch`` (counted from 1), which takes ``steps``
        steps: lr(epoch) = base * factor (per-step schedules: of its first step)."""
        self.epoch, self.steps, self.taken = epoch, max(steps, 1), 0
        self._schedule_rate()

    def _schedule_rate(self) -> None:
        progress = self.taken / self.steps
        factor = 1.0 if self.schedule is None else self.schedule.factor(self.epoch, progress)
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
        return kernels.decayed(params, grads, self._decay_term(), self._buf)

    def _decay_term(self) -> Array | float:
        """The weight-decay vector, or 0.0 without weight decay."""
        return 0.0 if self._decay is None else self._decay

    def step(self, params: Array, grads: Array) -> None:
        self._prepare(params)
        if self.schedule is not None and self.schedule.per_step:
            self._schedule_rate()  # the rate of this step of the epoch
        self.t += 1
        self.taken += 1
        self._update(params, grads)

    def _update(self, params: Array, grads: Array) -> None:
        """The update of ``params`` (and the state) from the gradient ``grads`` plus the
        weight-decay term: one formula of :mod:`handprop.nn.kernels` (a few passes on
        the CPU, one kernel on a GPU)."""
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

    def _update(self, params: Array, grads: Array) -> None:
        kernels.gd_step(grads, self._decay_term(), self.lr, params, g=self._buf)


class SGD(GD):
    kind = "sgd"


class Momentum(Optimizer):
    """Heavy-ball momentum: v <- mu v + g;  p <- p - lr v."""

    kind = "momentum"
    state_names = ("velocity",)

    def __init__(self, lr: float, momentum: float = 0.9, **kw: Any) -> None:
        super().__init__(lr, **kw)
        self.momentum = checks.in_interval("momentum", float(momentum), 0, 1)

    def _update(self, params: Array, grads: Array) -> None:
        v, decay = self.state["velocity"], self._decay_term()
        kernels.momentum_step(grads, decay, self.momentum, self.lr, params, v, g=self._buf)


class Nesterov(Momentum):
    """Nesterov momentum (as in Sutskever et al. 2013, in the form that needs no
    look-ahead evaluation):  v <- mu v + g;  p <- p - lr (g + mu v)."""

    kind = "nesterov"

    def _update(self, params: Array, grads: Array) -> None:
        v, mu, lr = self.state["velocity"], self.momentum, self.lr
        kernels.nesterov_step(grads, self._decay_term(), mu, lr, lr * mu, params, v, g=self._buf)


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

    def _update(self, params: Array, grads: Array) -> None:
        b1, b2, t = self.beta1, self.beta2, self.t
        c2 = float(np.sqrt(1 - b2**t))  # the bias corrections, in eps_t and lr_t
        eps_t, lr_t = self.eps * c2, self.lr * c2 / (1 - b1**t)
        m, v = self.state["m"], self.state["v"]
        decay = self._decay_term()
        kernels.adam_step(
            grads, decay, b1, 1 - b1, b2, 1 - b2, eps_t, lr_t, params, m, v,
            g=self._buf, tmp=self._tmp,
        )  # fmt: skip


class RMSprop(Optimizer):
    """RMSprop (Tieleman & Hinton 2012): s <- rho s + (1 - rho) g^2;
    p <- p - lr g / (sqrt(s) + eps)."""

    kind = "rmsprop"
    state_names = ("s",)

    def __init__(self, lr: float, rho: float = 0.9, eps: float = 1e-8, **kw: Any) -> None:
        super().__init__(lr, **kw)
        self.rho = checks.in_interval("rho", float(rho), 0, 1)
        self.eps = checks.positive("eps", float(eps))

    def _update(self, params: Array, grads: Array) -> None:
        s, rho, decay = self.state["s"], self.rho, self._decay_term()
        kernels.rmsprop_step(
            grads, decay, rho, 1 - rho, self.eps, self.lr, params, s, g=self._buf, tmp=self._tmp
        )


#: optimizer name -> class; config strings resolve through it
OPTIMIZERS: dict[str, type[Optimizer]] = {
    cls.kind: cls for cls in (GD, SGD, Momentum, Nesterov, Adam, RMSprop)
}
