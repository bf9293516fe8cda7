"""Convolution and pooling, backward passes by hand, on image batches stored batch-last.

Layout: between image layers, a batch of n images of c channels of h x w values is one
array (c, h, w, n), the sample index last (the layout of cuda-convnet). The network
turns its input (n, c, h, w) around once (:func:`~handprop.nn.layers.batch_last`) and
``Flatten`` turns the last maps back into rows (n, c h w). In this layout the values
under one window offset (i, j) of every window of every image are the strided slice
``X[:, i::s, j::s, :]`` (:func:`offset`), whose inner run is n contiguous values, and
with stride 1 a whole row of w_out n values: col2im and the pools loop over the k * k
window offsets, each offset one long NumPy pass, and im2col is one copy of a strided
view (:func:`windows`). In the sample-first layout (n, c, h, w) those runs were w_out
(12 for a 24 x 24 map) values long, and a convolution's product had to be transposed on
its way in and out (fast99.toml's training step on 128 images, one thread: 22 ms
before, 15.5 ms with this layout).

Conv2D is lowered to one matrix product for the whole batch (im2col): each k x k x c_in
patch of the padded input becomes a column of ``cols`` (c_in k k, h_out w_out n), and
the convolution is ``W_mat @ cols`` with ``W_mat`` (c_out, c_in k k), whose result is
already the output (c_out, h_out, w_out, n). The backward pass is two more products and
col2im, the scatter-add of the patch gradients back onto the overlapping input
positions, done as the k * k strided additions that mirror the copies.

Everything here is written against the array API standard (``xp`` is the namespace of
the arrays: NumPy, CuPy, array-api-strict...): strided slices and ``xp.reshape``; the
copies and products that NumPy runs fastest into an existing array go through
:mod:`handprop.nn.backend` (``out=``).
"""

from __future__ import annotations

from math import prod
from typing import Any

import numpy as np

from handprop.errors import ShapeError
from handprop.nn import backend as ops
from handprop.nn import kernels
from handprop.nn.layers import Array, ItemSpec, Layer, Setting
from handprop.nn.passes import INFERENCE, Pass


def out_size(size: int, k: int, stride: int, pad: int) -> int:
    """Output length of a k-wide window moved by ``stride`` over ``size + 2 pad``."""
    return (size + 2 * pad - k) // stride + 1


def grid(i: int, j: int, ho: int, wo: int, stride: int) -> tuple[slice, ...]:
    """The index of the input element at offset (i, j) of every window: ``X[grid(...)]``
    is a (c, ho, wo, n) strided view of X (c, h, w, n). Each slice stops just after its
    last element (the standard leaves stops past the end unspecified)."""
    return (
        slice(None),
        slice(i, i + stride * (ho - 1) + 1, stride),
        slice(j, j + stride * (wo - 1) + 1, stride),
        slice(None),
    )


def offset(X: Array, i: int, j: int, ho: int, wo: int, stride: int) -> Array:
    """View (c, ho, wo, n) of the input element at offset (i, j) of every window."""
    return X[grid(i, j, ho, wo, stride)]


def padded(X: Array, pad: int, out: Array | None = None) -> Array:
    """X (c, h, w, n) with ``pad`` zeros on each side of its rows and columns (X itself
    when pad is 0), into ``out`` (c, h + 2 pad, w + 2 pad, n) when given."""
    if not pad:
        return X
    c, h, w, n = X.shape
    if out is None:
        out = ops.namespace(X).zeros((c, h + 2 * pad, w + 2 * pad, n), dtype=X.dtype)
    else:  # a work array from an earlier pass: only its border must be zeroed
        out[:, :pad, ...] = 0
        out[:, pad + h :, ...] = 0
        out[:, pad : pad + h, :pad, :] = 0
        out[:, pad : pad + h, pad + w :, :] = 0
    ops.copyto(out[:, pad : pad + h, pad : pad + w, :], X)
    return out


def _view(A: Array, shape: tuple[int, ...]) -> Array:
    """A reshaped WITHOUT a copy (an error if it needs one): a view that ``out=`` or a
    write may target, such as a parameter's gradient in the flat gradient vector."""
    return ops.namespace(A).reshape(A, shape, copy=False)


def windows(Xp: Array, k: int, ho: int, wo: int, stride: int) -> Array | None:
    """The view (c, k, k, h_out, w_out, n) of the padded input Xp (c, h, w, n) whose
    element [ch, ki, kj, y, x, i] is Xp[ch, y stride + ki, x stride + kj, i]: every
    window of every image, without a copy, as strides over Xp's memory (NumPy and
    CuPy; None in a namespace without ``as_strided``)."""
    tricks = getattr(ops.namespace(Xp), "lib", None)
    as_strided = getattr(getattr(tricks, "stride_tricks", None), "as_strided", None)
    if as_strided is None:
        return None
    c, _, _, n = Xp.shape
    sc, sh, sw, sn = Xp.strides
    shape = (c, k, k, ho, wo, n)
    return as_strided(Xp, shape, (sc, sh, sw, stride * sh, stride * sw, sn))


def im2col(
    X: Array, k: int, stride: int, pad: int, out: Array | None = None, work: Array | None = None
) -> tuple:
    """cols (c k k, h_out w_out n) of X (c, h, w, n), and h_out, w_out.

    Row (channel, ki, kj), column (y, x, image): the input element under window offset
    (ki, kj) of output (y, x) of that image, so that ``W_mat @ cols`` convolves the
    whole batch. It is one copy of the padded input's :func:`windows` view (into
    ``work`` when given), or k * k strided copies, one per window offset, where the
    namespace has no strided views; into ``out`` when given."""
    xp = ops.namespace(X)
    c, h, w, n = X.shape
    ho, wo = out_size(h, k, stride, pad), out_size(w, k, stride, pad)
    Xp = padded(X, pad, work)
    cols = xp.empty((c, k, k, ho, wo, n), dtype=X.dtype) if out is None else out
    cols = xp.reshape(cols, (c, k, k, ho, wo, n))
    view = windows(Xp, k, ho, wo, stride)
    if view is not None:
        ops.copyto(cols, view)
    else:
        for i in range(k):
            for j in range(k):
                ops.copyto(cols[:, i, j, ...], offset(Xp, i, j, ho, wo, stride))
    return xp.reshape(cols, (c * k * k, ho * wo * n)), ho, wo


def col2im(
    dcols: Array,
    shape: tuple[int, int, int, int],
    k: int,
    stride: int,
    pad: int,
    out: Array | None = None,
) -> Array:
    """Adjoint of :func:`im2col`: dX (c, h, w, n) from dcols (c k k, h_out w_out n).

    Each window offset's rows of dcols are added back onto the input positions they
    were copied from, in a padded (c, h + 2 pad, w + 2 pad, n) sum (``out`` when given);
    dX is its middle."""
    xp = ops.namespace(dcols)
    c, h, w, n = shape
    ho, wo = out_size(h, k, stride, pad), out_size(w, k, stride, pad)
    D = xp.reshape(dcols, (c, k, k, ho, wo, n))
    if out is None:
        dXp = xp.zeros((c, h + 2 * pad, w + 2 * pad, n), dtype=dcols.dtype)
    else:  # a work array from an earlier pass
        dXp = out
        dXp[...] = 0
    for i in range(k):
        for j in range(k):
            # window offset (i, j) of every output position lands on a strided grid
            dXp[grid(i, j, ho, wo, stride)] += D[:, i, j, ...]
    return dXp[:, pad : pad + h, pad : pad + w, :] if pad else dXp


class Conv2D(Layer):
    """Z[o] = sum_c W[o, c] (*) X[c] + b[o]  (cross-correlation, as in every framework).

    X: (c_in, h, w, n)   W: (c_out, c_in, k, k)   b: (c_out,)   Z: (c_out, h_out, w_out, n)

    The whole batch is one product, ``Z = W_mat @ cols + b`` with W_mat (c_out, c_in k k)
    and cols (c_in k k, h_out w_out n) (:func:`im2col`); the backward pass is two
    products of the same size and :func:`col2im`.
    """

    kind = "conv2d"
    spec = ItemSpec(
        "conv",
        (
            Setting("c_out", required=True),
            Setting("k", required=True),
            Setting("stride"),
            Setting("pad"),
        ),
        input_size="c_in",
        image_input=True,
    )
    first_layer_view = "maps"

    def __init__(self, c_in: int, c_out: int, k: int, stride: int = 1, pad: int = 0) -> None:
        self.c_in, self.c_out, self.k = int(c_in), int(c_out), int(k)
        self.stride, self.pad = int(stride), int(pad)
        if min(self.c_in, self.c_out, self.k, self.stride) < 1 or self.pad < 0:
            raise ShapeError(
                f"conv2d needs channels, kernel and stride >= 1 and padding >= 0, got "
                f"c_in={c_in}, c_out={c_out}, k={k}, stride={stride}, pad={pad}"
            )

    def param_shapes(self) -> dict[str, tuple[int, ...]]:
        return {"W": (self.c_out, self.c_in, self.k, self.k), "b": (self.c_out,)}

    def output_shape(self, input_shape: tuple[int, ...]) -> tuple[int, ...]:
        if len(input_shape) != 3 or input_shape[0] != self.c_in:
            raise ShapeError(
                f"{self!r} expects inputs of shape ({self.c_in}, h, w), got {input_shape}"
            )
        _, h, w = input_shape
        ho, wo = (
            out_size(h, self.k, self.stride, self.pad),
            out_size(w, self.k, self.stride, self.pad),
        )
        if ho < 1 or wo < 1:
            raise ShapeError(f"{self!r} does not fit an input of {h}x{w}")
        return (self.c_out, ho, wo)

    def macs(self, input_shape: tuple[int, ...]) -> int:
        c_out, ho, wo = self.output_shape(input_shape)
        return c_out * self.c_in * self.k * self.k * ho * wo

    def work_size(self, input_shape: tuple[int, ...]) -> int:
        """The largest two work arrays alive at once in an inference pass: the columns
        (c_in k k per output position) and the output."""
        c_out, ho, wo = self.output_shape(input_shape)
        return (self.c_in * self.k * self.k + c_out) * ho * wo

    def forward(self, X: Array, ctx: Pass = INFERENCE) -> Array:
        xp = ctx.xp
        c, h, w, n = X.shape
        _, ho, wo = self.output_shape((c, h, w))
        patch, m = self.c_in * self.k * self.k, ho * wo * n
        cols, Z, Xp = None, None, None
        if ctx.training:  # work arrays kept from batch to batch
            cols = ctx.buffer(self, "cols", (patch, m), X.dtype)
            Z = ctx.buffer(self, "Z", (self.c_out, m), X.dtype)
            Xp = self._padded(ctx, "Xp", X.shape, X.dtype) if self.pad else None
        cols, ho, wo = im2col(X, self.k, self.stride, self.pad, out=cols, work=Xp)
        W_mat = xp.reshape(self.W, (self.c_out, patch))
        Z = ops.matmul(W_mat, cols, out=Z)  # (c_out, h_out w_out n)
        Z += xp.reshape(self.b, (self.c_out, 1))
        if ctx.training:
            self._cols, self._shape = cols, X.shape
        return xp.reshape(Z, (self.c_out, ho, wo, n))

    def backward(self, G: Array, ctx: Pass, need_input_grad: bool = True) -> Array | None:
        """G (c_out, h_out, w_out, n) -> dX (c_in, h, w, n).

        With G_mat (c_out, h_out w_out n) the same values:  dW_mat = G_mat cols^T,
        db = row sums of G_mat,  dcols = W_mat^T G_mat,  dX = col2im(dcols).
        """
        xp = ctx.xp
        patch = self._cols.shape[0]
        G_mat = xp.reshape(G, (self.c_out, -1))
        # dW_mat^T = cols G_mat^T, then a small transposing copy: OpenBLAS runs this
        # orientation 15-30% faster than G_mat cols^T (fast99's and cnn_deep's
        # convolutions on 64 images, one thread, under both kernels)
        dWt = ops.matmul(
            self._cols, G_mat.T, out=ctx.buffer(self, "dWt", (patch, self.c_out), G.dtype)
        )
        ops.copyto(_view(self.dW, (self.c_out, patch)), dWt.T)
        ops.sum(G_mat, axis=1, out=self.db)
        if not need_input_grad:
            return None
        W_mat = xp.reshape(self.W, (self.c_out, patch))
        dcols = ops.matmul(W_mat.T, G_mat, out=ctx.buffer(self, "dcols", self._cols.shape, G.dtype))
        dXp = self._padded(ctx, "dXp", self._shape, G.dtype)
        return col2im(dcols, self._shape, self.k, self.stride, self.pad, out=dXp)

    def _padded(self, ctx: Pass, name: str, shape: tuple[int, ...], dtype: Any) -> Array:
        """The work array ``name`` (c_in, h + 2 pad, w + 2 pad, n) for an input of
        ``shape`` (c_in, h, w, n): the padded input, or col2im's padded sum."""
        c, h, w, n = shape
        return ctx.buffer(self, name, (c, h + 2 * self.pad, w + 2 * self.pad, n), dtype)

    def init_params(self, scheme: str, rng: np.random.Generator) -> None:
        from handprop.nn.init import INITIALIZERS

        area = self.k * self.k
        INITIALIZERS[scheme](self.W, fan_in=self.c_in * area, fan_out=self.c_out * area, rng=rng)
        self.b[...] = 0

    def get_config(self) -> dict[str, Any]:
        return {
            "c_in": self.c_in,
            "c_out": self.c_out,
            "k": self.k,
            "stride": self.stride,
            "pad": self.pad,
        }

    def short_name(self) -> str:
        return f"conv {self.c_in}-{self.c_out} {self.k}x{self.k}"

    def weight_images(
        self, image_shape: tuple[int, ...], n: int | None = None
    ) -> tuple[Array, str] | None:
        """The filters (c_out, k, k), summed over the input channels when there are
        several; any input's."""
        W = self.W.sum(axis=1)[:n]
        shown = f"all {len(W)}" if len(W) == self.c_out else f"{len(W)} of the {self.c_out}"
        return W, f"{shown} {self.k}x{self.k} filters of the convolution"

    def onnx(self, graph: Any, label: str) -> None:
        # the same cross-correlation, W as stored: (c_out, c_in, k, k)
        W, b = graph.weight(self.W, f"{label}.W"), graph.weight(self.b, f"{label}.b")
        k, s, pads = [self.k] * 2, [self.stride] * 2, [self.pad] * 4
        graph.node("Conv", [graph.current, W, b], label, kernel_shape=k, strides=s, pads=pads)


class _Pool2D(Layer):
    """Shared shape logic of the k x k poolings (no padding)."""

    def __init__(self, k: int = 2, stride: int | None = None) -> None:
        self.k = int(k)
        self.stride = self.k if stride is None else int(stride)
        if self.k < 1 or self.stride < 1:
            raise ShapeError(f"pooling needs k and stride >= 1, got k={k}, stride={stride}")

    def output_shape(self, input_shape: tuple[int, ...]) -> tuple[int, ...]:
        if len(input_shape) != 3:
            raise ShapeError(f"{self!r} expects (c, h, w) inputs, got {input_shape}")
        c, h, w = input_shape
        ho, wo = out_size(h, self.k, self.stride, 0), out_size(w, self.k, self.stride, 0)
        if ho < 1 or wo < 1:
            raise ShapeError(f"{self!r} does not fit an input of {h}x{w}")
        return (c, ho, wo)

    def macs(self, input_shape: tuple[int, ...]) -> int:
        return prod(self.output_shape(input_shape)) * self.k * self.k

    def offsets(self, X: Array, ho: int, wo: int):
        """(o, view) for each window offset o = i k + j: X's element at (i, j) of every
        window, a (c, ho, wo, n) strided view."""
        for i in range(self.k):
            for j in range(self.k):
                yield i * self.k + j, offset(X, i, j, ho, wo, self.stride)

    def _clear(self, dX: Array, ho: int, wo: int) -> bool:
        """Zero dX (c, h, w, n) where the windows' gradients will not overwrite it, and
        say whether the windows are disjoint (each position gets at most one write, so
        the per-offset parts can be written, not added)."""
        k, s = self.k, self.stride
        if s == k:  # the windows tile the input: only its uncovered edge needs zeros
            dX[:, ho * k :, ...] = 0
            dX[:, :, wo * k :, :] = 0
        else:
            dX[...] = 0
        return s >= k

    def get_config(self) -> dict[str, Any]:
        return {"k": self.k, "stride": self.stride}

    def onnx(self, graph: Any, label: str) -> None:
        k, s = [self.k] * 2, [self.stride] * 2
        graph.node(self.onnx_op, [graph.current], label, kernel_shape=k, strides=s)


#: a pool's item: "maxpool 2", "avgpool 3 stride=2" (the stride is k unless given)
POOL_SETTINGS = (Setting("k", required=True), Setting("stride", default_from="k"))


class MaxPool2D(_Pool2D):
    """A = max over each k x k window.  dA/dX = 1 at the window's maximum, else 0.

    Ties go to the first maximum in row-major order within the window, so the gradient
    is deterministic and a window passes back exactly one G value. The maximum is found
    by visiting the k * k window offsets as strided slices of X (c, h, w, n) (each a
    (c, h_out, w_out, n) view); training also keeps which offset won each window (one
    byte per output value).

    A ReLU just before a max pool gives the same values and gradients after it, on
    k^2 times fewer values: a :class:`~handprop.nn.Network` runs the two as one
    :class:`MaxPoolReLU` step.
    """

    kind = "maxpool2d"
    spec = ItemSpec("maxpool", POOL_SETTINGS)
    onnx_op = "MaxPool"

    def forward(self, X: Array, ctx: Pass = INFERENCE) -> Array:
        c, ho, wo = self.output_shape(X.shape[:3])
        if not ctx.training:
            slices = self.offsets(X, ho, wo)
            A = ops.copy(next(slices)[1])  # offset 0 holds the maximum until beaten
            for _, V in slices:
                ops.maximum(A, V, out=A)
            return A
        xp = ctx.xp
        shape = (c, ho, wo, X.shape[3])
        A = ctx.buffer(self, "A", shape, X.dtype)
        arg = ctx.buffer(self, "arg", shape, xp.uint8)
        beats = ctx.buffer(self, "beats", shape, xp.bool)
        claim = ctx.buffer(self, "claim", shape, xp.uint8)
        plane = ctx.buffer(self, "plane", shape, X.dtype)
        self._forward_block(xp, X, A, arg, beats, claim, plane)
        self._arg, self._shape = arg, X.shape
        return A

    def _forward_block(
        self, xp: Any, X: Array, A: Array, arg: Array, beats: Array, claim: Array, plane: Array
    ) -> None:
        slices = self.offsets(X, A.shape[1], A.shape[2])
        ops.copyto(A, next(slices)[1])
        arg[...] = 0
        for o, V in slices:
            # the strided view is first copied into a contiguous plane: NumPy compares
            # and takes maxima of contiguous float32 arrays faster than of strided ones,
            # and the copy costs about one strided pass (fast99's first pool, 64 images,
            # one thread: 0.50 ms with the copies, 0.67 ms without)
            ops.copyto(plane, V)
            # strictly greater: an equal value later keeps the first maximum. The
            # offsets come in increasing order, so "arg = o where V beats A" is
            # arg = max(arg, o * beats), two cheap passes instead of a masked write
            # (np.copyto with where= measured 3x slower here)
            ops.greater(plane, A, out=beats)
            ops.multiply(beats, ops.constant(xp, o, xp.uint8), out=claim)
            ops.maximum(arg, claim, out=arg)
            ops.maximum(A, plane, out=A)

    def backward(self, G: Array, ctx: Pass, need_input_grad: bool = True) -> Array:
        """dX[window max] = G; every other position of the window gets 0."""
        dX = ctx.buffer(self, "dX", self._shape, G.dtype)
        at = ctx.buffer(self, "at", G.shape, ctx.xp.bool)
        _, ho, wo, _ = G.shape
        disjoint = self._clear(dX, ho, wo)
        part = None if disjoint else ctx.buffer(self, "part", G.shape, G.dtype)
        arg = self._arg
        for o, V in self.offsets(dX, ho, wo):  # V is a view into dX
            ops.equal(arg, o, out=at)
            if part is None:  # each V is written once
                ops.multiply(G, at, out=V)
            else:  # overlapping windows add up
                V += ops.multiply(G, at, out=part)
        return dX


class MaxPoolReLU:
    """A max pool and the ReLU written just before it, run as one step of a network's
    passes: A = max(pool(X), 0),  dX = pool's backward of G where A > 0, else 0.

    The maximum of a window commutes with max(., 0), so the values are those of
    ReLU-then-pool, and so are the gradients: where the window's maximum is positive,
    the ReLU passes G to the same first maximum; where it is not, both orders pass back
    0 to every position of the window. The ReLU then touches k^2 times fewer values
    (the reference CNN's two ReLUs took 1.8 ms of a 25 ms step on 64 images), in place
    on the pool's output, which the pool's backward does not read.
    """

    def __init__(self, pool: MaxPool2D) -> None:
        self.pool = pool

    def forward(self, X: Array, ctx: Pass = INFERENCE) -> Array:
        A = self.pool.forward(X, ctx)
        if not ctx.training:
            return ops.maximum(A, 0.0, out=A)
        positive = ctx.buffer(self, "A>0", A.shape, ctx.xp.bool)
        self._positive, A = kernels.relu(A, positive, A)  # A > 0, max(A, 0) in place
        return A

    def backward(self, G: Array, ctx: Pass, need_input_grad: bool = True) -> Array:
        """dX = the pool's dX of G where A > 0, else 0."""
        G = kernels.relu_backward(G, self._positive, ctx.buffer(self, "G", G.shape, G.dtype))
        return self.pool.backward(G, ctx, need_input_grad)


class AvgPool2D(_Pool2D):
    """A = mean over each k x k window.  dA/dX = 1 / k^2 on every position of it.

    Like MaxPool2D, it visits the k * k window offsets as strided (c, h_out, w_out, n)
    views of X. The sum is taken row by row of the window (each row's k values in
    order, then the rows' sums in order: the order in which NumPy's ``mean`` adds a
    window's values) and divided by k^2."""

    kind = "avgpool2d"
    spec = ItemSpec("avgpool", POOL_SETTINGS)
    onnx_op = "AveragePool"

    def forward(self, X: Array, ctx: Pass = INFERENCE) -> Array:
        c, ho, wo = self.output_shape(X.shape[:3])
        k, s = self.k, self.stride
        shape = (c, ho, wo, X.shape[3])
        if ctx.training:
            self._shape = X.shape
        A = ctx.buffer(self, "A", shape, X.dtype)
        row = ctx.buffer(self, "row", shape, X.dtype) if k > 1 else None
        for i in range(k):
            total = A if i == 0 else row  # row 0 sums straight into A
            ops.copyto(total, offset(X, i, 0, ho, wo, s))
            for j in range(1, k):
                total += offset(X, i, j, ho, wo, s)
            if i > 0:
                A += row
        A /= float(k * k)
        return A

    def backward(self, G: Array, ctx: Pass, need_input_grad: bool = True) -> Array:
        """dX[window] += G / k^2."""
        k = self.k
        share = ops.multiply(G, 1.0 / (k * k), out=ctx.buffer(self, "share", G.shape, G.dtype))
        dX = ctx.buffer(self, "dX", self._shape, G.dtype)
        _, ho, wo, _ = G.shape
        disjoint = self._clear(dX, ho, wo)
        for _, V in self.offsets(dX, ho, wo):  # V is a view into dX
            if disjoint:
                ops.copyto(V, share)
            else:
                V += share
        return dX
