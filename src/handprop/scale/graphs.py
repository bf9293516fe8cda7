"""One training step, and on a GPU the same step captured once as a CUDA graph and
replayed (``graph = "auto"`` in a config; ``"off"``: never).

:func:`handprop.run.fit.run_epoch` takes every batch through a :class:`TrainingStep`:
``train_pass(X, y)`` (forward, loss and backward, the batch's gradient in ``grads``;
returns the loss and the network's output), then ``update()`` (the optimizer's step).
On NumPy, or with graphs off, these are :meth:`DataParallel.train_pass` and
``opt.step`` and nothing else.

On a GPU a small network's pass is some forty kernels of a few microseconds each, and
launching them (Python, CuPy's dispatch) takes longer than running them. A CUDA graph
launches them all at once. When a batch has the shape of the batch before it (the full
batch, every epoch; every mini-batch but an epoch's last, shorter one), the pass is

1. run once eagerly where the capture will run (the warm-up: every kernel compiled,
   every memory block cached, the graph's own work arrays made, which no eager pass
   replaces), from static inputs: the batch, and the dropout masks that the eager pass
   would draw, copied into arrays kept with the graph (the full batch, the same array
   every epoch, is read where it is);
2. captured: every kernel recorded, none run (:class:`handprop.nn.cuda.CudaGraphs`);
3. replayed once and checked against the warm-up: loss, output and gradient equal to
   float rounding, or the graph is not used;

and every later batch of that shape copies its rows and masks into the static inputs
and replays the graph, which writes the same arrays in place (nothing is rebound: a
replay would not see a new array). A capture that fails, or a replay that disagrees,
turns the graphs off with one line in the log, and the steps run eagerly, as with
``graph = "off"``; so do networks with batchnorm (its pass reads the batch's size
back to the host) and runs over several MPI ranks (the gradient is reduced on the host).

The optimizer's update stays outside the graph: one fused kernel per step
(:mod:`handprop.nn.kernels`) whose learning rate (a schedule's, per epoch or per step)
and bias corrections (Adam's, per step) would otherwise be frozen into the graph; and
what runs between the two (the diagnostics' copy of the parameters before an epoch's
last step) sees them as the eager step does.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol, TypeVar

import numpy as np

from handprop.nn import backend
from handprop.nn.batchnorm import BatchNorm
from handprop.nn.layers import Array, keep_mask
from handprop.nn.passes import Workspace
from handprop.scale.parallel import DataParallel

T = TypeVar("T")

#: the values of a config's ``graph``
GRAPH_MODES = ("auto", "off")
#: how far (relative to its largest value) a replayed result may differ from the eager
#: pass's, by dtype; more says the graph computes something else
REPLAY_TOLERANCE = {"float32": 1e-3, "float64": 1e-9}

log = logging.getLogger("handprop.graphs")


class GraphBackend(Protocol):
    """What :class:`TrainingStep` asks of a graph library (:class:`handprop.nn.cuda.
    CudaGraphs` on CuPy; a stand-in that replays Python in the tests)."""

    def describe(self) -> str: ...

    def new_pool(self) -> Any:
        """A memory pool for one graph's allocations."""

    def run(self, fn: Callable[[], T], pool: Any) -> T:
        """``fn()`` eagerly, where its capture will run."""

    def capture(self, fn: Callable[[], T], pool: Any) -> tuple[Any, T]:
        """(graph, what ``fn`` returned) with ``fn``'s work captured."""

    def launch(self, graph: Any) -> None: ...


class GraphMismatchError(RuntimeError):
    """A replayed graph's results differ from the eager pass's."""


@dataclass
class Captured:
    """A captured pass and what it reads and writes, kept alive with it."""

    graph: Any
    pool: Any
    X: Array  # the batch it reads: the caller's own array when bound, else a copy
    y: Array
    bound: tuple[bool, bool]  # X, y read where the caller keeps them (the full batch)
    masks: dict[int, Array]  # dropout layer index -> its static (n, ...) keep-mask
    work: Workspace  # its own work arrays, which no eager pass replaces
    loss: Array  # written by every replay
    out: Array
    vectors: tuple[Array, Array]  # the parameter and gradient vectors it reads and writes


class TrainingStep:
    """A training step of ``model`` with ``opt``: :meth:`train_pass`, then
    :meth:`update`; CUDA graphs of the passes where ``graph`` is "auto" and the
    network is on a GPU (see the module's docstring).

    ``graphs``: the graph library (default: CuPy's, on a network on a GPU; none
    elsewhere). ``captures``, ``replays``: how many so far; ``off_reason``: why the
    steps run eagerly, once graphs were wanted and could not be used."""

    def __init__(
        self,
        model: DataParallel,
        opt: Any,
        graph: str = "off",
        graphs: GraphBackend | None = None,
    ) -> None:
        if graph not in GRAPH_MODES:
            raise ValueError(f"graph must be one of {', '.join(GRAPH_MODES)}, got {graph!r}")
        self.model, self.opt, self.mode = model, opt, graph
        self.graphs = graphs
        self.captured: dict[tuple, Captured] = {}
        self.captures = self.replays = 0
        self.off_reason: str | None = None
        self._decided = False
        self._previous: tuple[tuple, Array, Array] | None = None
        net = model.net
        shape, self._shapes = net.input_shape, []  # each layer's input shape, per sample
        for layer in net.layers:
            self._shapes.append(shape)
            shape = layer.output_shape(shape)

    @property
    def net(self) -> Any:
        return self.model.net

    def update(self) -> None:
        """The optimizer's step on the gradient of the last :meth:`train_pass`."""
        self.opt.step(self.model.params, self.model.grads)

    def train_pass(self, X: Array, y: Array) -> tuple[Any, Array]:
        """Forward, loss and backward over the batch (X, y): the loss and the network's
        output (an array the next pass overwrites); the gradient in ``grads``."""
        if not self._use_graphs():
            return self.model.train_pass(X, y)
        keys = self.net.dropout_keys()  # drawn as the eager pass draws them
        key = (tuple(X.shape), str(X.dtype), tuple(y.shape), str(y.dtype))
        previous, self._previous = self._previous, (key, X, y)
        captured = self.captured.get(key)
        if captured is not None and self._fits(captured, X, y):
            return self._replay(captured, X, y, keys)
        if captured is None and previous is not None and previous[0] == key:
            try:
                return self._capture(key, X, y, keys, previous)
            except Exception as exc:  # any library's error: the eager pass still works
                text = str(exc).strip().splitlines()
                first = f"{type(exc).__name__}: {text[0]}" if text else type(exc).__name__
                self._turn_off(f"capturing the training step failed: {first}")
        return self.model.train_pass(X, y, keys=keys)

    # -- when ------------------------------------------------------------------------

    def _use_graphs(self) -> bool:
        if self.mode == "off" or self.off_reason is not None:
            return False
        if not self._decided:
            self._decided = True
            self._decide()
        return self.off_reason is None and self.graphs is not None

    def _decide(self) -> None:
        """Graphs or not, once: a GPU (or a given graph library), one process, no
        batchnorm."""
        net = self.net
        if self.graphs is None and not graphs_for(net.xp):
            self.off_reason = "not on a GPU"  # NumPy: nothing to say
            return
        if self.model.world.size > 1:
            self._turn_off("the gradient of each step is reduced over MPI ranks on the host")
        elif any(isinstance(layer, BatchNorm) for layer in net.layers):
            self._turn_off("batchnorm reads the batch's size back to the host in every pass")
        elif self.graphs is None:
            try:
                self.graphs = graphs_for(net.xp)()
            except Exception as exc:
                self._turn_off(f"no graph library: {type(exc).__name__}: {exc}")

    def _turn_off(self, reason: str) -> None:
        """Eager steps from now on, said once."""
        self.off_reason = reason
        self.captured.clear()
        log.warning("handprop: CUDA graphs off, the training steps run eagerly: %s", reason)

    def _fits(self, captured: Captured, X: Array, y: Array) -> bool:
        """Whether ``captured`` can take this batch: the network's vectors are still
        the ones it writes (else all graphs are dropped), and a bound input is the
        same array."""
        net = self.net
        if captured.vectors[0] is not net.params or captured.vectors[1] is not net.grads:
            self.captured.clear()  # the network moved (Network.to): capture again
            return False
        return (not captured.bound[0] or X is captured.X) and (
            not captured.bound[1] or y is captured.y
        )

    # -- capture and replay ----------------------------------------------------------

    def _mask(self, i: int, key: int | Array, n: int) -> Array:
        """Dropout layer ``i``'s keep-mask of a batch of ``n`` rows, on the device."""
        layer = self.net.layers[i]
        if isinstance(key, int):
            key = keep_mask(key, layer.p, (n, *self._shapes[i]), 0, n)
        return backend.asarray(key, self.net.xp)

    def _stage(self, captured: Captured, X: Array, y: Array, keys: dict) -> None:
        """The batch and its masks into the graph's static inputs, in place."""
        if not captured.bound[0]:
            backend.copyto(captured.X, X)
        if not captured.bound[1]:
            backend.copyto(captured.y, y)
        for i, mask in captured.masks.items():
            backend.copyto(mask, self._mask(i, keys[i], X.shape[0]))

    def _replay(self, captured: Captured, X: Array, y: Array, keys: dict) -> tuple[Any, Array]:
        self._stage(captured, X, y, keys)
        self.graphs.launch(captured.graph)
        self.replays += 1
        # the loss is copied (a loss kept by the caller must not change with the next
        # replay); the output is the graph's, as the eager pass's is its work array
        return _snapshot(captured.loss), captured.out

    def _capture(
        self, key: tuple, X: Array, y: Array, keys: dict, previous: tuple
    ) -> tuple[Any, Array]:
        net, xp, n = self.net, self.net.xp, X.shape[0]
        bound = (X is previous[1], y is previous[2])
        c = Captured(
            graph=None,
            pool=self.graphs.new_pool(),
            X=X if bound[0] else xp.empty_like(X),
            y=y if bound[1] else xp.empty_like(y),
            bound=bound,
            masks={i: xp.empty((n, *self._shapes[i]), dtype=xp.bool) for i in keys},
            work=Workspace(),
            loss=None,
            out=None,
            vectors=(net.params, net.grads),
        )
        self._stage(c, X, y, keys)

        def step() -> tuple[Any, Array]:
            return self.model.train_pass(c.X, c.y, keys=dict(c.masks), work=c.work)

        loss, out = self.graphs.run(step, c.pool)  # this batch's pass, eagerly
        expected = [_snapshot(loss), backend.copy(out), backend.copy(net.grads)]
        c.graph, (c.loss, c.out) = self.graphs.capture(step, c.pool)
        self.graphs.launch(c.graph)  # once, to compare with the warm-up
        self._check(c, expected)
        self.captured[key] = c
        self.captures += 1
        return _snapshot(c.loss), c.out

    def _check(self, captured: Captured, expected: list[Any]) -> None:
        """Raise :class:`GraphMismatchError` when the replay's loss, output or gradient
        is not the warm-up's to float rounding."""
        tol = REPLAY_TOLERANCE.get(backend.host_dtype(self.net.params.dtype).name, 1e-3)
        replayed = (captured.loss, captured.out, self.net.grads)
        for name, got, want in zip(("loss", "output", "gradient"), replayed, expected, strict=True):
            got = np.asarray(backend.to_host(got), dtype=np.float64)
            want = np.asarray(backend.to_host(want), dtype=np.float64)
            scale = float(np.max(np.abs(want), initial=0.0, where=np.isfinite(want)))
            if got.shape != want.shape or not np.allclose(
                got, want, rtol=0.0, atol=tol * max(scale, 1e-30), equal_nan=True
            ):
                worst = float(np.max(np.abs(got - want))) if got.shape == want.shape else "shape"
                raise GraphMismatchError(
                    f"the replayed {name} differs from the eager pass's by {worst} "
                    f"(largest value {scale:.3g})"
                )


def graphs_for(xp: Any) -> Callable[[], GraphBackend] | None:
    """The graph library of namespace ``xp``, to be made when first needed: CuPy's on a
    GPU, else None."""
    if backend.device_name(xp) != "cuda":
        return None
    from handprop.nn.cuda import CudaGraphs

    return CudaGraphs


def _snapshot(a: Any) -> Any:
    """A copy of ``a`` (a float stays a float)."""
    return a if isinstance(a, float) else backend.copy(a)


__all__ = [
    "GRAPH_MODES",
    "Captured",
    "GraphBackend",
    "GraphMismatchError",
    "TrainingStep",
    "graphs_for",
]
