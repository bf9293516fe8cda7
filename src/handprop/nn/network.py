"""Network: a list of layers, one flat parameter vector, one flat gradient vector.

The reference path: ``forward``, ``backward`` and ``train_pass`` are plain loops over
the layers, readable in one sitting; each layer gets what the pass needs as an argument
(a :class:`~handprop.nn.passes.Pass`: training or not, the network's workspace, the
batch's dropout masks). The one layer they do not run alone is a ReLU just before a
max pool, which runs on the pool's output instead (:class:`MaxPoolReLU`).
The layer-spec parser lives in :mod:`handprop.nn.spec`, model files in
:mod:`handprop.nn.modelfile`, and the split of a batch over threads or MPI ranks in
:mod:`handprop.scale.parallel`.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from handprop.errors import ShapeError
from handprop.memory import check_fits
from handprop.nn import backend
from handprop.nn.activations import ACTIVATIONS, ReLU
from handprop.nn.conv import MaxPool2D, MaxPoolReLU
from handprop.nn.init import INITIALIZERS
from handprop.nn.layers import Array, Dense, Dropout, Layer, batch_first, batch_last
from handprop.nn.losses import LOSSES, Loss
from handprop.nn.params import ParamLayout
from handprop.nn.passes import Masks, Pass, Workspace
from handprop.nn.spec import (
    architecture_layers,
    build_layers,
    check_architecture,
    layer_words,
    parse_spec,
)

DTYPES = {"float32": np.float32, "float64": np.float64}

MODEL_FORMAT = "handprop-model"
MODEL_VERSION = 1

#: the most memory the largest array of one inference batch may take
INFERENCE_BYTES = 256 * 2**20
MAX_INFERENCE_BATCH = 8192


def make_loss(loss: str | Loss) -> Loss:
    """The loss named ``loss`` (with its default settings), or ``loss`` itself."""
    if isinstance(loss, Loss):
        return loss
    if loss not in LOSSES:
        raise ShapeError(f"unknown loss {loss!r}; known: {', '.join(LOSSES)}")
    return LOSSES[loss]()


def resolve_dtype(dtype: Any) -> np.dtype:
    """float32 or float64 from a name or a NumPy dtype; anything else is refused."""
    try:
        dt = np.dtype(DTYPES.get(dtype, dtype) if isinstance(dtype, str) else dtype)
    except TypeError:
        dt = None
    if dt not in (np.dtype(np.float32), np.dtype(np.float64)):
        raise ShapeError(f"dtype must be float32 or float64, got {dtype!r}")
    return dt


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


class Network:
    """A feed-forward network whose parameters are views into one flat vector.

    Parameters
    ----------
    layers : list of Layer
    input_shape : tuple of int      shape of one sample, e.g. (784,)
    loss : str or Loss              a name in ``LOSSES``, or a loss made with settings
                                    (``SoftmaxCrossEntropy(smoothing=0.1)``)
    dtype : float32 (default) or float64
    meta : dict, optional           JSON-able facts saved with the model (class names, ...)
    params : ndarray, optional      a parameter vector to share instead of owning one
                                    (the shards of :class:`~handprop.scale.DataParallel` do)
    grads : ndarray, optional       a vector to write the gradient into instead of one of
                                    its own (a worker process's shard writes into memory
                                    it shares: :mod:`handprop.scale.processes`)

    Attributes
    ----------
    params : array of shape (n_params,)     every parameter, layer by layer, W then b
    grads : array of shape (n_params,)      dL/dparams, same layout, written by backward
    layout : ParamLayout
    macs : int                              multiply-adds of one sample's forward pass
    passes : list of int                    the layers the passes run, in order (all
                                            but a ReLU just before a max pool)
    steps : list                            what runs for each of them: the layer, or
                                            for such a pool a :class:`MaxPoolReLU`
    xp : module                             the array namespace of params and grads
                                            (NumPy until :meth:`to` moves them)
    work : Workspace                        the work arrays of its training passes
    rng : Generator                         where the dropout layers' mask keys come
                                            from, one per layer and batch (:meth:`set_rng`)

    The passes are plain loops over the layers; :class:`~handprop.scale.DataParallel`
    splits a batch over threads or MPI ranks around them. A network is built and
    initialised on the host (NumPy, so every backend starts from the same numbers);
    :meth:`to` moves it to a GPU (CuPy) or any array API namespace, where the same
    passes run.
    """

    def __init__(
        self,
        layers: Sequence[Layer],
        input_shape: Sequence[int],
        loss: str | Loss = "cross_entropy",
        dtype: Any = np.float32,
        meta: dict[str, Any] | None = None,
        params: Array | None = None,
        grads: Array | None = None,
    ) -> None:
        self.layers: list[Layer] = list(layers)
        self.input_shape = tuple(int(s) for s in input_shape)
        self.loss: Loss = make_loss(loss)
        self.loss_name = self.loss.kind
        self.dtype = resolve_dtype(dtype)
        self.meta: dict[str, Any] = dict(meta or {})

        self.output_shape = chain_shapes(self.layers, self.input_shape)

        self.layout = ParamLayout([layer.param_shapes() for layer in self.layers])
        self.passes, self.steps = self._plan()
        # where a backward that needs no dL/dX stops: the pass of the first layer with
        # parameters
        self._stop = next(
            (at for at, i in enumerate(self.passes) if self.layers[i].param_shapes()), 0
        )
        self.rng = np.random.default_rng(0)
        #: layer index -> a dropout mask of the whole batch, pinned (gradient checks)
        self.pinned: dict[int, Array] = {}
        self._dropouts = [
            i for i, layer in enumerate(self.layers) if isinstance(layer, Dropout) and layer.p > 0
        ]
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
        for name, vector in (("parameters", params), ("gradients", grads)):
            if vector is not None and (
                vector.shape != (self.layout.size,) or vector.dtype != self.dtype
            ):
                raise ShapeError(
                    f"shared {name} must be a ({self.layout.size},) {self.dtype} vector, "
                    f"got {vector.shape} {vector.dtype}"
                )
        self._bind(params, backend.namespace(params).zeros_like(params) if grads is None else grads)
        shape, self.macs = self.input_shape, 0
        for layer in self.layers:
            self.macs += layer.macs(shape)
            shape = layer.output_shape(shape)
        # (batch, training) of the last pass whose memory was checked
        self._checked: tuple[int, bool] | None = None

    def _plan(self) -> tuple[list[int], list[Any]]:
        """The indices of the layers that the passes run, in order, and what runs for
        each: every layer but a ReLU just before a max pool, which runs with the pool as
        one :class:`MaxPoolReLU` step (the same values and gradients, on k^2 times fewer
        values)."""
        fused = {
            i + 1
            for i, (layer, after) in enumerate(itertools.pairwise(self.layers))
            if isinstance(layer, ReLU) and isinstance(after, MaxPool2D)
        }
        passes = [i for i in range(len(self.layers)) if i + 1 not in fused]
        steps = [MaxPoolReLU(self.layers[i]) if i in fused else self.layers[i] for i in passes]
        return passes, steps

    def _bind(self, params: Array, grads: Array) -> None:
        """Make ``params`` and ``grads`` the flat vectors and every layer's views into them;
        the passes compute in their namespace, into a workspace of its arrays."""
        self.params, self.grads = params, grads
        self.xp = backend.namespace(params)
        self.work = Workspace()
        self._inference = Pass(xp=self.xp)
        self._last = self.context(training=True)  # the training pass a backward follows
        for i, layer in enumerate(self.layers):
            layer.bind(self.layout.views(self.params, i), self.layout.views(self.grads, i))

    def to(self, device: Any) -> Network:
        """Move the parameters (and gradients) to ``device``: "cpu", "cuda" or an array
        API namespace (``array_api_strict``, say); returns the network.

        The flat vectors are copied once and every layer's views rebound, so optimizers
        and reductions keep seeing two flat vectors. "cuda" raises :class:`DeviceError`
        on a machine without a usable GPU or CuPy.
        """
        xp = backend.device_namespace(device) if isinstance(device, str) else device
        if xp is self.xp:
            return self
        params = backend.to_host(self.params)
        self._bind(backend.asarray(params, xp), xp.zeros_like(backend.asarray(params, xp)))
        return self

    @property
    def device(self) -> str:
        """ "cpu" (NumPy), "cuda" (CuPy) or the name of the array namespace."""
        return backend.device_name(self.xp)

    # -- construction ------------------------------------------------------------------

    @classmethod
    def from_spec(
        cls,
        spec: str | Sequence[int],
        activation: str | Sequence[str] = "sigmoid",
        loss: str | Loss = "cross_entropy",
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
        out_act = make_loss(loss).output_activation
        layers: list[Layer] = []
        for i, (d_in, d_out) in enumerate(itertools.pairwise(sizes)):
            layers.append(Dense(d_in, d_out))
            if i < n_hidden:
                layers.append(ACTIVATIONS[acts[i]]())
                if drops[i] > 0:
                    layers.append(Dropout(drops[i]))
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
        loss: str | Loss = "cross_entropy",
        init: str = "he_normal",
        dtype: Any = np.float32,
        rng: np.random.Generator | int | None = 0,
        meta: dict[str, Any] | None = None,
    ) -> Network:
        """Build any network from a list of layer items, e.g. a small CNN on (1, 28, 28):
        ["conv 32 3", "relu", "maxpool 2", "conv 64 3", "relu", "maxpool 2",
        "dense 128", "relu", "dropout 0.5"]; the output layer is appended."""
        layers = build_layers(items, input_shape, n_classes, make_loss(loss).kind)
        net = cls(layers, input_shape, loss=loss, dtype=dtype, meta=meta)
        net.init(init, rng)
        return net

    def init(self, scheme: str = "uniform", rng: np.random.Generator | int | None = 0) -> None:
        """(Re)initialise every parameter in place: weights by ``scheme``, biases to 0."""
        if scheme not in INITIALIZERS:
            raise ShapeError(f"unknown init {scheme!r}; known: {', '.join(INITIALIZERS)}")
        rng = np.random.default_rng(rng)
        device = self.xp
        self.to(np)  # drawn on the host: every backend starts from the same numbers
        for layer in self.layers:
            layer.init_params(scheme, rng)
        self.to(device)

    def set_rng(self, rng: np.random.Generator) -> None:
        """The generator the keys of the dropout layers' masks are drawn from."""
        self.rng = rng

    def pin_masks(self, masks: dict[int, Array]) -> None:
        """Pin dropout masks: layer index -> the keep-mask (n, ...) of every batch of n
        rows to come, instead of masks drawn per batch (a gradient check's evaluations
        must all see the same masks). ``{}`` unpins."""
        self.pinned = dict(masks)

    # -- pass contexts -----------------------------------------------------------------

    def context(self, training: bool = False, **options: Any) -> Pass:
        """A pass over this network: its array namespace, and in training its workspace
        (or the ``work`` given: a CUDA graph's own); ``options`` are the other fields of
        :class:`Pass` (``masks``, ``batch_sums``, ``momentum``...). Without ``masks``
        dropout keeps every unit."""
        if not training and not options:
            return self._inference
        work = options.pop("work", self.work if training else None)
        return Pass(training, self.xp, work, **options)

    def dropout_keys(self) -> dict[int, int | Array]:
        """One batch's dropout masks: for each dropout layer (by index), the key of its
        mask drawn from :attr:`rng`, in layer order, or its pinned mask."""
        return {
            i: self.pinned[i] if i in self.pinned else int(self.rng.integers(2**63))
            for i in self._dropouts
        }

    def masks(self, keys: dict[int, int | Array], n: int, lo: int = 0) -> Masks | None:
        """Rows [lo, ...) of a batch of ``n`` rows' dropout masks (:meth:`dropout_keys`)
        for this network's layers; None when it has no dropout layers."""
        if not keys:
            return None
        return Masks({id(self.layers[i]): key for i, key in keys.items()}, n, lo)

    def training_context(self, n: int, **options: Any) -> Pass:
        """A training pass over a batch of ``n`` rows, this network alone: fresh masks."""
        return self.context(True, masks=self.masks(self.dropout_keys(), n), **options)

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
        (an optimizer's moments: 1 for momentum, 2 for Adam; a gradient vector per
        data-parallel shard), and :meth:`work_bytes`. Call it before the first pass,
        e.g. with the training batch size, so that a too-large batch is one clear line
        and not an out-of-memory kill midway.
        """
        nbytes = (2 + state_vectors) * self.n_params * self.dtype.itemsize
        what = "training" if training else "running"
        check_fits(
            nbytes + self.work_bytes(batch, training),
            f"{what} {self.describe()} on batches of {batch:,} samples",
        )

    def check_pass(self, batch: int, training: bool) -> None:
        """:meth:`check_memory` once per new batch size, before the first pass of it: the
        entry points that run a batch as one pass call it (not a shard, whose network
        shares the parameters: the network that owns them checks)."""
        if self._owner and self._checked != (batch, training):
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
        words = [layer_words(layer) for layer in self.layers]
        text = ", ".join(words)
        if len(text) > 120:
            text = text[:117] + "..."
        return f"the network on {self.input_shape} inputs: {text}"

    # -- passes ------------------------------------------------------------------------

    def here(self, A: Array) -> Array:
        """``A`` on the network's device: a NumPy array is copied there (once per call:
        a training loop moves its data once and passes device arrays)."""
        if self.xp is not np and isinstance(A, np.ndarray):
            return backend.asarray(A, self.xp)
        return A

    def check_input(self, X: Array) -> Array:
        """X with shape (n, *input_shape) cast to the network's dtype (once, here).

        X stays in its namespace: a NumPy array (anything array-like becomes one) or an
        array already on the network's device."""
        xp = backend.namespace(X) if hasattr(X, "__array_namespace__") else np
        X = np.asarray(X) if xp is np else X
        if X.ndim != len(self.input_shape) + 1 or tuple(X.shape[1:]) != self.input_shape:
            raise ShapeError(
                f"input of shape {tuple(X.shape)} does not fit this network, which expects "
                f"(n, {', '.join(map(str, self.input_shape))})"
            )
        if not xp.isdtype(X.dtype, ("integral", "real floating")):
            raise ShapeError(f"input must be numeric, got dtype {X.dtype}")
        if xp is np:
            return X.astype(self.dtype, copy=False)
        return xp.astype(X, backend.dtype_of(xp, self.dtype), copy=False)

    def check_labels(self, y: Array, n: int) -> Array:
        """Integer class ids of shape (n,) in [0, n_classes) (NumPy or on the device)."""
        xp = backend.namespace(y) if hasattr(y, "__array_namespace__") else np
        y = np.asarray(y) if xp is np else y
        if tuple(y.shape) != (n,):
            raise ShapeError(f"labels must have shape ({n},), got {tuple(y.shape)}")
        if not xp.isdtype(y.dtype, "integral"):
            raise ShapeError(f"labels must be integer class ids, got dtype {y.dtype}")
        low, high = (int(xp.min(y)), int(xp.max(y))) if n else (0, 0)
        if n and (low < 0 or high >= self.n_classes):
            raise ShapeError(
                f"labels must lie in [0, {self.n_classes}), got values from {low} to {high}"
            )
        return y

    def forward(self, X: Array, training: bool = False, ctx: Pass | None = None) -> Array:
        """Output (n, k) for input (n, *input_shape): logits for cross-entropy.

        ``training`` makes each layer keep what its backward pass needs (and dropout
        drop units, with masks drawn for this batch); inference keeps nothing. ``ctx``:
        the pass to run instead (:meth:`context`), e.g. a shard's rows of a batch.
        """
        if ctx is None:
            ctx = self.training_context(X.shape[0]) if training else self._inference
        if ctx.training:
            self._last = ctx
        A = self.layer_input(self.here(X), ctx)
        for step in self.steps:
            A = step.forward(A, ctx)
        return A

    def layer_input(self, X: Array, ctx: Pass | None = None) -> Array:
        """X (n, *input_shape) as the first layer takes it: images (n, c, h, w) as an
        image batch (c, h, w, n), the layout of the layers that follow
        (:mod:`handprop.nn.conv`); any other input as it is."""
        if X.ndim != 4:
            return X
        ctx = self._inference if ctx is None else ctx
        n, c, h, w = X.shape
        out = ctx.buffer(self, "X", (c, h, w, n), X.dtype) if ctx.training else None
        return batch_last(X, out=out)

    @staticmethod
    def sample_first(A: Array) -> Array:
        """A layer's output with its samples first: an image batch (c, h, w, n) as
        (n, c, h, w) (a copy); rows (n, ...) as they are."""
        return batch_first(A) if A.ndim == 4 else A

    def backward(self, G: Array, input_grad: bool = False, ctx: Pass | None = None) -> Array | None:
        """Backpropagate G = dL/d(output) through the layers, last to first; fills
        ``self.grads``. ``ctx``: the training pass it follows (default: the last one).

        Returns dL/dX when ``input_grad`` is true. Otherwise the pass stops at the
        first layer with parameters and skips its input gradient: training never needs
        dL/dX, and for 784-100-10 it is a third of the epoch's matrix products.
        """
        ctx = self._last if ctx is None else ctx
        stop = 0 if input_grad else self._stop
        for at in range(len(self.steps) - 1, stop - 1, -1):
            G = self.steps[at].backward(G, ctx, input_grad or at > stop)
        return self.sample_first(G) if input_grad else None

    def train_pass(
        self, X: Array, y: Array, count: int | None = None, ctx: Pass | None = None
    ) -> tuple[float, Array]:
        """Forward (training), loss and backward over (X, y): fills ``grads``, returns
        the loss and the network's output.

        ``count``: divide the loss by this many samples instead of ``len(X)`` (a
        data-parallel shard's rows are part of a larger batch, and its loss and
        gradient are its share of that batch's). ``ctx``: the training pass to run
        (default: :meth:`training_context`).
        """
        self.check_pass(X.shape[0], training=True)
        ctx = self.training_context(X.shape[0]) if ctx is None else ctx
        out = self.forward(X, ctx=ctx)
        loss, G = self.loss(out, self.here(y), count=count)
        self.backward(G, ctx=ctx)
        return loss, out

    def loss_and_grad(self, X: Array, y: Array) -> float:
        """One forward and backward pass over (X, y); returns the loss, fills ``grads``.

        X and y are taken as they are (see :meth:`check_input`, :meth:`check_labels`
        for validation at the boundary).
        """
        return self.train_pass(X, y)[0]

    def loss_value(self, X: Array, y: Array, training: bool = False) -> float:
        """The loss over (X, y) without a backward pass."""
        self.check_pass(X.shape[0], training)
        return self.loss.value(self.forward(X, training=training), self.here(y))

    def inference_batch(self) -> int:
        """Samples per inference batch: as many as keep the largest work array of one
        forward pass (a CNN's im2col columns) within ``INFERENCE_BYTES``, at most 8192."""
        shape, per_sample = self.input_shape, 1
        for layer in self.layers:
            per_sample = max(per_sample, layer.work_size(shape))
            shape = layer.output_shape(shape)
        fit = INFERENCE_BYTES // (per_sample * self.dtype.itemsize)
        return int(min(MAX_INFERENCE_BATCH, max(1, fit)))

    def predict_proba(
        self,
        X: Array,
        batch_size: int | None = None,
        forward: Callable[[Array], Array] | None = None,
    ) -> Array:
        """Class probabilities (n, k) as a NumPy array, computed batch by batch to bound
        memory (``batch_size`` samples at a time; by default :meth:`inference_batch`).
        ``forward``: the inference pass to use (a DataParallel's; default: this one's)."""
        X = self.check_input(X)
        batch_size = batch_size or self.inference_batch()
        if forward is None:  # this network's passes (a DataParallel's check their batches)
            forward = self.forward
            self.check_pass(min(batch_size, X.shape[0]), training=False)
        out = np.empty((X.shape[0], self.n_classes), dtype=self.dtype)
        for start in range(0, X.shape[0], batch_size):
            stop = start + batch_size
            batch = backend.asarray(X[start:stop], self.xp)  # to the device, batch by batch
            out[start:stop] = backend.to_host(self.loss.probabilities(forward(batch)))
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
        check_architecture(arch)
        return cls(
            architecture_layers(arch),
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
