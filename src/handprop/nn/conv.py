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
"""

from __future__ import annotations

from math import prod
from typing import Any

import numpy as np
from numpy.lib.stride_tricks import sliding_window_view

from handprop.errors import ShapeError
from handprop.nn.layers import Array, Layer


def out_size(size: int, k: int, stride: int, pad: int) -> int:
    """Output length of a k-wide window moved by ``stride`` over ``size + 2 pad``."""
    return (size + 2 * pad - k) // stride + 1


def windows(Xp: Array, k: int, stride: int) -> Array:
    """View (n, c, h_out, w_out, k, k) of every k x k window of Xp (n, c, H, W)."""
    return sliding_window_view(Xp, (k, k), axis=(2, 3))[:, :, ::stride, ::stride]


def offset(X: Array, i: int, j: int, ho: int, wo: int, stride: int) -> Array:
    """View (n, c, ho, wo) of the input element at offset (i, j) of every window."""
    return X[:, :, i : i + stride * ho : stride, j : j + stride * wo : stride]


def im2col(X: Array, k: int, stride: int, pad: int, out: Array | None = None) -> tuple:
    """cols (n, c * k * k, h_out * w_out): column (y, x) of cols[i] is the patch under
    output y, x, its rows in (channel, ki, kj) order, the order of W's last three axes."""
    n, c, h, w = X.shape
    ho, wo = out_size(h, k, stride, pad), out_size(w, k, stride, pad)
    Xp = np.pad(X, ((0, 0), (0, 0), (pad, pad), (pad, pad))) if pad else X
    cols = np.empty((n, c, k, k, ho, wo), dtype=X.dtype) if out is None else out
    cols = cols.reshape(n, c, k, k, ho, wo)
    for i in range(k):
        for j in range(k):
            cols[:, :, i, j] = offset(Xp, i, j, ho, wo, stride)
    return cols.reshape(n, c * k * k, ho * wo), ho, wo


def col2im(dcols: Array, shape: tuple[int, int, int, int], k: int, stride: int, pad: int) -> Array:
    """Adjoint of im2col: sum each patch gradient back onto the input (n, c, h, w)."""
    n, c, h, w = shape
    ho, wo = out_size(h, k, stride, pad), out_size(w, k, stride, pad)
    D = dcols.reshape(n, c, k, k, ho, wo)
    dXp = np.zeros((n, c, h + 2 * pad, w + 2 * pad), dtype=dcols.dtype)
    for i in range(k):
        for j in range(k):
            # window offset (i, j) of every output position lands on a strided grid
            offset(dXp, i, j, ho, wo, stride)[...] += D[:, :, i, j]
    return dXp[:, :, pad : pad + h, pad : pad + w] if pad else dXp


class Conv2D(Layer):
    """Z[i, o] = sum_c W[o, c] (*) X[i, c] + b[o]  (cross-correlation, as in every framework).

    X: (n, c_in, h, w)   W: (c_out, c_in, k, k)   b: (c_out,)   Z: (n, c_out, h_out, w_out)
    """

    kind = "conv2d"

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
        """The im2col columns (c_in k k per output position) and the output."""
        c_out, ho, wo = self.output_shape(input_shape)
        return (self.c_in * self.k * self.k + c_out) * ho * wo

    def forward(self, X: Array, training: bool = False) -> Array:
        n = X.shape[0]
        _, ho, wo = self.output_shape(X.shape[1:])
        patch = self.c_in * self.k * self.k
        buf = self.buffer("cols", (n, patch, ho * wo), X.dtype) if training else None
        cols, ho, wo = im2col(X, self.k, self.stride, self.pad, out=buf)
        W_mat = self.W.reshape(self.c_out, patch)
        # Z[i] = W_mat @ cols[i]: (c_out, ho wo) per image, already channel-first
        out = self.buffer("Z", (n, self.c_out, ho * wo), X.dtype) if training else None
        Z = np.matmul(W_mat, cols, out=out)
        Z += self.b[:, None]
        if training:
            self._cols, self._shape = cols, X.shape
        return Z.reshape(n, self.c_out, ho, wo)

    def backward(self, G: Array, need_input_grad: bool = True) -> Array | None:
        """G (n, c_out, ho, wo) -> dX (n, c_in, h, w).

        With G_i (c_out, ho wo) image i's slice of G:  dW_mat = sum_i G_i cols_i^T,
        db = sum of G over n, ho, wo,  dcols_i = W_mat^T G_i,  dX = col2im(dcols).
        """
        n = G.shape[0]
        G_mat = np.ascontiguousarray(G).reshape(n, self.c_out, -1)  # (n, c_out, ho wo)
        patch = self._cols.shape[1]
        per_image = np.matmul(
            G_mat,
            self._cols.transpose(0, 2, 1),
            out=self.buffer("dW_i", (n, self.c_out, patch), G.dtype),
        )
        np.sum(per_image, axis=0, out=self.dW.reshape(self.c_out, patch))
        np.sum(G_mat, axis=(0, 2), out=self.db)
        if not need_input_grad:
            return None
        W_mat = self.W.reshape(self.c_out, patch)
        dcols = np.matmul(W_mat.T, G_mat, out=self.buffer("dcols", self._cols.shape, G.dtype))
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

    def scatter(self, parts: Array, shape: tuple[int, ...]) -> Array:
        """dX (n, c, h, w) from per-offset gradients parts (n, c, ho, wo, k, k)."""
        ho, wo = parts.shape[2], parts.shape[3]
        dX = np.zeros(shape, dtype=parts.dtype)
        for o, V in self.offsets(dX, ho, wo):
            V += parts[:, :, :, :, o // self.k, o % self.k]
        return dX

    def get_config(self) -> dict[str, Any]:
        return {"k": self.k, "stride": self.stride}


class MaxPool2D(_Pool2D):
    """A = max over each k x k window.  dA/dX = 1 at the window's maximum, else 0.

    Ties go to the first maximum in row-major order within the window, so the gradient
    is deterministic and a window passes back exactly one G value. The maximum is found
    by visiting the k * k window offsets as strided slices of X (each an
    (n, c, h_out, w_out) view), so no window array is ever copied.
    """

    kind = "maxpool2d"

    def forward(self, X: Array, training: bool = False) -> Array:
        _, ho, wo = self.output_shape(X.shape[1:])
        slices = self.offsets(X, ho, wo)
        A = np.array(next(slices)[1])  # offset 0 holds the maximum until beaten
        if training:
            shape = A.shape
            arg = self.buffer("arg", shape, np.dtype(np.uint8))
            arg[...] = 0
            beats = self.buffer("beats", shape, np.dtype(bool))
            claim = self.buffer("claim", shape, np.dtype(np.uint8))
        for o, V in slices:
            if training:
                # strictly greater: an equal value later keeps the first maximum. The
                # offsets come in increasing order, so "arg = o where V beats A" is
                # arg = max(arg, o * beats), two cheap passes instead of a masked write.
                np.greater(V, A, out=beats)
                np.multiply(beats, np.uint8(o), out=claim)
                np.maximum(arg, claim, out=arg)
            np.maximum(A, V, out=A)
        if training:
            self._arg, self._shape = arg, X.shape
        return A

    def backward(self, G: Array, need_input_grad: bool = True) -> Array:
        """dX[window max] = G; every other position of the window gets 0."""
        dX = np.zeros(self._shape, dtype=G.dtype)
        _, _, ho, wo = G.shape
        at = self.buffer("at", G.shape, np.dtype(bool))
        for o, V in self.offsets(dX, ho, wo):  # V is a view into dX
            np.equal(self._arg, o, out=at)
            if self.stride >= self.k:  # windows do not overlap: each V is written once
                np.multiply(G, at, out=V)
            else:  # overlapping windows add up
                V += G * at
        return dX


class AvgPool2D(_Pool2D):
    """A = mean over each k x k window.  dA/dX = 1 / k^2 on every position of it."""

    kind = "avgpool2d"

    def forward(self, X: Array, training: bool = False) -> Array:
        if training:
            self._shape = X.shape
        return windows(X, self.k, self.stride).mean(axis=(-2, -1), dtype=X.dtype)

    def backward(self, G: Array, need_input_grad: bool = True) -> Array:
        """dX[window] += G / k^2."""
        k = self.k
        share = (G * G.dtype.type(1.0 / (k * k)))[..., None, None]
        parts = np.broadcast_to(share, (*G.shape, k, k))
        return self.scatter(parts, self._shape)
