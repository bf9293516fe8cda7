"""Data augmentation for image mini-batches: small random shifts and rotations.

Each training image is moved by a random whole-pixel shift and turned by a random
angle, drawn from the epoch's seeded generator, so a run (and a resumed run) sees the
same augmented batches every time. Rotation uses bilinear interpolation about the image
centre; pixels that come from outside the image are 0 (background).
"""

from __future__ import annotations

import numpy as np


def shift_rotate(
    X: np.ndarray, rng: np.random.Generator, max_shift: int = 0, max_degrees: float = 0.0
) -> np.ndarray:
    """A randomly shifted and rotated copy of images X (n, c, h, w).

    Shifts are drawn uniformly from [-max_shift, max_shift] pixels per axis, angles
    uniformly from [-max_degrees, max_degrees]. The output has X's dtype.
    """
    n = X.shape[0]
    dy = rng.integers(-max_shift, max_shift + 1, size=n) if max_shift else np.zeros(n)
    dx = rng.integers(-max_shift, max_shift + 1, size=n) if max_shift else np.zeros(n)
    theta = np.deg2rad(rng.uniform(-max_degrees, max_degrees, size=n)) if max_degrees else None
    return warp(X, dy, dx, theta)


def warp(
    X: np.ndarray, dy: np.ndarray, dx: np.ndarray, theta: np.ndarray | None = None
) -> np.ndarray:
    """Images X (n, c, h, w) turned by ``theta`` (radians; positive turns clockwise as
    displayed with row 0 at the top) about their centre, then moved down by ``dy`` and
    right by ``dx`` pixels; dy, dx and theta have shape (n,)."""
    n, _, h, w = X.shape
    # for every output pixel, where it comes from in the input (inverse mapping)
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float64)
    cy, cx = (h - 1) / 2, (w - 1) / 2
    ys = yy[None] - cy  # (1, h, w) about the centre
    xs = xx[None] - cx
    if theta is not None:
        cos, sin = np.cos(theta)[:, None, None], np.sin(theta)[:, None, None]
        src_y = cos * ys - sin * xs + cy - dy[:, None, None]
        src_x = sin * ys + cos * xs + cx - dx[:, None, None]
    else:
        src_y = np.broadcast_to(yy[None] - dy[:, None, None], (n, h, w))
        src_x = np.broadcast_to(xx[None] - dx[:, None, None], (n, h, w))
    return bilinear(X, src_y, src_x)


def bilinear(X: np.ndarray, src_y: np.ndarray, src_x: np.ndarray) -> np.ndarray:
    """Sample X (n, c, h, w) at fractional positions (n, h, w); 0 outside the image."""
    n, _, h, w = X.shape
    y0 = np.floor(src_y).astype(np.int64)
    x0 = np.floor(src_x).astype(np.int64)
    fy = (src_y - y0).astype(X.dtype)[:, None]
    fx = (src_x - x0).astype(X.dtype)[:, None]
    # pad by one pixel of zeros so that every neighbour index is valid
    P = np.pad(X, ((0, 0), (0, 0), (1, 1), (1, 1)))
    yi = np.clip(y0 + 1, 0, h + 1)
    xi = np.clip(x0 + 1, 0, w + 1)
    yj = np.clip(y0 + 2, 0, h + 1)
    xj = np.clip(x0 + 2, 0, w + 1)
    rows = np.arange(n)[:, None, None]

    def at(yv: np.ndarray, xv: np.ndarray) -> np.ndarray:
        return P[rows, :, yv, xv].transpose(0, 3, 1, 2)  # (n, c, h, w)

    top = at(yi, xi) * (1 - fx) + at(yi, xj) * fx
    bottom = at(yj, xi) * (1 - fx) + at(yj, xj) * fx
    out = top * (1 - fy) + bottom * fy
    # positions entirely outside the image (beyond the zero border) are background
    outside = (src_y <= -1) | (src_y >= h) | (src_x <= -1) | (src_x >= w)
    out[np.broadcast_to(outside[:, None], out.shape)] = 0
    return out.astype(X.dtype, copy=False)
