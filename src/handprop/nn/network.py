"""Network: a list of layers, one flat parameter vector, one flat gradient vector."""

from __future__ import annotations

import inspect
import io
import itertools
import json
import math
import numbers
import zipfile
import zlib
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, TypeVar

import numpy as np

from handprop.atomic import atomic_write_bytes
from handprop.errors import HandpropError, ModelFileError, ResourceError, ShapeError
from handprop.memory import check_fits
from handprop.nn.activations import ACTIVATIONS
from handprop.nn.conv import AvgPool2D, Conv2D, MaxPool2D
from handprop.nn.init import INITIALIZERS
from handprop.nn.layers import Array, Dense, Dropout, Flatten, Layer
from handprop.nn.losses import LOSSES, Loss
from handprop.nn.params import ParamLayout
from handprop.nn.threads import bounds, get_threads, side_by_side, single_blas

T = TypeVar("T")

#: layer kind -> class; model files resolve through it (never through getattr)
LAYERS: dict[str, type[Layer]] = {
    "dense": Dense,
    "flatten": Flatten,
    "dropout": Dropout,
    "conv2d": Conv2D,
    "maxpool2d": MaxPool2D,
    "avgpool2d": AvgPool2D,
    **ACTIVATIONS,
}

DTYPES = {"float32": np.float32, "float64": np.float64}

MODEL_FORMAT = "handprop-model"
MODEL_VERSION = 1


def resolve_dtype(dtype: Any) -> np.dtype:
    """float32 or float64 from a name or a NumPy dtype; anything else is refused."""
    try:
        dt = np.dtype(DTYPES.get(dtype, dtype) if isinstance(dtype, str) else dtype)
    except TypeError:
        dt = None
    if dt not in (np.dtype(np.float32), np.dtype(np.float64)):
        raise ShapeError(f"dtype must be float32 or float64, got {dtype!r}")
    return dt


def parse_spec(spec: str | Sequence[int]) -> list[int]:
    """Layer sizes from "784-100-10" (or a sequence of ints); at least input and output."""
    if isinstance(spec, str):
        parts = spec.replace(",", "-").split("-")
        try:
            sizes = [int(p) for p in parts]
        except ValueError:
            raise ShapeError(
                f"network spec must be sizes joined by '-', like '784-100-10', got {spec!r}"
            ) from None
    else:
        sizes = [int(s) for s in spec]
    if len(sizes) < 2 or any(s < 1 for s in sizes):
        raise ShapeError(f"network spec needs an input and an output size, all >= 1, got {spec!r}")
    return sizes


#: a batch is split over threads when each shard's forward pass has at least this many
#: multiply-adds (below it the hand-off between threads costs more than it saves) ...
MIN_SHARD_MACS = 20_000_000
#: ... and, in training, this many per parameter: every shard writes a whole gradient
#: vector and they are summed, which costs as much as the split saves on a dense net's
#: mini-batch (784-800-800-10, batch 128: 6% slower split, 64 per parameter), while a
#: full batch (9000 per parameter) or a CNN's mini-batch (740) gains.
MIN_SHARD_MACS_PER_PARAM = 600

#: the most memory the largest array of one inference batch may take
INFERENCE_BYTES = 256 * 2**20
MAX_INFERENCE_BATCH = 8192

#: layer-spec words -> (layer kind, positional argument names, their types)
LAYER_WORDS: dict[str, tuple[str, tuple[str, ...]]] = {
    "conv": ("conv2d", ("c_out", "k", "stride", "pad")),
    "maxpool": ("maxpool2d", ("k", "stride")),
    "avgpool": ("avgpool2d", ("k", "stride")),
    "dense": ("dense", ("d_out",)),
    "dropout": ("dropout", ("p",)),
    "flatten": ("flatten", ()),
    **{name: (name, ()) for name in ACTIVATIONS},
}


def parse_layer_item(item: str) -> tuple[str, dict[str, float]]:
    """One layer-spec item, e.g. "conv 32 3 pad=1", "maxpool 2", "relu", "dropout 0.5".

    Returns the layer kind and its arguments by name (input sizes are left out: they
    follow from the shapes, so a spec never repeats them).
    """
    words = item.replace(":", " ").split()
    if not words or words[0].lower() not in LAYER_WORDS:
        raise ShapeError(
            f"unknown layer {item!r}; known: {', '.join(LAYER_WORDS)} "
            "(e.g. 'conv 32 3 pad=1', 'maxpool 2', 'dense 128', 'dropout 0.5', 'relu')"
        )
    kind, names = LAYER_WORDS[words[0].lower()]
    args: dict[str, float] = {}
    positional = [w for w in words[1:] if "=" not in w]
    if len(positional) > len(names):
        raise ShapeError(f"layer {item!r} takes at most {len(names)} values ({', '.join(names)})")
    pairs = list(zip(names, positional, strict=False))
    pairs += [tuple(w.split("=", 1)) for w in words[1:] if "=" in w]
    for name, text in pairs:
        if name not in names:
            raise ShapeError(f"layer {item!r}: unknown setting {name!r}; known: {', '.join(names)}")
        try:
            args[name] = float(text) if name == "p" else int(text)
        except ValueError:
            raise ShapeError(f"layer {item!r}: {name} must be a number, got {text!r}") from None
    required = {"conv2d": 2, "maxpool2d": 1, "avgpool2d": 1, "dense": 1, "dropout": 1}
    missing = [n for n in names[: required.get(kind, 0)] if n not in args]
    if missing:
        raise ShapeError(f"layer {item!r} needs {', '.join(missing)}")
    return kind, args


def build_layers(
    items: Sequence[str], input_shape: Sequence[int], n_classes: int, loss: str
) -> list[Layer]:
    """Layers from a spec list; Flatten goes in before the first dense layer on images,
    and the output layer (dense to ``n_classes``, then the loss's output activation)
    is appended."""
    layers: list[Layer] = []
    shape = tuple(int(s) for s in input_shape)
    for item in items:
        kind, args = parse_layer_item(item)
        if kind == "dense" and len(shape) > 1:
            layers.append(Flatten())
            shape = layers[-1].output_shape(shape)
        if kind == "conv2d" and len(shape) != 3:
            raise ShapeError(f"layer {item!r} needs image inputs (c, h, w), got {shape}")
        try:
            if kind == "conv2d":
                layer: Layer = Conv2D(shape[0], **args)
            elif kind == "dense":
                layer = Dense(shape[0], **args)
            else:
                layer = LAYERS[kind](**args)
            shape = layer.output_shape(shape)
        except HandpropError as exc:  # "dense needs sizes >= 1, ...": say which item
            raise ShapeError(f"layer {item!r}: {exc}") from None
        layers.append(layer)
    if len(shape) > 1:
        layers.append(Flatten())
        shape = layers[-1].output_shape(shape)
    layers.append(Dense(shape[0], n_classes))
    out_act = LOSSES[loss].output_activation if loss in LOSSES else None
    if out_act is not None:
        layers.append(ACTIVATIONS[out_act]())
    return layers


def chain_shapes(layers: Sequence[Layer], input_shape: tuple[int, ...]) -> tuple[int, ...]:
    """The output shape of ``layers`` on one sample of ``input_shape``; ShapeError names
    the first layer whose input does not fit."""
    shape = input_shape
    for i, layer in enumerate(layers):
        if isinstance(layer, Dense) and shape != (layer.d_in,):
            raise ShapeError(
                f"layer {i} ({layer!r}) expects inputs of shape ({layer.d_in},), "
                f"but the layer before gives {shape}"
            )
        shape = layer.output_shape(shape)
    return shape


def _layer_words(layer: Layer) -> str:
    """A layer as a layer-spec item ("dense 100", "conv 32 3 pad=1"), for messages."""
    if isinstance(layer, Dense):
        return f"dense {layer.d_out}"
    if isinstance(layer, Conv2D):
        extra = (f" stride={layer.stride}" if layer.stride != 1 else "") + (
            f" pad={layer.pad}" if layer.pad else ""
        )
        return f"conv {layer.c_out} {layer.k}{extra}"
    if isinstance(layer, (MaxPool2D, AvgPool2D)):
        name = layer.kind.removesuffix("2d")
        return f"{name} {layer.k}" + (f" stride={layer.stride}" if layer.stride != layer.k else "")
    if isinstance(layer, Dropout):
        return f"dropout {layer.p:g}"
    return layer.kind


class Network:
    """A feed-forward network whose parameters are views into one flat vector.

    Parameters
    ----------
    layers : list of Layer
    input_shape : tuple of int      shape of one sample, e.g. (784,)
    loss : str                      a name in ``LOSSES``
    dtype : float32 (default) or float64
    meta : dict, optional           JSON-able facts saved with the model (class names, ...)
    params : ndarray, optional      a parameter vector to share instead of owning one
                                    (the shards of a batch split over threads do this)

    Attributes
    ----------
    params : ndarray of shape (n_params,)   every parameter, layer by layer, W then b
    grads : ndarray of shape (n_params,)    dL/dparams, same layout, written by backward
    layout : ParamLayout
    """

    def __init__(
        self,
        layers: Sequence[Layer],
        input_shape: Sequence[int],
        loss: str = "cross_entropy",
        dtype: Any = np.float32,
        meta: dict[str, Any] | None = None,
        params: Array | None = None,
    ) -> None:
        if loss not in LOSSES:
            raise ShapeError(f"unknown loss {loss!r}; known: {', '.join(LOSSES)}")
        self.layers: list[Layer] = list(layers)
        self.input_shape = tuple(int(s) for s in input_shape)
        self.loss_name = loss
        self.loss: Loss = LOSSES[loss]()
        self.dtype = resolve_dtype(dtype)
        self.meta: dict[str, Any] = dict(meta or {})

        self.output_shape = chain_shapes(self.layers, self.input_shape)

        self.layout = ParamLayout([layer.param_shapes() for layer in self.layers])
        self._first_param_layer = next(
            (i for i, layer in enumerate(self.layers) if layer.param_shapes()), 0
        )
        # refuse, with the estimate, what cannot fit, before numpy tries to allocate it;
        # a shard shares the parameters, and the network that owns them checks its passes
        self._owner = params is None
        vectors = 2 if self._owner else 1
        check_fits(
            vectors * self.layout.size * self.dtype.itemsize + self.work_bytes(1, training=True),
            f"{self.describe()} ({self.layout.size:,} {self.dtype.name} parameters, as many "
            "gradients and one sample's activations)",
        )
        if params is None:
            params = np.zeros(self.layout.size, dtype=self.dtype)
        elif params.shape != (self.layout.size,) or params.dtype != self.dtype:
            raise ShapeError(
                f"shared parameters must be a ({self.layout.size},) {self.dtype} vector, "
                f"got {params.shape} {params.dtype}"
            )
        self.params = params
        self.grads = np.zeros(self.layout.size, dtype=self.dtype)
        for i, layer in enumerate(self.layers):
            layer.bind(self.layout.views(self.params, i), self.layout.views(self.grads, i))
        shape, self._macs = self.input_shape, 0
        for layer in self.layers:
            self._macs += layer.macs(shape)
            shape = layer.output_shape(shape)
        self._shards: list[Network] = []  # one per thread, made when first needed
        self._split: list[tuple[int, int]] | None = None  # rows of each shard, last pass
        # (batch, training) of the last pass whose memory was checked
        self._checked: tuple[int, bool] | None = None

    # -- construction ------------------------------------------------------------------

    @classmethod
    def from_spec(
        cls,
        spec: str | Sequence[int],
        activation: str | Sequence[str] = "sigmoid",
        loss: str = "cross_entropy",
        init: str = "uniform",
        dtype: Any = np.float32,
        rng: np.random.Generator | int | None = 0,
        meta: dict[str, Any] | None = None,
        dropout: float | Sequence[float] = 0.0,
    ) -> Network:
        """Build a fully-connected network from "784-100-10".

        ``activation`` is one name for every hidden layer or one per hidden layer, and
        so is ``dropout`` (a probability; 0 puts no dropout layer). The
        output layer is linear for cross-entropy (softmax lives in the loss) and gets
        the loss's own output activation otherwise (sigmoid for mse).
        """
        sizes = parse_spec(spec)
        n_hidden = len(sizes) - 2
        acts = [activation] * n_hidden if isinstance(activation, str) else list(activation)
        if len(acts) != n_hidden:
            raise ShapeError(
                f"got {len(acts)} activations for {n_hidden} hidden layers in {spec!r}"
            )
        drops = [dropout] * n_hidden if np.isscalar(dropout) else list(dropout)
        if len(drops) != n_hidden:
            raise ShapeError(
                f"got {len(drops)} dropout probabilities for {n_hidden} hidden layers in {spec!r}"
            )
        for name in acts:
            if name not in ACTIVATIONS:
                raise ShapeError(f"unknown activation {name!r}; known: {', '.join(ACTIVATIONS)}")
        if loss not in LOSSES:
            raise ShapeError(f"unknown loss {loss!r}; known: {', '.join(LOSSES)}")
        layers: list[Layer] = []
        for i, (d_in, d_out) in enumerate(itertools.pairwise(sizes)):
            layers.append(Dense(d_in, d_out))
            if i < n_hidden:
                layers.append(ACTIVATIONS[acts[i]]())
                if drops[i] > 0:
                    layers.append(Dropout(drops[i]))
        out_act = LOSSES[loss].output_activation
        if out_act is not None:
            layers.append(ACTIVATIONS[out_act]())
        net = cls(layers, (sizes[0],), loss=loss, dtype=dtype, meta=meta)
        net.init(init, rng)
        return net

    @classmethod
    def from_layers(
        cls,
        items: Sequence[str],
        input_shape: Sequence[int],
        n_classes: int,
        loss: str = "cross_entropy",
        init: str = "he_normal",
        dtype: Any = np.float32,
        rng: np.random.Generator | int | None = 0,
        meta: dict[str, Any] | None = None,
    ) -> Network:
        """Build any network from a list of layer items, e.g. a small CNN on (1, 28, 28):
        ["conv 32 3", "relu", "maxpool 2", "conv 64 3", "relu", "maxpool 2",
        "dense 128", "relu", "dropout 0.5"]; the output layer is appended."""
        if loss not in LOSSES:
            raise ShapeError(f"unknown loss {loss!r}; known: {', '.join(LOSSES)}")
        layers = build_layers(items, input_shape, n_classes, loss)
        net = cls(layers, input_shape, loss=loss, dtype=dtype, meta=meta)
        net.init(init, rng)
        return net

    def init(self, scheme: str = "uniform", rng: np.random.Generator | int | None = 0) -> None:
        """(Re)initialise every parameter in place: weights by ``scheme``, biases to 0."""
        if scheme not in INITIALIZERS:
            raise ShapeError(f"unknown init {scheme!r}; known: {', '.join(INITIALIZERS)}")
        rng = np.random.default_rng(rng)
        for layer in self.layers:
            layer.init_params(scheme, rng)

    def set_rng(self, rng: np.random.Generator) -> None:
        """The generator the random layers (dropout) draw their masks from."""
        for layer in self.layers:
            if isinstance(layer, Dropout):
                layer.rng = rng

    @property
    def n_params(self) -> int:
        return self.layout.size

    @property
    def n_classes(self) -> int:
        return math.prod(self.output_shape)

    # -- memory ------------------------------------------------------------------------

    def work_bytes(self, batch: int, training: bool = True) -> int:
        """About how many bytes the work arrays of one pass over ``batch`` samples take.

        Training keeps every layer's output for the backward pass, which allocates as
        much again; inference holds about two layers' arrays at a time. An estimate
        for refusing what cannot fit, not an exact count.
        """
        shape, sizes = self.input_shape, [math.prod(self.input_shape)]
        for layer in self.layers:
            sizes.append(layer.work_size(shape))
            shape = layer.output_shape(shape)
        per_sample = 2 * (sum(sizes) if training else max(sizes))
        return batch * per_sample * self.dtype.itemsize

    def check_memory(self, batch: int, training: bool = True, state_vectors: int = 0) -> None:
        """Raise :class:`ResourceError` when a pass over ``batch`` samples cannot fit.

        Counts the parameters and gradients, ``state_vectors`` more vectors of that size
        (an optimizer's moments: 1 for momentum, 2 for Adam), a gradient vector per
        thread when the batch is split over threads, and :meth:`work_bytes`. Call it
        before the first pass, e.g. with the training batch size, so that a too-large
        batch is one clear line and not an out-of-memory kill midway.
        """
        vectors = 2 + state_vectors
        if training and self.split(batch, training=True) is not None:
            vectors += get_threads()
        nbytes = vectors * self.n_params * self.dtype.itemsize
        what = "training" if training else "running"
        check_fits(
            nbytes + self.work_bytes(batch, training),
            f"{what} {self.describe()} on batches of {batch:,} samples",
        )

    def _check_pass(self, batch: int, training: bool) -> None:
        """:meth:`check_memory` once per new batch size, before the first pass of it."""
        self.check_memory(batch, training)
        self._checked = (batch, training)

    def describe(self) -> str:
        """ "the network 784-100-10" (dense layers) or "the network on (1, 28, 28)
        inputs: conv 32 3, relu, ...", for messages."""
        dense = [layer for layer in self.layers if layer.param_shapes()]
        if len(self.input_shape) == 1 and all(isinstance(layer, Dense) for layer in dense):
            return "the network " + "-".join(
                map(str, [*self.input_shape, *(d.d_out for d in dense)])
            )
        words = [_layer_words(layer) for layer in self.layers]
        text = ", ".join(words)
        if len(text) > 120:
            text = text[:117] + "..."
        return f"the network on {self.input_shape} inputs: {text}"

    # -- passes ------------------------------------------------------------------------

    def check_input(self, X: Array) -> Array:
        """X with shape (n, *input_shape) cast to the network's dtype (once, here)."""
        X = np.asarray(X)
        if X.ndim != len(self.input_shape) + 1 or X.shape[1:] != self.input_shape:
            raise ShapeError(
                f"input of shape {X.shape} does not fit this network, which expects "
                f"(n, {', '.join(map(str, self.input_shape))})"
            )
        if not np.issubdtype(X.dtype, np.number):
            raise ShapeError(f"input must be numeric, got dtype {X.dtype}")
        return X.astype(self.dtype, copy=False)

    def check_labels(self, y: Array, n: int) -> Array:
        """Integer class ids of shape (n,) in [0, n_classes)."""
        y = np.asarray(y)
        if y.shape != (n,):
            raise ShapeError(f"labels must have shape ({n},), got {y.shape}")
        if not np.issubdtype(y.dtype, np.integer):
            raise ShapeError(f"labels must be integer class ids, got dtype {y.dtype}")
        if n and (y.min() < 0 or y.max() >= self.n_classes):
            raise ShapeError(
                f"labels must lie in [0, {self.n_classes}), got values from {y.min()} to {y.max()}"
            )
        return y

    def forward(self, X: Array, training: bool = False) -> Array:
        """Output (n, k) for input (n, *input_shape): logits for cross-entropy.

        A large batch is split into row blocks, one per thread (see :meth:`split`);
        the result is the same up to float rounding.
        """
        if self._owner and self._checked != (X.shape[0], training):
            self._check_pass(X.shape[0], training)
        split = self.split(X.shape[0], training)
        if training:
            self._split = split
        if split is None:
            A = X
            for layer in self.layers:
                A = layer.forward(A, training)
            return A
        out = np.empty((X.shape[0], *self.output_shape), dtype=self.dtype)

        def run(shard: Network, lo: int, hi: int) -> None:
            out[lo:hi] = shard.forward(X[lo:hi], training)

        self._on_shards(run, split, training)
        return out

    def backward(self, G: Array, input_grad: bool = False) -> Array | None:
        """Backpropagate G = dL/d(output); fills ``self.grads``.

        Returns dL/dX when ``input_grad`` is true. Otherwise the pass stops at the
        first layer with parameters and skips its input gradient: training never needs
        dL/dX, and for 784-100-10 it is a third of the epoch's matrix products.

        After a forward pass split over threads, each shard backpropagates its rows of
        G and ``grads`` is the sum of the shards' gradients: G already carries the
        1/n of the whole batch, so the sum is the batch's gradient.
        """
        split = self._split
        if split is not None:
            if G.shape[0] != split[-1][1]:
                raise ShapeError(
                    f"G has {G.shape[0]} rows, the forward pass had {split[-1][1]} samples"
                )

            def run(shard: Network, lo: int, hi: int) -> Array | None:
                return shard.backward(G[lo:hi], input_grad)

            parts = self._on_shards(run, split)
            self._sum_grads(len(split))
            return np.concatenate(parts) if input_grad else None
        stop = 0 if input_grad else self._first_param_layer
        for i in range(len(self.layers) - 1, stop - 1, -1):
            G = self.layers[i].backward(G, need_input_grad=input_grad or i > stop)
        return G if input_grad else None

    def train_pass(self, X: Array, y: Array) -> tuple[float, Array]:
        """Forward (training), loss and backward over (X, y) in one go: fills ``grads``,
        returns the loss and the network's output.

        The same as ``forward``, ``loss``, ``backward`` one after the other, but a batch
        split over threads goes through all three on its threads in one hand-off, the
        loss included. A shard's loss divides by the whole batch's n, so the shards'
        losses and gradients sum to the batch's.
        """
        n = X.shape[0]
        if self._owner and self._checked != (n, True):
            self._check_pass(n, True)
        split = self.split(n, training=True)
        if split is None:
            out = self.forward(X, training=True)
            loss, G = self.loss(out, y)
            self.backward(G)
            return loss, out
        out = np.empty((n, *self.output_shape), dtype=self.dtype)

        def run(shard: Network, lo: int, hi: int) -> float:
            out[lo:hi] = part = shard.forward(X[lo:hi], training=True)
            loss, G = shard.loss(part, y[lo:hi], count=n)
            shard.backward(G)
            return loss

        losses = self._on_shards(run, split, training=True)
        self._sum_grads(len(split))
        self._split = None  # nothing is left for a later backward
        return float(sum(losses)), out

    def loss_and_grad(self, X: Array, y: Array) -> float:
        """One forward and backward pass over (X, y); returns the loss, fills ``grads``.

        X and y are taken as they are (see :meth:`check_input`, :meth:`check_labels`
        for validation at the boundary).
        """
        return self.train_pass(X, y)[0]

    def loss_value(self, X: Array, y: Array, training: bool = False) -> float:
        """The loss over (X, y) without a backward pass."""
        return self.loss.value(self.forward(X, training=training), y)

    # -- batches split over threads ----------------------------------------------------

    def split(self, n: int, training: bool = False) -> list[tuple[int, int]] | None:
        """Row blocks for a batch of ``n`` samples, one per thread, or None to run it
        whole: on one thread, or when a shard would have too little work to gain
        (see ``MIN_SHARD_MACS`` and ``MIN_SHARD_MACS_PER_PARAM``)."""
        threads = get_threads()
        per_shard = n * self._macs // threads
        if threads < 2 or n < 2 * threads or per_shard < MIN_SHARD_MACS:
            return None
        if training and per_shard < MIN_SHARD_MACS_PER_PARAM * self.n_params:
            return None
        return bounds(n, threads)

    def shards(self, count: int) -> list[Network]:
        """``count`` copies of this network's layers that share its parameter vector;
        each keeps its own gradient vector and work arrays."""
        while len(self._shards) < count:
            layers = [type(layer)(**layer.get_config()) for layer in self.layers]
            self._shards.append(
                Network(layers, self.input_shape, self.loss_name, self.dtype, params=self.params)
            )
        return self._shards[:count]

    def _share_masks(self, n: int, split: list[tuple[int, int]]) -> None:
        """Draw each dropout layer's mask for the whole batch and hand every shard its
        rows: the masks, and so the training run, do not depend on the thread count."""
        shape = self.input_shape
        for i, layer in enumerate(self.layers):
            if isinstance(layer, Dropout) and layer.p > 0:
                mask = layer.fixed_mask
                if mask is None:
                    mask = layer.draw_mask((n, *shape))
                for shard, (lo, hi) in zip(self._shards, split, strict=False):
                    shard.layers[i].fixed_mask = mask[lo:hi]
            shape = layer.output_shape(shape)

    def _on_shards(
        self, fn: Callable[..., T], split: list[tuple[int, int]], training: bool = False
    ) -> list[T]:
        """``fn(shard, lo, hi)`` for each shard and its rows, side by side, BLAS on one
        thread per call; a training pass first hands the shards their dropout masks."""
        shards = self.shards(len(split))
        if training:
            self._share_masks(split[-1][1], split)
        calls = [(shard, lo, hi) for shard, (lo, hi) in zip(shards, split, strict=True)]
        with single_blas():
            return side_by_side(fn, calls)

    def _sum_grads(self, count: int) -> None:
        """``grads`` = the sum of the first ``count`` shards' gradients."""
        shards = self._shards[:count]
        np.add(shards[0].grads, shards[1].grads, out=self.grads)
        for shard in shards[2:]:
            self.grads += shard.grads

    def inference_batch(self) -> int:
        """Samples per inference batch: as many as keep the largest work array of one
        forward pass (a CNN's im2col columns) within ``INFERENCE_BYTES``, at most 8192."""
        shape, per_sample = self.input_shape, 1
        for layer in self.layers:
            per_sample = max(per_sample, layer.work_size(shape))
            shape = layer.output_shape(shape)
        fit = INFERENCE_BYTES // (per_sample * self.dtype.itemsize)
        return int(min(MAX_INFERENCE_BATCH, max(1, fit)))

    def predict_proba(self, X: Array, batch_size: int | None = None) -> Array:
        """Class probabilities (n, k), computed batch by batch to bound memory
        (``batch_size`` samples at a time; by default :meth:`inference_batch`)."""
        X = self.check_input(X)
        batch_size = batch_size or self.inference_batch()
        out = np.empty((X.shape[0], self.n_classes), dtype=self.dtype)
        for start in range(0, X.shape[0], batch_size):
            stop = start + batch_size
            out[start:stop] = self.loss.probabilities(self.forward(X[start:stop]))
        return out

    def predict(self, X: Array, batch_size: int | None = None) -> Array:
        """Class ids (n,) of the most probable class."""
        return self.predict_proba(X, batch_size).argmax(axis=1)

    # -- description -------------------------------------------------------------------

    def architecture(self) -> dict[str, Any]:
        """JSON-able description from which :meth:`from_architecture` rebuilds the net."""
        return {
            "format": MODEL_FORMAT,
            "version": MODEL_VERSION,
            "input_shape": list(self.input_shape),
            "loss": self.loss_name,
            "dtype": self.dtype.name,
            "layers": [{"type": layer.kind, **layer.get_config()} for layer in self.layers],
            "meta": self.meta,
        }

    @classmethod
    def from_architecture(cls, arch: dict[str, Any]) -> Network:
        """Rebuild an (uninitialised) network from :meth:`architecture`'s output.

        Every value is checked for its type first (a model file is untrusted input):
        ``ShapeError`` names the first one that is wrong.
        """
        _check_architecture(arch)
        return cls(
            _architecture_layers(arch),
            arch["input_shape"],
            loss=arch["loss"],
            dtype=arch["dtype"],
            meta=arch.get("meta") or {},
        )

    def summary(self) -> str:
        """One line per layer with its output shape and parameter count, then the total."""
        lines = []
        shape = self.input_shape
        for i, layer in enumerate(self.layers):
            shape = layer.output_shape(shape)
            n = sum(math.prod(s) for s in layer.param_shapes().values())
            lines.append(f"{i:>3}  {layer!r:<32} -> {shape!s:<14} {n:>10,d} params")
        lines.append(f"     total {self.n_params:,d} parameters ({self.dtype.name})")
        return "\n".join(lines)

    def __repr__(self) -> str:
        return f"Network({self.layers!r}, input_shape={self.input_shape}, loss={self.loss_name!r})"


# -- model files -----------------------------------------------------------------------

#: the most layers a model file may describe (the deepest handprop net has a few dozen)
MAX_LAYERS = 10_000
#: the largest architecture text a model file may hold (a real one is a few KB)
MAX_ARCHITECTURE_BYTES = 16 * 2**20
#: parameters are read into the network's vector this many bytes at a time
READ_CHUNK = 16 * 2**20


def _is_int(value: Any) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def _check_architecture(arch: Any) -> None:
    """Types and names of an architecture dict; ShapeError names the first bad value."""
    if not isinstance(arch, dict):
        raise ShapeError(f"the architecture must be a JSON object, got {type(arch).__name__}")
    for key in ("input_shape", "loss", "dtype", "layers"):
        if key not in arch:
            raise ShapeError(f"the architecture has no {key!r}")
    shape = arch["input_shape"]
    if (
        not isinstance(shape, list)
        or not 1 <= len(shape) <= 3
        or not all(_is_int(s) and s >= 1 for s in shape)
    ):
        raise ShapeError(f"input_shape must be a list of 1 to 3 integers >= 1, got {shape!r:.80}")
    if not isinstance(arch["loss"], str) or arch["loss"] not in LOSSES:
        raise ShapeError(f"unknown loss {arch['loss']!r:.80}; known: {', '.join(LOSSES)}")
    if not isinstance(arch["dtype"], str) or arch["dtype"] not in DTYPES:
        raise ShapeError(f"dtype must be float32 or float64, got {arch['dtype']!r:.80}")
    if not isinstance(arch.get("meta") or {}, dict):
        raise ShapeError(f"meta must be a JSON object, got {arch['meta']!r:.80}")
    layers = arch["layers"]
    if not isinstance(layers, list) or not layers:
        raise ShapeError("layers must be a non-empty list")
    if len(layers) > MAX_LAYERS:
        raise ShapeError(f"{len(layers):,} layers, more than the {MAX_LAYERS:,} handprop reads")
    for i, spec in enumerate(layers):
        kind = spec.get("type") if isinstance(spec, dict) else None
        if not isinstance(spec, dict) or not isinstance(kind, str):
            raise ShapeError(f"layer {i} must be an object with a 'type', got {spec!r:.80}")
        if kind not in LAYERS:
            raise ShapeError(f"layer {i} has unknown type {kind!r:.80}; known: {', '.join(LAYERS)}")
        params = inspect.signature(LAYERS[kind]).parameters
        for name, value in spec.items():
            if name == "type":
                continue
            if name not in params:
                raise ShapeError(f"layer {i} ({kind}) has unknown setting {name!r:.80}")
            number = _is_int(value) or (
                name == "p" and isinstance(value, float) and math.isfinite(value)
            )
            if not number:
                raise ShapeError(f"layer {i} ({kind}): {name} must be a number, got {value!r:.80}")
        missing = [
            n for n, p in params.items() if p.default is inspect.Parameter.empty and n not in spec
        ]
        if missing:
            raise ShapeError(f"layer {i} ({kind}) needs {', '.join(missing)}")


def _architecture_layers(arch: dict[str, Any]) -> list[Layer]:
    """The layer objects of a checked architecture (no parameters are allocated)."""
    return [
        LAYERS[spec["type"]](**{k: v for k, v in spec.items() if k != "type"})
        for spec in arch["layers"]
    ]


def check_meta(meta: dict[str, Any], net: Network) -> None:
    """The facts ``predict`` relies on: class names, image shape and pixel scale.

    Raises ShapeError naming the first one of the wrong type or size.
    """
    names = meta.get("class_names")
    if names is not None:
        if not isinstance(names, list) or not all(isinstance(n, str) for n in names):
            raise ShapeError(f"class_names must be a list of strings, got {names!r:.80}")
        if len(names) != net.n_classes:
            raise ShapeError(
                f"class_names lists {len(names)} names for the network's {net.n_classes} classes"
            )
    image = meta.get("image_shape")
    if image:
        if (
            not isinstance(image, list)
            or len(image) != 2
            or not all(_is_int(s) and s >= 1 for s in image)
        ):
            raise ShapeError(f"image_shape must be [height, width], got {image!r:.80}")
        if math.prod(image) != math.prod(net.input_shape):
            raise ShapeError(
                f"image_shape {image} does not match the input shape {net.input_shape}"
            )
    pixel_max = meta.get("pixel_max")
    if pixel_max is not None and not (
        isinstance(pixel_max, (int, float))
        and not isinstance(pixel_max, bool)
        and math.isfinite(pixel_max)
        and pixel_max > 0
    ):
        raise ShapeError(f"pixel_max must be a finite number > 0, got {pixel_max!r:.80}")


def save(net: Network, path: str | Path) -> None:
    """Save as .npz: ``params`` (the flat vector) and ``architecture`` (JSON text)."""
    buf = io.BytesIO()
    np.savez(buf, params=net.params, architecture=np.array(json.dumps(net.architecture())))
    atomic_write_bytes(path, buf.getvalue())


def load(path: str | Path) -> Network:
    """Load a model saved by :func:`save`; refuse anything else with a clear message.

    Nothing in the file is trusted: its arrays are read with ``allow_pickle=False`` (a
    pickled object inside one could run code on load), their headers are checked
    before the data is read (a header may claim terabytes), the architecture and the
    metadata are checked value by value, and the parameters must be finite. Every
    fault is a :class:`ModelFileError` (or a :class:`ResourceError` for a model too
    large for this machine) naming the file.
    """
    path = Path(path)
    try:
        if path.is_dir():
            raise ModelFileError(f"{path}: is a folder, not a model file")
        if not path.exists():
            raise ModelFileError(f"{path}: no such model file")
        if not path.is_file():
            raise ModelFileError(f"{path}: not a regular file, not a model file")
        with path.open("rb") as f:
            if f.read(4) not in (b"PK\x03\x04", b"PK\x05\x06"):  # a .npz is a zip archive
                raise ModelFileError(f"{path}: not a readable .npz model file (not a zip archive)")
        with zipfile.ZipFile(path) as zf:
            return _read_model(zf, path)
    except ModelFileError:
        raise
    except ResourceError as exc:
        raise ResourceError(f"{path}: {exc}") from None
    except OSError as exc:
        raise ModelFileError(
            f"{path}: cannot read the model file ({exc.strerror or exc})"
        ) from None
    except (zipfile.BadZipFile, EOFError, zlib.error, ValueError, NotImplementedError) as exc:
        raise ModelFileError(
            f"{path}: not a readable .npz model file (truncated or corrupt: {exc})"
        ) from None


def _npy_header(zf: zipfile.ZipFile, name: str, path: Path) -> tuple[tuple[int, ...], np.dtype]:
    """Shape and dtype of the .npy member ``name``, read from its header only."""
    with zf.open(name + ".npy") as f:
        version = np.lib.format.read_magic(f)
        if version == (1, 0):
            shape, _, dtype = np.lib.format.read_array_header_1_0(f)
        elif version == (2, 0):
            shape, _, dtype = np.lib.format.read_array_header_2_0(f)
        else:
            raise ModelFileError(f"{path}: {name!r} has unsupported .npy version {version}")
    if dtype.hasobject:
        raise ModelFileError(
            f"{path}: {name!r} holds pickled objects, which handprop refuses to load "
            "(a model file holds numbers and JSON text only)"
        )
    return shape, dtype


def _read_model(zf: zipfile.ZipFile, path: Path) -> Network:
    members = {n.removesuffix(".npy") for n in zf.namelist() if n.endswith(".npy")}
    missing = {"params", "architecture"} - members
    if missing:
        raise ModelFileError(f"{path}: not a handprop model, missing {', '.join(sorted(missing))}")

    shape, dtype = _npy_header(zf, "architecture", path)
    if shape != () or dtype.kind != "U":
        raise ModelFileError(f"{path}: 'architecture' must be one JSON string")
    if dtype.itemsize > MAX_ARCHITECTURE_BYTES:
        raise ModelFileError(
            f"{path}: the architecture text is {dtype.itemsize // 4:,} characters long; "
            "a handprop model's is a few thousand"
        )
    with zf.open("architecture.npy") as f:
        arch_text = str(np.lib.format.read_array(f, allow_pickle=False))
    try:
        arch = json.loads(arch_text)
    except json.JSONDecodeError as exc:
        raise ModelFileError(f"{path}: architecture is not valid JSON ({exc})") from None
    except RecursionError:
        raise ModelFileError(f"{path}: architecture JSON is nested too deeply") from None
    if not isinstance(arch, dict) or arch.get("format") != MODEL_FORMAT:
        raise ModelFileError(f"{path}: architecture does not describe a handprop model")
    if arch.get("version") != MODEL_VERSION:
        raise ModelFileError(
            f"{path}: model format version {arch.get('version')!r:.40} is not supported "
            f"(this handprop reads version {MODEL_VERSION})"
        )

    # the parameters' header first: a file may claim more than it holds, or than fits
    shape, dtype = _npy_header(zf, "params", path)
    try:
        _check_architecture(arch)
        layers = _architecture_layers(arch)
        out = chain_shapes(layers, tuple(arch["input_shape"]))
        if len(out) != 1:
            raise ShapeError(f"the output must be one vector of class scores, got shape {out}")
    except HandpropError as exc:
        raise ModelFileError(f"{path}: bad architecture: {exc}") from None
    n_params = sum(math.prod(s) for layer in layers for s in layer.param_shapes().values())
    if shape != (n_params,):
        raise ModelFileError(
            f"{path}: the architecture needs {n_params:,} parameters, "
            f"the file holds an array of shape {shape}"
        )
    if dtype != np.dtype(arch["dtype"]):
        raise ModelFileError(
            f"{path}: parameters are {dtype}, the architecture says {arch['dtype']}"
        )
    try:
        # the memory check comes here, before anything of that size is allocated
        net = Network(
            layers, arch["input_shape"], arch["loss"], arch["dtype"], arch.get("meta") or {}
        )
    except ResourceError:
        raise
    except HandpropError as exc:
        raise ModelFileError(f"{path}: bad architecture: {exc}") from None
    try:
        check_meta(net.meta, net)
    except ShapeError as exc:
        raise ModelFileError(f"{path}: bad metadata: {exc}") from None

    # straight into the network's own vector, a chunk at a time: no second copy
    with zf.open("params.npy") as f:
        _npy_skip_header(f)
        data = memoryview(net.params).cast("B")
        done = 0
        while done < len(data):
            got = f.readinto(data[done : done + READ_CHUNK])
            if not got:
                raise ModelFileError(
                    f"{path}: truncated: the parameters stop after {done:,} of {len(data):,} bytes"
                )
            done += got
        if f.read(1):
            raise ModelFileError(f"{path}: the parameters hold more data than their header says")
    bad = sum(
        int(np.count_nonzero(~np.isfinite(net.params[i : i + 2**20])))
        for i in range(0, net.n_params, 2**20)
    )
    if bad:
        raise ModelFileError(
            f"{path}: {bad:,} of {net.n_params:,} parameters are NaN or infinite; "
            "the model is broken (did its training diverge?)"
        )
    return net


def _npy_skip_header(f: Any) -> None:
    """Read past a .npy header (version 1.0 or 2.0, already checked)."""
    version = np.lib.format.read_magic(f)
    if version == (1, 0):
        np.lib.format.read_array_header_1_0(f)
    else:
        np.lib.format.read_array_header_2_0(f)
