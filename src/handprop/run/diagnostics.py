"""Diagnostics of training: what each layer's gradients, weights and units are doing.

At every evaluation the training loop records one row per layer with parameters (Dense,
Conv2D) into ``diagnostics.csv`` beside ``history.csv``:

``grad_norm``
    ||dW||, the Frobenius norm of the layer's weight gradient from the last training
    step of the epoch (the full batch's gradient for gradient descent, the last
    mini-batch's otherwise; weight decay not included). Biases are left out of all
    three norms, as usual for these ratios (CS231n).
``weight_norm``
    ||W|| after the epoch.
``update_ratio``
    ||W_after - W_before|| / ||W_before|| over the epoch's last step: how far that step
    moved the weights, relative to their size (the rule of thumb: around 1e-3).
``saturated``
    For a layer followed by a sigmoid or tanh: the fraction of its units' outputs, on
    the probe batch, where the activation's derivative is below
    :data:`SATURATION_DERIVATIVE` (0.01): sigmoid A(1 - A) < 0.01, i.e. |Z| > 4.6;
    tanh 1 - A^2 < 0.01, i.e. |Z| > 3.0. There the unit passes back less than 1% of
    the gradient it receives. Empty for other activations.
``dead``
    For a layer followed by a ReLU: the fraction of its units (one per output element
    of a sample: a feature of a Dense layer, a channel at one position of a Conv2D)
    that are 0 on every row of the probe batch. Empty for other activations.

The probe batch is the first :data:`PROBE_ROWS` training samples, through the network
in inference mode (no dropout), one forward pass per evaluation. This module reads only
public layer attributes (``W``, ``dW``, the layer list and ``ParamLayout``), runs the
layers itself to see their outputs, and is handed the weights from before an epoch's
last step by the training loop. Its cost is measured in the README. For a
network on a GPU it copies what it measures to the host (NumPy) first.
"""

from __future__ import annotations

import csv
import io
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from handprop.nn.backend import to_host

#: a sigmoid or tanh output whose derivative is below this counts as saturated
SATURATION_DERIVATIVE = 0.01
#: rows of the probe batch on which activation health is measured
PROBE_ROWS = 512
DIAGNOSTICS_FILE = "diagnostics.csv"
COLUMNS = (
    "epoch",
    "layer",
    "name",
    "activation",
    "grad_norm",
    "weight_norm",
    "update_ratio",
    "saturated",
    "dead",
)
#: the per-layer quantities, in the order figures draw them
QUANTITIES = ("grad_norm", "weight_norm", "update_ratio", "saturated", "dead")


@dataclass(frozen=True)
class WatchedLayer:
    """A layer with parameters, the position of its weights, and its activation."""

    index: int  # position in the network's layer list
    number: int  # 1, 2, ... among the layers with parameters
    name: str  # "dense 784-100", "conv 1-32 3x3", ...
    activation: str  # the activation layer after it: "sigmoid", ..., or "softmax"/"none"
    act_index: int | None  # position of that activation layer, None for none


def describe_layer(layer: Any) -> str:
    """A short name of a layer with parameters: "dense 784-100", "conv 1-32 3x3"."""
    return layer.short_name()


def watched_layers(net: Any) -> list[WatchedLayer]:
    """Every layer with a weight ``W``, with the activation that follows it (before the
    next layer with parameters; dropout, pooling and flatten in between are skipped)."""
    found: list[WatchedLayer] = []
    current: dict[str, Any] | None = None
    for i, layer in enumerate(net.layers):
        if "W" in layer.param_shapes():
            if current is not None:
                found.append(WatchedLayer(**current))
            current = {
                "index": i,
                "number": len(found) + 1,
                "name": describe_layer(layer),
                "activation": "none",
                "act_index": None,
            }
        elif current is not None and current["act_index"] is None and layer.is_activation:
            current["activation"], current["act_index"] = layer.kind, i
    if current is not None:
        if current["act_index"] is None and net.loss_name == "cross_entropy":
            current["activation"] = "softmax"  # fused into the loss
        found.append(WatchedLayer(**current))
    return found


def activation_health(kind: str, A: np.ndarray) -> tuple[float | None, float | None]:
    """(saturated, dead) fractions of one activation's outputs A (n, ...) on the probe,
    as the activation's class says (``Layer.slope``, ``Layer.has_dead_units``).

    sigmoid: A(1 - A) < 0.01; tanh: 1 - A^2 < 0.01 (saturated, of every output);
    relu: units (output positions) that are 0 on every row (dead).
    """
    from handprop.nn import LAYERS

    cls = LAYERS.get(kind)  # None for "softmax" (fused into the loss) and "none"
    if A.shape[0] == 0 or cls is None:
        return None, None
    slope = cls.slope(A.astype(np.float64, copy=False))
    saturated = None if slope is None else float(np.mean(slope < SATURATION_DERIVATIVE))
    dead = float(1 - (A > 0).any(axis=0).mean()) if cls.has_dead_units else None
    return saturated, dead


def _norm(x: np.ndarray) -> float:
    # float64 accumulation: a float32 sum of squares of a large layer loses digits
    x64 = np.asarray(x, dtype=np.float64).ravel()
    return math.sqrt(float(np.dot(x64, x64)))


class Diagnostics:
    """Records the diagnostics of one training run.

    Parameters
    ----------
    net : Network

    The training loop hands it the parameters just before each epoch's last step
    (:meth:`keep_before`, given to :func:`~handprop.run.fit.run_epoch`), so that the
    update ratio compares the weights after that step with those before it.
    """

    def __init__(self, net: Any) -> None:
        self.net = net
        self.layers = watched_layers(net)
        self.rows: list[dict[str, Any]] = []
        self.before: np.ndarray | None = None  # the parameters before the last step
        self._loaded = False

    def keep_before(self, params: Any) -> None:
        """Keep a copy of ``params`` (one host vector, reused from epoch to epoch)."""
        host = to_host(params)  # the vector itself on NumPy, a copy from a GPU
        if self.before is None:
            self.before = np.empty_like(host)
        np.copyto(self.before, host)

    def probe_outputs(self, X: np.ndarray) -> dict[int, np.ndarray]:
        """The outputs of every watched activation layer on X, in inference mode."""
        wanted = {w.act_index for w in self.layers if w.act_index is not None}
        outputs: dict[int, np.ndarray] = {}
        net = self.net
        A = net.layer_input(net.here(X))  # on the network's device, in its layout
        ctx = net.context()  # an inference pass in the network's namespace
        with np.errstate(over="ignore", invalid="ignore"):
            for i, layer in enumerate(net.layers):
                if not wanted - outputs.keys():
                    break
                A = layer.forward(A, ctx)
                if i in wanted:
                    outputs[i] = to_host(net.sample_first(A))
        return outputs

    def measure(self, epoch: int, X: np.ndarray) -> list[dict[str, Any]]:
        """One row per watched layer for the state after ``epoch``; X: the probe rows."""
        from handprop.nn.threads import single_blas

        # BLAS on one thread: small products waking a BLAS pool cost more than they do
        with single_blas():
            return self._measure(epoch, X)

    def _measure(self, epoch: int, X: np.ndarray) -> list[dict[str, Any]]:
        net = self.net
        outputs = self.probe_outputs(X[:PROBE_ROWS])
        before = self.before
        rows = []
        for w in self.layers:
            layer = net.layers[w.index]
            W, dW = to_host(layer.W), to_host(layer.dW)
            weight_norm = _norm(W)
            ratio = None
            if before is not None:
                W0 = net.layout.views(before, w.index)["W"]
                norm0 = _norm(W0)
                ratio = _norm(W - W0) / norm0 if norm0 > 0 else None
            saturated = dead = None
            if w.act_index is not None:
                saturated, dead = activation_health(w.activation, outputs[w.act_index])
            rows.append(
                {
                    "epoch": epoch,
                    "layer": w.number,
                    "name": w.name,
                    "activation": w.activation,
                    "grad_norm": _norm(dW),
                    "weight_norm": weight_norm,
                    "update_ratio": ratio,
                    "saturated": saturated,
                    "dead": dead,
                }
            )
        return rows

    def record(self, epoch: int, X: np.ndarray, run_dir: Path | None = None) -> None:
        """Measure after ``epoch`` and append the rows. On the first call, the rows of an
        earlier part of this run (a resumed run's ``run_dir/diagnostics.csv``) before
        ``epoch`` are kept."""
        if not self._loaded:
            self._loaded = True
            path = None if run_dir is None else Path(run_dir) / DIAGNOSTICS_FILE
            if path is not None and path.is_file():
                from handprop.errors import DataError
                from handprop.run.reader import read_diagnostics_rows

                try:
                    self.rows = [r for r in read_diagnostics_rows(path) if r["epoch"] < epoch]
                except DataError:
                    self.rows = []  # unreadable: the new rows replace it
        self.rows.extend(self.measure(epoch, X))


def _cell(value: Any) -> Any:
    if value is None:
        return ""
    if isinstance(value, float):
        return repr(value)  # exact, and "nan"/"inf" for a run on its way to diverging
    return value


def diagnostics_csv(rows: list[dict[str, Any]]) -> str:
    """diagnostics.csv: one row per evaluation and layer; empty cells where nothing
    applies (no update yet, no sigmoid/tanh, no ReLU)."""
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=COLUMNS, lineterminator="\n")
    writer.writeheader()
    for row in rows:
        writer.writerow({c: _cell(row.get(c)) for c in COLUMNS})
    return buf.getvalue()


__all__ = [
    "COLUMNS",
    "DIAGNOSTICS_FILE",
    "PROBE_ROWS",
    "QUANTITIES",
    "SATURATION_DERIVATIVE",
    "Diagnostics",
    "activation_health",
    "diagnostics_csv",
    "watched_layers",
]
