"""Convolution and pooling on batch-first images (n, c, h, w), backward passes by hand.

Conv2D is lowered to one large matrix product (im2col): every k x k x c_in patch of the
padded input becomes a row of a matrix ``cols`` (n * h_out * w_out, c_in * k * k), read
through a strided window view and copied once, and the convolution is ``cols @ W_mat``.
Its backward pass is two more products and col2im, the scatter-add of patch gradients
back onto the overlapping input positions, done as k * k strided additions.
"""

from __future__ import annotations

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


def im2col(X: Array, k: int, stride: int, pad: int) -> tuple[Array, int, int]:
    """cols (n * h_out * w_out, c * k * k): row (i, y, x) is the patch under output y, x."""
    n, c = X.shape[:2]
    Xp = np.pad(X, ((0, 0), (0, 0), (pad, pad), (pad, pad))) if pad else X
    V = windows(Xp, k, stride)  # (n, c, ho, wo, k, k), a view
    ho, wo = V.shape[2], V.shape[3]
    cols = np.empty((n, ho, wo, c, k, k), dtype=X.dtype)
    np.copyto(cols, V.transpose(0, 2, 3, 1, 4, 5))  # the one copy
    return cols.reshape(n * ho * wo, c * k * k), ho, wo


def col2im(dcols: Array, shape: tuple[int, int, int, int], k: int, stride: int, pad: int) -> Array:
    """Adjoint of im2col: sum each patch-row gradient back onto the input (n, c, h, w)."""
    n, c, h, w = shape
    ho, wo = out_size(h, k, stride, pad), out_size(w, k, stride, pad)
    D = dcols.reshape(n, ho, wo, c, k, k)
    dXp = np.zeros((n, c, h + 2 * pad, w + 2 * pad), dtype=dcols.dtype)
    for i in range(k):
        for j in range(k):
            # window offset (i, j) of every output position lands on a strided grid
            dXp[:, :, i : i + stride * ho : stride, j : j + stride * wo : stride] += D[
                :, :, :, :, i, j
            ].transpose(0, 3, 1, 2)
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

    def forward(self, X: Array, training: bool = False) -> Array:
        n = X.shape[0]
        cols, ho, wo = im2col(X, self.k, self.stride, self.pad)
        W_mat = self.W.reshape(self.c_out, -1)  # (c_out, c k k)
        Z = cols @ W_mat.T  # (n ho wo, c_out)
        Z += self.b
        if training:
            self._cols, self._shape = cols, X.shape
        # NHWC -> NCHW, contiguous for the layers after
        return np.ascontiguousarray(Z.reshape(n, ho, wo, self.c_out).transpose(0, 3, 1, 2))

    def backward(self, G: Array, need_input_grad: bool = True) -> Array | None:
        """G (n, c_out, ho, wo) -> dX (n, c_in, h, w).

        With G_mat (n ho wo, c_out) the rows of G:  dW_mat = G_mat^T cols,
        db = sum of G over n, ho, wo,  dcols = G_mat W_mat,  dX = col2im(dcols).
        """
        G_mat = G.transpose(0, 2, 3, 1).reshape(-1, self.c_out)  # (n ho wo, c_out)
        np.matmul(G_mat.T, self._cols, out=self.dW.reshape(self.c_out, -1))
        np.sum(G, axis=(0, 2, 3), out=self.db)
        if not need_input_grad:
            return None
        dcols = G_mat @ self.W.reshape(self.c_out, -1)  # (n ho wo, c k k)
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

    def scatter(self, parts: Array, shape: tuple[int, ...]) -> Array:
        """dX (n, c, h, w) from per-offset gradients parts (n, c, ho, wo, k, k)."""
        ho, wo = parts.shape[2], parts.shape[3]
        dX = np.zeros(shape, dtype=parts.dtype)
        s = self.stride
        for i in range(self.k):
            for j in range(self.k):
                dX[:, :, i : i + s * ho : s, j : j + s * wo : s] += parts[:, :, :, :, i, j]
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

    def offsets(self, X: Array, ho: int, wo: int):
        s = self.stride
        for i in range(self.k):
            for j in range(self.k):
                yield i * self.k + j, X[:, :, i : i + s * ho : s, j : j + s * wo : s]

    def forward(self, X: Array, training: bool = False) -> Array:
        _, ho, wo = self.output_shape(X.shape[1:])
        slices = self.offsets(X, ho, wo)
        A = np.array(next(slices)[1])  # offset 0 holds the maximum until beaten
        arg = np.zeros(A.shape, dtype=np.uint8) if training else None
        for o, V in slices:
            beats = V > A  # strictly: an equal value later keeps the first maximum
            np.maximum(A, V, out=A)
            if training:
                arg[beats] = o
        if training:
            self._arg, self._shape = arg, X.shape
        return A

    def backward(self, G: Array, need_input_grad: bool = True) -> Array:
        """dX[window max] = G; every other position of the window gets 0."""
        dX = np.zeros(self._shape, dtype=G.dtype)
        _, _, ho, wo = G.shape
        for o, V in self.offsets(dX, ho, wo):
            V += np.where(self._arg == o, G, 0)  # V is a view into dX
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
