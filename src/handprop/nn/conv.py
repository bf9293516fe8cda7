"""Convolution and pooling on batch-first images (n, c, h, w), backward passes by hand.

Conv2D is lowered to matrix products (im2col): for every image, each k x k x c_in patch
of the padded input becomes a column of ``cols[i]`` (c_in * k * k, h_out * w_out), and the
convolution is ``W_mat @ cols[i]`` with ``W_mat`` (c_out, c_in * k * k), one BLAS product
per image of the batch. The columns are laid out so that both the output and the copies
keep the images' own (channel, row, column) order: ``cols`` is filled by k * k strided
slice copies whose inner rows are contiguous, and the output is already (n, c_out, h_out,
w_out), with no transpose. The backward pass is two more products and col2im, the
scatter-add of patch gradients back onto the overlapping input positions, done as the
k * k strided additions that mirror the copies.

Everything here is written against the array API standard (``xp`` is the namespace of
the arrays: NumPy, CuPy, array-api-strict...): strided slices, ``xp.reshape`` and
``xp.permute_dims``; the copies and products that NumPy runs fastest into an existing
array go through :mod:`handprop.nn.backend` (``out=``).
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
    is an (n, c, ho, wo) strided view of X (n, c, h, w). Each slice stops just after
    its last element (the standard leaves stops past the end unspecified)."""
    return (
        slice(None),
        slice(None),
        slice(i, i + stride * (ho - 1) + 1, stride),
        slice(j, j + stride * (wo - 1) + 1, stride),
    )


def offset(X: Array, i: int, j: int, ho: int, wo: int, stride: int) -> Array:
    """View (n, c, ho, wo) of the input element at offset (i, j) of every window."""
    return X[grid(i, j, ho, wo, stride)]


def padded(X: Array, pad: int) -> Array:
    """X (n, c, h, w) with ``pad`` zeros on each side of its rows and columns (X itself
    when pad is 0): a zero array with X copied into its middle, as ``np.pad`` does it."""
    if not pad:
        return X
    n, c, h, w = X.shape
    Xp = ops.namespace(X).zeros((n, c, h + 2 * pad, w + 2 * pad), dtype=X.dtype)
    Xp[:, :, pad : pad + h, pad : pad + w] = X
    return Xp


def _channel_first(A: Array) -> Array:
    """View (c, n, ...) of A (n, c, ...): the first two axes swapped."""
    return ops.namespace(A).permute_dims(A, (1, 0, *range(2, A.ndim)))


def _view(A: Array, shape: tuple[int, ...]) -> Array:
    """A reshaped WITHOUT a copy (an error if it needs one): a view that ``out=`` or a
    write may target, such as a parameter's gradient in the flat gradient vector."""
    return ops.namespace(A).reshape(A, shape, copy=False)


def im2col(X: Array, k: int, stride: int, pad: int, out: Array | None = None) -> tuple:
    """cols (n, c * k * k, h_out * w_out): column (y, x) of cols[i] is the patch under
    output y, x, its rows in (channel, ki, kj) order, the order of W's last three axes."""
    xp = ops.namespace(X)
    n, c, h, w = X.shape
    ho, wo = out_size(h, k, stride, pad), out_size(w, k, stride, pad)
    Xp = padded(X, pad)
    cols = xp.empty((n, c, k, k, ho, wo), dtype=X.dtype) if out is None else out
    cols = xp.reshape(cols, (n, c, k, k, ho, wo))
    for i in range(k):
        for j in range(k):
            cols[:, :, i, j, ...] = offset(Xp, i, j, ho, wo, stride)
    return xp.reshape(cols, (n, c * k * k, ho * wo)), ho, wo


def col2im(dcols: Array, shape: tuple[int, int, int, int], k: int, stride: int, pad: int) -> Array:
    """Adjoint of im2col: sum each patch gradient back onto the input (n, c, h, w)."""
    xp = ops.namespace(dcols)
    n, c, h, w = shape
    ho, wo = out_size(h, k, stride, pad), out_size(w, k, stride, pad)
    D = xp.reshape(dcols, (n, c, k, k, ho, wo))
    dXp = xp.zeros((n, c, h + 2 * pad, w + 2 * pad), dtype=dcols.dtype)
    for i in range(k):
        for j in range(k):
            # window offset (i, j) of every output position lands on a strided grid
            dXp[grid(i, j, ho, wo, stride)] += D[:, :, i, j, ...]
    return dXp[:, :, pad : pad + h, pad : pad + w] if pad else dXp


def im2col_cn(
    X: Array, k: int, stride: int, pad: int, out: Array | None = None, work: Array | None = None
) -> tuple:
    """The whole batch's columns as one matrix (c * k * k, n * h_out * w_out).

    Row (channel, ki, kj), column (image, y, x): the input element under window offset
    (ki, kj) of output (y, x) of that image. One product ``W_mat @ cols`` then convolves
    the whole batch at once.

    A strided copy runs one inner loop per row of w_out elements, and for a small image
    (13 x 13 in the reference CNN) the loop overhead costs more than the copying. So
    for each column offset kj the input's columns kj .. kj + w_out are first copied
    once into ``work`` (c, n, h, w_out) (k such copies with short rows); each of the
    k * k copies into ``cols`` then reads whole (h_out, w_out) planes of it, whose rows
    follow each other in memory, and runs as one long loop per image and channel."""
    xp = ops.namespace(X)
    n, c, h, w = X.shape
    ho, wo = out_size(h, k, stride, pad), out_size(w, k, stride, pad)
    Xp = padded(X, pad)
    hp = h + 2 * pad
    cols = xp.empty((c, k, k, n, ho, wo), dtype=X.dtype) if out is None else out
    cols = xp.reshape(cols, (c, k, k, n, ho, wo))
    if stride != 1:
        for i in range(k):
            for j in range(k):
                ops.copyto(cols[:, i, j, ...], _channel_first(offset(Xp, i, j, ho, wo, stride)))
        return xp.reshape(cols, (c * k * k, n * ho * wo)), ho, wo
    Xj = xp.empty((c, n, hp, wo), dtype=X.dtype) if work is None else work
    for j in range(k):
        ops.copyto(Xj, _channel_first(Xp[:, :, :, j : j + wo]))
        for i in range(k):
            ops.copyto(cols[:, i, j, ...], Xj[:, :, i : i + ho, :])
    return xp.reshape(cols, (c * k * k, n * ho * wo)), ho, wo


def col2im_cn(
    dcols: Array,
    shape: tuple[int, int, int, int],
    k: int,
    stride: int,
    pad: int,
    acc: Array | None = None,
    out: Array | None = None,
    work: Array | None = None,
) -> Array:
    """Adjoint of :func:`im2col_cn`: dX (n, c, h, w) from dcols (c k k, n h_out w_out).

    The additions run on a channel-first (c, n, h + 2 pad, w + 2 pad) accumulator
    (``acc``, overwritten) and one transposing copy at the end gives (n, c, h, w)
    (into ``out`` when given). With stride 1 they mirror :func:`im2col_cn`: for each
    column offset kj, the k row offsets are summed in ``work`` (c, n, h + 2 pad, w_out)
    in long loops over whole planes, then added to the accumulator's columns
    kj .. kj + w_out (k passes of short rows instead of k * k)."""
    xp = ops.namespace(dcols)
    n, c, h, w = shape
    ho, wo = out_size(h, k, stride, pad), out_size(w, k, stride, pad)
    D = xp.reshape(dcols, (c, k, k, n, ho, wo))
    hp, wp = h + 2 * pad, w + 2 * pad
    if acc is None:
        acc = xp.empty((c, n, hp, wp), dtype=dcols.dtype)
    if stride != 1:
        acc[...] = 0
        for i in range(k):
            for j in range(k):
                acc[grid(i, j, ho, wo, stride)] += D[:, i, j, ...]
    else:
        S = xp.empty((c, n, hp, wo), dtype=dcols.dtype) if work is None else work
        for j in range(k):
            ops.copyto(S[:, :, :ho, :], D[:, 0, j, ...])
            S[:, :, ho:, :] = 0
            for i in range(1, k):
                S[:, :, i : i + ho, :] += D[:, i, j, ...]
            if j == 0:
                ops.copyto(acc[:, :, :, :wo], S)
                acc[:, :, :, wo:] = 0
            else:
                acc[:, :, :, j : j + wo] += S
    dX = xp.empty(shape, dtype=dcols.dtype) if out is None else out
    ops.copyto(dX, _channel_first(acc[:, :, pad : pad + h, pad : pad + w]))
    return dX


#: a convolution whose patch (c_in k k) has at least this many values runs the whole
#: batch as one product (:meth:`Conv2D.batched`); a smaller one runs a product per image
BATCHED_MIN_PATCH = 32


class Conv2D(Layer):
    """Z[i, o] = sum_c W[o, c] (*) X[i, c] + b[o]  (cross-correlation, as in every framework).

    X: (n, c_in, h, w)   W: (c_out, c_in, k, k)   b: (c_out,)   Z: (n, c_out, h_out, w_out)

    The whole batch is one product: ``W_mat (c_out, c_in k k) @ cols (c_in k k, n ho wo)``
    (:func:`im2col_cn`), whose (c_out, n, ho wo) result one transposing copy (with the
    bias added on the way) turns into (n, c_out, ho, wo). The backward pass is two
    products of the same size, ``dW^T = cols @ G_c^T`` and ``dcols = W_mat^T @ G_c``, and
    :func:`col2im_cn`. One large product runs at several times the speed of a product
    per image (64 x 288 by 288 x 121 for the reference CNN's second convolution).
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
        (c_in k k per output position) and the channel-first product, then that product
        and the output."""
        c_out, ho, wo = self.output_shape(input_shape)
        return (max(self.c_in * self.k * self.k, c_out) + c_out) * ho * wo

    def batched(self) -> bool:
        """Whether this layer convolves the batch as one product (else one per image).

        The batched layout pays two transposing copies of the output-sized arrays (Z
        and G, c_out values per output position) to make every product one large one;
        they cost about one pass per c_in k k multiply-adds, which a small patch (the
        first layer of an MNIST CNN: 1 x 3 x 3) cannot repay, while per-image products
        of a small patch run near full speed anyway."""
        return self.c_in * self.k * self.k >= BATCHED_MIN_PATCH

    def forward(self, X: Array, ctx: Pass = INFERENCE) -> Array:
        if not self.batched():
            return self._forward_per_image(X, ctx)
        xp = ctx.xp
        n = X.shape[0]
        _, ho, wo = self.output_shape(X.shape[1:])
        patch, m = self.c_in * self.k * self.k, n * ho * wo
        buf = ctx.buffer(self, "cols", (patch, m), X.dtype) if ctx.training else None
        work = self._work(ctx, X.shape, X.dtype) if ctx.training else None
        cols, ho, wo = im2col_cn(X, self.k, self.stride, self.pad, out=buf, work=work)
        W_mat = xp.reshape(self.W, (self.c_out, patch))
        Zc = ctx.buffer(self, "Zc", (self.c_out, m), X.dtype) if ctx.training else None
        Zc = ops.matmul(W_mat, cols, out=Zc)  # (c_out, n ho wo)
        if ctx.training:
            self._cols, self._shape = cols, X.shape
            Z = ctx.buffer(self, "Z", (n, self.c_out, ho, wo), X.dtype)
        else:
            del cols  # inference: free the columns before the output exists
            Z = xp.empty((n, self.c_out, ho, wo), dtype=X.dtype)
        Zc = xp.reshape(Zc, (self.c_out, n, ho, wo))
        bias = xp.reshape(self.b, (1, self.c_out, 1, 1))
        return ops.add(_channel_first(Zc), bias, out=Z)

    def backward(self, G: Array, ctx: Pass, need_input_grad: bool = True) -> Array | None:
        """G (n, c_out, ho, wo) -> dX (n, c_in, h, w).

        With G_c (c_out, n ho wo) the channel-first G:  dW_mat = G_c cols^T,
        db = row sums of G_c,  dcols = W_mat^T G_c,  dX = col2im(dcols).
        """
        if not self.batched():
            return self._backward_per_image(G, ctx, need_input_grad)
        xp = ctx.xp
        n, _, ho, wo = G.shape
        patch, m = self._cols.shape
        Gc = ctx.buffer(self, "Gc", (self.c_out, n, ho, wo), G.dtype)
        ops.copyto(Gc, _channel_first(G))
        Gc = xp.reshape(Gc, (self.c_out, m))
        # dW_mat^T = cols G_c^T, then a small transposing copy: OpenBLAS runs this
        # orientation faster than G_c cols^T (3.5 against 4.0 ms for the reference
        # CNN's second convolution on 64 images, one thread, under both kernels)
        dWt = ops.matmul(
            self._cols, Gc.T, out=ctx.buffer(self, "dWt", (patch, self.c_out), G.dtype)
        )
        ops.copyto(_view(self.dW, (self.c_out, patch)), dWt.T)
        ops.sum(Gc, axis=1, out=self.db)
        if not need_input_grad:
            return None
        W_mat = xp.reshape(self.W, (self.c_out, patch))
        dcols = ops.matmul(W_mat.T, Gc, out=ctx.buffer(self, "dcols", (patch, m), G.dtype))
        n, c, h, w = self._shape
        acc = ctx.buffer(self, "acc", (c, n, h + 2 * self.pad, w + 2 * self.pad), G.dtype)
        dX = ctx.buffer(self, "dX", self._shape, G.dtype)
        work = self._work(ctx, self._shape, G.dtype)
        return col2im_cn(
            dcols, self._shape, self.k, self.stride, self.pad, acc=acc, out=dX, work=work
        )

    def _work(self, ctx: Pass, shape: tuple[int, ...], dtype: Any) -> Array:
        """The (c_in, n, h + 2 pad, w_out) work array of im2col_cn and col2im_cn."""
        n, c, h, w = shape
        wo = out_size(w, self.k, self.stride, self.pad)
        return ctx.buffer(self, "work", (c, n, h + 2 * self.pad, wo), dtype)

    def _forward_per_image(self, X: Array, ctx: Pass) -> Array:
        """Z[i] = W_mat @ cols[i], one product per image, already (c_out, ho wo)."""
        xp = ctx.xp
        n = X.shape[0]
        _, ho, wo = self.output_shape(X.shape[1:])
        patch = self.c_in * self.k * self.k
        buf = ctx.buffer(self, "cols_i", (n, patch, ho * wo), X.dtype) if ctx.training else None
        cols, ho, wo = im2col(X, self.k, self.stride, self.pad, out=buf)
        W_mat = xp.reshape(self.W, (self.c_out, patch))
        out = ctx.buffer(self, "Z", (n, self.c_out, ho * wo), X.dtype) if ctx.training else None
        Z = ops.matmul(W_mat, cols, out=out)
        Z += self.b[:, None]
        if ctx.training:
            self._cols, self._shape = cols, X.shape
        return xp.reshape(Z, (n, self.c_out, ho, wo))

    def _backward_per_image(self, G: Array, ctx: Pass, need_input_grad: bool) -> Array | None:
        """dW_mat = sum_i G_i cols_i^T,  dcols_i = W_mat^T G_i,  dX = col2im(dcols)."""
        xp = ctx.xp
        n = G.shape[0]
        G_mat = xp.reshape(G, (n, self.c_out, -1))  # (n, c_out, ho wo)
        patch = self._cols.shape[1]
        per_image = ops.matmul(
            G_mat,
            xp.permute_dims(self._cols, (0, 2, 1)),
            out=ctx.buffer(self, "dW_i", (n, self.c_out, patch), G.dtype),
        )
        ops.sum(xp.reshape(per_image, (n, *self.dW.shape)), axis=0, out=self.dW)
        ops.sum(G_mat, axis=(0, 2), out=self.db)
        if not need_input_grad:
            return None
        W_mat = xp.reshape(self.W, (self.c_out, patch))
        dcols = ops.matmul(
            W_mat.T, G_mat, out=ctx.buffer(self, "dcols_i", self._cols.shape, G.dtype)
        )
        return col2im(dcols, self._shape, self.k, self.stride, self.pad)

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
        window, an (n, c, ho, wo) strided view."""
        for i in range(self.k):
            for j in range(self.k):
                yield i * self.k + j, offset(X, i, j, ho, wo, self.stride)

    def _clear(self, dX: Array, ho: int, wo: int) -> bool:
        """Zero dX (n, c, h, w) where the windows' gradients will not overwrite it, and
        say whether the windows are disjoint (each position gets at most one write, so
        the per-offset parts can be written, not added)."""
        k, s = self.k, self.stride
        if s == k:  # the windows tile the input: only its uncovered edge needs zeros
            dX[:, :, ho * k :, :] = 0
            dX[:, :, :, wo * k :] = 0
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
    by visiting the k * k window offsets as strided slices of X (each an
    (n, c, h_out, w_out) view); training also keeps which offset won each window (one
    byte per output value).

    A ReLU just before a max pool gives the same values and gradients after it, on
    k^2 times fewer values: a :class:`~handprop.nn.Network` runs the two as one
    :class:`MaxPoolReLU` step.
    """

    kind = "maxpool2d"
    spec = ItemSpec("maxpool", POOL_SETTINGS)
    onnx_op = "MaxPool"

    def forward(self, X: Array, ctx: Pass = INFERENCE) -> Array:
        _, ho, wo = self.output_shape(X.shape[1:])
        if not ctx.training:
            slices = self.offsets(X, ho, wo)
            A = ops.copy(next(slices)[1])  # offset 0 holds the maximum until beaten
            for _, V in slices:
                ops.maximum(A, V, out=A)
            return A
        xp = ctx.xp
        shape = (X.shape[0], X.shape[1], ho, wo)
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
        slices = self.offsets(X, A.shape[2], A.shape[3])
        ops.copyto(A, next(slices)[1])
        arg[...] = 0
        for o, V in slices:
            # the strided view is first copied into a contiguous plane: NumPy compares
            # and takes maxima of contiguous float32 arrays several times faster than of
            # strided ones (for a 2 x 2 pool, 0.04 ms against 0.2-0.5 ms per pass over
            # 64 x 32 x 13 x 13 values), and the copy costs about one strided pass.
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
        _, _, ho, wo = G.shape
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

    Like MaxPool2D, it visits the k * k window offsets as strided (n, c, h_out, w_out)
    views of X. The sum is taken row by row of the window (each row's k values in
    order, then the rows' sums in order: the order in which NumPy's ``mean`` adds a
    window's values) and divided by k^2."""

    kind = "avgpool2d"
    spec = ItemSpec("avgpool", POOL_SETTINGS)
    onnx_op = "AveragePool"

    def forward(self, X: Array, ctx: Pass = INFERENCE) -> Array:
        _, ho, wo = self.output_shape(X.shape[1:])
        k, s = self.k, self.stride
        shape = (X.shape[0], X.shape[1], ho, wo)
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
        _, _, ho, wo = G.shape
        disjoint = self._clear(dX, ho, wo)
        for _, V in self.offsets(dX, ho, wo):  # V is a view into dX
            if disjoint:
                ops.copyto(V, share)
            else:
                V += share
        return dX
