"""The layer protocol, the affine (Dense), Flatten and Dropout layers, and the layout of
a batch: rows (n, ...) everywhere but between image layers, where a batch of images is
(c, h, w, n), the sample index last (see :mod:`handprop.nn.conv`)."""

from __future__ import annotations

import inspect
from dataclasses import dataclass
from math import prod
from typing import Any, ClassVar

import numpy as np

from handprop.errors import ShapeError
from handprop.nn import backend as ops
from handprop.nn import checks, kernels
from handprop.nn.passes import INFERENCE, Pass

#: an array of the network's namespace (NumPy, CuPy, ...)
Array = Any


def batch_size(A: Array) -> int:
    """The number of samples in a batch: the last axis of an image batch (c, h, w, n),
    the first of any other."""
    return A.shape[-1] if A.ndim == 4 else A.shape[0]


def batch_last(X: Array, out: Array | None = None) -> Array:
    """Images (n, c, h, w) as an image batch (c, h, w, n): a C-ordered copy (into
    ``out`` when given)."""
    return _transposed(X, (1, 2, 3, 0), out)


def batch_first(A: Array, out: Array | None = None) -> Array:
    """An image batch (c, h, w, n) as images (n, c, h, w): a C-ordered copy."""
    return _transposed(A, (3, 0, 1, 2), out)


def _transposed(A: Array, axes: tuple[int, ...], out: Array | None) -> Array:
    view = ops.namespace(A).permute_dims(A, axes)
    if out is None:
        return ops.copy(view)
    ops.copyto(out, view)
    return out


@dataclass(frozen=True)
class Setting:
    """One value of a layer-spec item: ``conv 32 3 stride=2`` sets c_out, k and stride.

    name : str            the constructor's argument, and its key in a model file
    type : int or float   what the item's text is read as, what a model file may hold
    required : bool       an item must give it (``conv 32`` lacks k). Written back
                          positionally; an optional setting as name=value, and only
                          when it differs from its default
    default_from : str    the setting whose value is this one's default (a pool's
                          stride is its k), where the constructor's default is None
    """

    name: str
    type: type = int
    required: bool = False
    default_from: str | None = None


@dataclass(frozen=True)
class ItemSpec:
    """How a layer-spec item names a layer kind, and how the shapes complete it.

    word : str                   the item's first word ("conv" for conv2d)
    settings : tuple of Setting  the values after it: positional, in this order, or
                                 name=value
    input_size : str or None     the constructor argument that the input's first
                                 dimension fills (dense's d_in, conv's c_in): an item
                                 never repeats a size the shapes already give
    flat_input : bool            a Flatten goes in before it on image inputs (dense)
    image_input : bool           it needs image inputs (c, h, w) (conv)
    """

    word: str
    settings: tuple[Setting, ...] = ()
    input_size: str | None = None
    flat_input: bool = False
    image_input: bool = False


#: layer kind -> class: every Layer subclass that names its own ``kind`` (in the order
#: they are defined); config items, model files and export resolve through it
LAYERS: dict[str, type[Layer]] = {}


class Layer:
    """A differentiable map with explicit forward and backward passes.

    A layer declares the shapes of its parameters (:meth:`param_shapes`); the network
    allocates one flat parameter vector and one flat gradient vector and binds views
    into them with :meth:`bind` (``self.W``, ``self.dW``, ...). ``backward`` writes the
    parameter gradients into those views (overwriting, never accumulating) and returns
    the gradient with respect to the layer's input. It never updates the parameters.

    What a pass needs beyond X, G and the parameters (training or not, the array
    namespace, the work arrays to write into, dropout masks, batch-wide sums) arrives
    in ``ctx`` (:class:`~handprop.nn.passes.Pass`); a layer keeps on itself only what
    its forward leaves for its backward, and nothing else writes its attributes.
    """

    #: name in the layer registry and in model files
    kind: str = ""

    # -- what a layer kind says of itself (read by spec, export, diagnostics, figures,
    # the page); a class that names its own ``kind`` joins LAYERS (__init_subclass__)

    #: its layer-spec item ("conv 32 3 stride=2"); a kind without one is its word alone
    spec: ClassVar[ItemSpec] = ItemSpec("")
    #: an elementwise activation: diagnostics and the page report it as the activation
    #: of the layer with parameters before it
    is_activation: ClassVar[bool] = False
    #: a unit that is 0 on every row of a batch passes back no gradient (ReLU); the
    #: diagnostics count such units as dead
    has_dead_units: ClassVar[bool] = False
    #: what the page shows of it as the network's first layer with parameters: "units"
    #: (the most active outputs, each with its input weights as an image) or "maps" (its
    #: output feature maps); None: nothing
    first_layer_view: ClassVar[str | None] = None
    #: the ONNX operator the default :meth:`onnx` applies to the input, no attributes
    onnx_op: ClassVar[str | None] = None

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

    def forward(self, X: Array, ctx: Pass = INFERENCE) -> Array:
        """The output for X; a training ``ctx`` also keeps what backward needs."""
        raise NotImplementedError

    def backward(self, G: Array, ctx: Pass, need_input_grad: bool = True) -> Array | None:
        """Parameter gradients into ``d<name>``; returns dL/dX, or None when the
        caller says it is not needed (the first layer: nothing consumes dL/dX there).
        ``ctx``: the pass of the forward call it follows."""
        raise NotImplementedError

    def init_params(self, scheme: str, rng: np.random.Generator) -> None:
        """Fill this layer's parameters in place (no-op for parameter-free layers)."""

    def get_config(self) -> dict[str, Any]:
        """JSON-able constructor arguments; ``{"type": kind, **config}`` rebuilds it."""
        return {}

    def __init_subclass__(cls, **kwargs: Any) -> None:
        """A class that names its own ``kind`` joins :data:`LAYERS` (one without its own
        ``spec`` is its kind's word alone): a new layer kind is one class."""
        super().__init_subclass__(**kwargs)
        kind = cls.__dict__.get("kind")
        if not kind:
            return
        if "spec" not in cls.__dict__:
            cls.spec = ItemSpec(kind)
        args = inspect.signature(cls).parameters
        spec = cls.spec
        for name in [s.name for s in spec.settings] + [spec.input_size or ""]:
            if name and name not in args:
                raise TypeError(f"{cls.__name__}.spec names {name!r}, not an argument of it")
        for other in LAYERS.values():
            same = (other.__module__, other.__qualname__) == (cls.__module__, cls.__qualname__)
            if not same and (other.kind == kind or other.spec.word == spec.word):
                raise TypeError(
                    f"{cls.__name__}: layer kind {kind!r} (word {spec.word!r}) is taken by "
                    f"{other.__module__}.{other.__qualname__}"
                )
        LAYERS[kind] = cls  # a class defined again (a reloaded module) replaces itself

    @staticmethod
    def slope(A: Array) -> Array | None:
        """dA/dZ from the output A, for an activation whose slope fades at the ends
        (sigmoid: A (1 - A)); the diagnostics count outputs where it is below 0.01 as
        saturated. None: it does not saturate."""
        return None

    def short_name(self) -> str:
        """The layer with its sizes, for diagnostics rows and figure legends."""
        return self.kind

    def weight_images(
        self, image_shape: tuple[int, ...], n: int | None = None
    ) -> tuple[Array, str] | None:
        """The first ``n`` (default all) of its weights as images, (m, h, w), and what
        they are in words, for the first-layer figure and the page; None when they are
        not images of inputs of ``image_shape`` (h, w)."""
        return None

    def onnx(self, graph: Any, label: str) -> None:
        """Add its inference form to an ONNX graph (:class:`handprop.export.OnnxGraph`):
        ``graph.current`` names its input, ``graph.weight(array, name)`` adds an
        initializer and returns its name, ``graph.node(op, inputs, label, **attributes)``
        adds a node whose output becomes ``graph.current``; no node: the identity. The
        default applies ``onnx_op``. The builder imports onnx, never nn."""
        graph.node(self.onnx_op, [graph.current], label)

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v!r}" for k, v in self.get_config().items())
        return f"{type(self).__name__}({args})"


class Dense(Layer):
    """Affine map Z = X @ W + b.   X: (n, d_in)  W: (d_in, d_out)  b: (d_out,)"""

    kind = "dense"
    spec = ItemSpec("dense", (Setting("d_out", required=True),), input_size="d_in", flat_input=True)
    first_layer_view = "units"

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

    def forward(self, X: Array, ctx: Pass = INFERENCE) -> Array:
        if ctx.training:
            self._X = X  # all that backward needs
            Z = ops.matmul(X, self.W, out=ctx.buffer(self, "Z", (X.shape[0], self.d_out), X.dtype))
        else:
            Z = X @ self.W  # (n, d_out)
        Z += self.b
        return Z

    def backward(self, G: Array, ctx: Pass, need_input_grad: bool = True) -> Array | None:
        """G = dL/dZ (n, d_out) -> dL/dX (n, d_in)."""
        ops.matmul(self._X.T, G, out=self.dW)  # dW = X^T G      (d_in, d_out)
        ops.sum(G, axis=0, out=self.db)  # db = sum_rows G (d_out,)
        if not need_input_grad:
            return None  # skips a GEMM as large as the forward one
        dX = ctx.buffer(self, "dX", self._X.shape, G.dtype)
        return ops.matmul(G, self.W.T, out=dX)  # dX = G W^T      (n, d_in)

    def init_params(self, scheme: str, rng: np.random.Generator) -> None:
        from handprop.nn.init import INITIALIZERS

        INITIALIZERS[scheme](self.W, fan_in=self.d_in, fan_out=self.d_out, rng=rng)
        self.b[...] = 0

    def get_config(self) -> dict[str, Any]:
        return {"d_in": self.d_in, "d_out": self.d_out}

    def short_name(self) -> str:
        return f"dense {self.d_in}-{self.d_out}"

    def weight_images(
        self, image_shape: tuple[int, ...], n: int | None = None
    ) -> tuple[Array, str] | None:
        """Unit j's weights on every pixel, for a layer on flattened images."""
        if not image_shape or prod(image_shape) != self.d_in:
            return None
        W = self.W.T[:n].reshape(-1, *image_shape)  # (m, h, w)
        return W, f"the input weights of {len(W)} of {self.d_out} hidden units"

    def onnx(self, graph: Any, label: str) -> None:
        W, b = graph.weight(self.W, f"{label}.W"), graph.weight(self.b, f"{label}.b")
        graph.node("Gemm", [graph.current, W, b], label)  # X @ W + b, W as stored


class Flatten(Layer):
    """Each sample's values as one row: (n, ...) -> (n, prod(...)); backward restores the
    input's shape. An image batch (c, h, w, n) becomes rows (n, c h w) in (channel, row,
    column) order, those of the images (n, c, h, w) reshaped: one transposing copy."""

    kind = "flatten"

    def onnx(self, graph: Any, label: str) -> None:
        graph.node("Flatten", [graph.current], label, axis=1)

    def output_shape(self, input_shape: tuple[int, ...]) -> tuple[int, ...]:
        return (prod(input_shape),)  # Python ints: exact however large

    def forward(self, X: Array, ctx: Pass = INFERENCE) -> Array:
        xp = ctx.xp
        if ctx.training:
            self._shape = X.shape
        if X.ndim != 4:
            return xp.reshape(X, (X.shape[0], -1))
        c, h, w, n = X.shape
        rows = ctx.buffer(self, "rows", (n, c, h, w), X.dtype) if ctx.training else None
        return xp.reshape(batch_first(X, out=rows), (n, -1))

    def backward(self, G: Array, ctx: Pass, need_input_grad: bool = True) -> Array:
        """dX = G reshaped to the input's shape (and layout)."""
        xp = ctx.xp
        if len(self._shape) != 4:
            return xp.reshape(G, self._shape)
        c, h, w, n = self._shape
        dX = ctx.buffer(self, "dX", self._shape, G.dtype)
        return batch_last(xp.reshape(G, (n, c, h, w)), out=dX)


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
    inference needs no rescaling. Each batch's mask is :func:`keep_mask` of one key,
    which the network draws per batch from its generator (seeded per epoch by the
    training loop, so a resumed run draws the same masks) and hands over in the pass's
    ``ctx.masks``: a worker that holds rows [lo, lo + m) of a batch of n rows draws only
    its rows of that batch's mask, so a run is the same on any number of threads or
    ranks. A gradient check pins a mask instead. Masks are drawn on the host and moved
    to the pass's namespace, so every backend draws the same masks. A training pass
    without masks (batchnorm recalibration, the page's saliency) keeps every unit. On an
    image batch (c, h, w, n) the mask is drawn for the images (n, c, h, w) and turned
    batch-last: the same mask whatever the layout.
    """

    kind = "dropout"
    spec = ItemSpec("dropout", (Setting("p", float, required=True),))

    def onnx(self, graph: Any, label: str) -> None:
        """No node: the identity at inference."""

    def __init__(self, p: float = 0.5) -> None:
        self.p = checks.in_interval("dropout probability", float(p), 0, 1)

    def forward(self, X: Array, ctx: Pass = INFERENCE) -> Array:
        if not ctx.training or ctx.masks is None or self.p == 0:
            self._M = None
            return X
        xp, masks = ctx.xp, ctx.masks
        # this worker's rows [lo, lo + m) of the batch's mask: drawn from its key, or
        # those rows of a pinned mask
        images = X.ndim == 4  # (c, h, w, n): the mask is drawn (n, c, h, w), then turned
        sample = X.shape[:3] if images else X.shape[1:]
        key, lo, hi = masks.key(self), masks.lo, masks.lo + batch_size(X)
        if isinstance(key, int):
            mask = keep_mask(key, self.p, (masks.n, *sample), lo, hi)
        else:
            mask = key[lo:hi, ...]
        if images:
            mask = batch_last(mask)
        # M = mask / (1 - p) and A = X * M, into work arrays kept for the next batch of
        # the same shape (no fresh arrays, no page faults per step)
        M = ctx.buffer(self, "M", X.shape, X.dtype)
        A = ctx.buffer(self, "A", X.shape, X.dtype)
        self._M, A = kernels.dropout(X, ops.asarray(mask, xp), 1.0 / (1.0 - self.p), M, A)
        return A

    def backward(self, G: Array, ctx: Pass, need_input_grad: bool = True) -> Array:
        """dX = G * M / (1 - p)."""
        if self._M is None:
            return G
        return ops.multiply(G, self._M, out=ctx.buffer(self, "dX", G.shape, G.dtype))

    def get_config(self) -> dict[str, Any]:
        return {"p": self.p}
