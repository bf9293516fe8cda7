"""Data augmentation for image mini-batches: small random shifts, rotations, changes of
size and elastic distortions.

Each training image is moved by a random whole-pixel shift, turned by a random angle,
optionally enlarged or shrunk about its centre by a random factor and, optionally,
distorted elastically (Simard, Steinkraus & Platt 2003: a random displacement field,
uniform in [-1, 1] per pixel and axis, smoothed by a Gaussian of standard deviation
sigma and scaled by alpha), all drawn from the epoch's seeded generator, so a run (and a
resumed run, and every MPI rank) sees the same augmented batches every time. The output
pixels are read from the input by bilinear interpolation, once for all the
transformations; pixels that come from outside the image are 0 (background).

:func:`check_augment` refuses settings that mean nothing for the images at hand (a shift
that moves every image out of its frame, a sigma wider than the image), once, before
training; the functions below trust their arguments but for :func:`gaussian_matrix`,
whose size it bounds by the image's.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from handprop.errors import ConfigError


def check_augment(
    image_shape: Sequence[int],
    max_shift: int = 0,
    max_degrees: float = 0.0,
    elastic_alpha: float = 0.0,
    elastic_sigma: float = 4.0,
    dataset: str | None = None,
    max_scale: float = 0.0,
) -> None:
    """Refuse augmentation settings that mean nothing for images of ``image_shape``
    (..., h, w), naming the config field, the rule, the value and the image size (and
    ``dataset``, the images' name, when given).

    A shift of the image's side or more moves some images wholly out of the frame; a
    sigma beyond the side smooths the displacement field into one constant move, and its
    kernel, 4 sigma each way, would outgrow the image (a sigma of 1e6 asked for
    gigabytes). Rotations beyond 180 degrees, a change of size of 100% or more (a factor
    of 0 or less) and negative or non-finite values are refused by the config already,
    and here too for other callers. Sigma is checked only when the distortions are on
    (alpha > 0): otherwise it is not used.

    Raises
    ------
    ConfigError
    """
    h, w = (int(n) for n in image_shape[-2:])
    side = min(h, w)
    images = f"the {h}x{w} images" + (f" of {dataset}" if dataset else "")
    if not 0 <= max_shift < side:
        raise ConfigError(
            f"augment_shift must be an integer >= 0 and less than {side} pixels (the side "
            f"of {images}), got {max_shift!r}"
        )
    if not 0 <= max_degrees <= 180:
        raise ConfigError(f"augment_rotate must be in [0, 180] degrees, got {max_degrees!r}")
    if not 0 <= max_scale < 1:
        raise ConfigError(f"augment_scale must be in [0, 1) (a fraction), got {max_scale!r}")
    if not (np.isfinite(elastic_alpha) and elastic_alpha >= 0):
        raise ConfigError(
            f"augment_elastic_alpha must be a finite number >= 0, got {elastic_alpha!r}"
        )
    if elastic_alpha and not 0 < elastic_sigma <= side:
        raise ConfigError(
            f"augment_elastic_sigma must be > 0 and at most {side} pixels (the side of "
            f"{images}), got {elastic_sigma!r}"
        )


def moves(
    rng: np.random.Generator,
    n: int,
    max_shift: int = 0,
    max_degrees: float = 0.0,
    max_scale: float = 0.0,
) -> tuple[np.ndarray, np.ndarray, np.ndarray | None, np.ndarray | None]:
    """Random moves of n images: shifts (dy, dx) drawn uniformly from whole pixels in
    [-max_shift, max_shift] per axis, angles (radians) uniformly from
    [-max_degrees, max_degrees] degrees, and size factors uniformly from
    [1 - max_scale, 1 + max_scale]; None for a move that is off. The draws come in
    that order, each only when its move is on, so that turning on a later move leaves
    the earlier ones' batches as they were."""
    dy = rng.integers(-max_shift, max_shift + 1, size=n) if max_shift else np.zeros(n)
    dx = rng.integers(-max_shift, max_shift + 1, size=n) if max_shift else np.zeros(n)
    theta = np.deg2rad(rng.uniform(-max_degrees, max_degrees, size=n)) if max_degrees else None
    scale = rng.uniform(1.0 - max_scale, 1.0 + max_scale, size=n) if max_scale else None
    return dy, dx, theta, scale


def shift_rotate(
    X: np.ndarray, rng: np.random.Generator, max_shift: int = 0, max_degrees: float = 0.0
) -> np.ndarray:
    """A randomly shifted and rotated copy of images X (n, c, h, w) (the draws of
    :func:`moves`). The output has X's dtype."""
    return warp(X, *moves(rng, X.shape[0], max_shift, max_degrees))


def augment(
    X: np.ndarray,
    rng: np.random.Generator,
    max_shift: int = 0,
    max_degrees: float = 0.0,
    elastic_alpha: float = 0.0,
    elastic_sigma: float = 4.0,
    max_scale: float = 0.0,
) -> np.ndarray:
    """Images X (n, c, h, w) shifted, rotated and resized (:func:`moves`, whose draws
    come first, so that without elastic distortions or resizing the batches are
    :func:`shift_rotate`'s) and elastically distorted (:func:`elastic_field`; alpha 0:
    none), in one resampling. The output has X's dtype."""
    n, _, h, w = X.shape
    src_y, src_x = sources(n, h, w, *moves(rng, n, max_shift, max_degrees, max_scale))
    if elastic_alpha:
        ey, ex = elastic_field(rng, n, h, w, elastic_alpha, elastic_sigma)
        src_y, src_x = src_y + ey, src_x + ex
    return bilinear(X, src_y, src_x)


def gaussian_matrix(size: int, sigma: float) -> np.ndarray:
    """K (size, size): K @ v is v smoothed by a normalised Gaussian of standard deviation
    ``sigma`` pixels, cut at 4 sigma, the border reflected (scipy.ndimage's defaults).

    ``sigma`` is at most ``size``, so that the work arrays, (size, 8 sigma + 1), stay
    within a few times the image's size (:func:`check_augment` says so to a config).
    """
    if not 0 < sigma <= size:
        raise ValueError(f"sigma must be in (0, {size}] (the size), got {sigma!r}")
    r = max(1, int(4.0 * sigma + 0.5))
    t = np.arange(-r, r + 1)
    g = np.exp(-0.5 * (t / sigma) ** 2)
    g /= g.sum()
    j = np.arange(size)[:, None] + t[None, :]  # (size, 2r + 1) source of each tap
    period = 2 * size
    j = np.mod(j, period)
    j = np.where(j >= size, period - 1 - j, j)  # reflect: d c b a | a b c d | d c b a
    K = np.zeros((size, size))
    np.add.at(K, (np.repeat(np.arange(size), len(t)), j.ravel()), np.tile(g, size))
    return K


def elastic_field(
    rng: np.random.Generator, n: int, h: int, w: int, alpha: float, sigma: float
) -> tuple[np.ndarray, np.ndarray]:
    """Simard et al.'s displacement fields (dy, dx), each (n, h, w) in pixels: uniform
    in [-1, 1] per pixel, smoothed by a Gaussian of ``sigma`` (separable: K_h D K_w^T,
    one small matrix product per axis for the whole batch), times ``alpha``."""
    D = rng.uniform(-1.0, 1.0, size=(2, n, h, w))
    smooth = gaussian_matrix(h, sigma) @ D @ (alpha * gaussian_matrix(w, sigma).T)
    return smooth[0], smooth[1]


def elastic(
    X: np.ndarray, rng: np.random.Generator, alpha: float, sigma: float = 4.0
) -> np.ndarray:
    """Images X (n, c, h, w) elastically distorted: output pixel (i, j) is read at
    (i + dy, j + dx) (:func:`elastic_field`), bilinearly. alpha 0 returns X's values."""
    n, _, h, w = X.shape
    if not alpha:
        return X.copy()
    ey, ex = elastic_field(rng, n, h, w, alpha, sigma)
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float64)
    return bilinear(X, yy[None] + ey, xx[None] + ex)


def warp(
    X: np.ndarray,
    dy: np.ndarray,
    dx: np.ndarray,
    theta: np.ndarray | None = None,
    scale: np.ndarray | None = None,
) -> np.ndarray:
    """Images X (n, c, h, w) turned by ``theta`` (radians; positive turns clockwise as
    displayed with row 0 at the top) and enlarged by the factor ``scale`` (below 1:
    shrunk) about their centre, then moved down by ``dy`` and right by ``dx`` pixels;
    dy, dx, theta and scale have shape (n,)."""
    n, _, h, w = X.shape
    return bilinear(X, *sources(n, h, w, dy, dx, theta, scale))


def sources(
    n: int,
    h: int,
    w: int,
    dy: np.ndarray,
    dx: np.ndarray,
    theta: np.ndarray | None,
    scale: np.ndarray | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Where each output pixel of :func:`warp` comes from: (src_y, src_x), each (n, h, w)."""
    # for every output pixel, where it comes from in the input (inverse mapping)
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float64)
    cy, cx = (h - 1) / 2, (w - 1) / 2
    ys = yy[None] - cy  # (1, h, w) about the centre
    xs = xx[None] - cx
    if scale is not None:  # a pixel r from the centre comes from r / scale
        ys = ys / scale[:, None, None]
        xs = xs / scale[:, None, None]
    if theta is not None:
        cos, sin = np.cos(theta)[:, None, None], np.sin(theta)[:, None, None]
        ys, xs = cos * ys - sin * xs, sin * ys + cos * xs
    return ys + cy - dy[:, None, None], xs + cx - dx[:, None, None]  # (n, h, w) each


def bilinear(X: np.ndarray, src_y: np.ndarray, src_x: np.ndarray) -> np.ndarray:
    """Sample X (n, c, h, w) at fractional positions (n, h, w); 0 outside the image.

    A position (y, x) inside, -1 < y < h and -1 < x < w, mixes its four neighbours
    (floor(y) + {0, 1}, floor(x) + {0, 1}), the ones beyond the edge 0; one outside is 0.
    """
    n, c, h, w = X.shape
    # X in a border of zeros: one row and column before, two rows after (H = h + 3), so
    # that the four neighbours of any inside position lie in P, and an outside position
    # can read four zeros (the extra bottom row's first two pixels and the ones below)
    H, W = h + 3, w + 2
    P = np.zeros((n, c, H, W), dtype=X.dtype)
    P[:, :, 1 : h + 1, 1 : w + 1] = X
    y0 = np.floor(src_y)
    x0 = np.floor(src_x)
    fy = (src_y - y0).astype(X.dtype)
    fx = (src_x - x0).astype(X.dtype)
    inside = (src_y > -1) & (src_y < h) & (src_x > -1) & (src_x < w)
    # the top-left neighbour's flat index in P: inside, row y0 + 1 in [0, h] and column
    # x0 + 1 in [0, w]; outside, row h + 1, column 0 (all four neighbours zeros)
    top_left = (y0.astype(np.intp) + 1) * W + (x0.astype(np.intp) + 1)
    top_left[~inside] = (h + 1) * W  # and a NaN position, whose cast means nothing
    top_left += (np.arange(n) * (c * H * W))[:, None, None]
    flat = P.reshape(-1)
    out = np.empty(X.shape, dtype=X.dtype)
    for ch in range(c):  # flat gathers (np.take): much faster than fancy indexing
        at = ch * H * W  # the channel's first pixel in P
        a, b, d, e = (flat.take(top_left + (at + k)) for k in (0, 1, W, W + 1))
        top = a + (b - a) * fx
        bottom = d + (e - d) * fx
        out[:, ch] = top + (bottom - top) * fy
    return out
