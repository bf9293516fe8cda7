"""The common MNIST CSV layout: a label, then one column per pixel; a header row or not."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np

from handprop.errors import DataError


def read_csv(
    path: str | Path, n_pixels: int | None = None, pixel_max: int = 255
) -> tuple[np.ndarray, np.ndarray]:
    """Labels (n,) int64 and pixels (n, h, w) uint8 from a label-first CSV.

    The first line is a header when its first cell is not a number. Images are square
    (784 pixels -> 28x28) unless the count is not a square, then (n, 1, pixels).
    A malformed row is refused with its line number.
    """
    path = Path(path)
    try:
        lines = path.read_text(encoding="utf-8-sig").splitlines()
    except FileNotFoundError:
        raise DataError(f"{path}: no such file") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise DataError(f"{path}: cannot read as text ({exc})") from None
    start = 0
    if lines and not lines[0].split(",")[0].strip().lstrip("-").isdigit():
        start = 1  # a header row
    rows = [(i + 1, line) for i, line in enumerate(lines[start:], start=start) if line.strip()]
    if not rows:
        raise DataError(f"{path}: no data rows")
    width = len(rows[0][1].split(",")) if n_pixels is None else n_pixels + 1
    if width < 2:
        raise DataError(f"{path} line {rows[0][0]}: expected a label and pixel columns")
    out = np.empty((len(rows), width), dtype=np.int64)
    for r, (line_no, line) in enumerate(rows):
        cells = line.split(",")
        if len(cells) != width:
            raise DataError(
                f"{path} line {line_no}: expected {width} columns (a label and "
                f"{width - 1} pixels), got {len(cells)}"
            )
        try:
            out[r] = [int(c) for c in cells]
        except ValueError:
            bad = next(c for c in cells if not c.strip().lstrip("-").isdigit())
            raise DataError(f"{path} line {line_no}: not an integer: {bad.strip()!r}") from None
        pixels = out[r, 1:]
        if pixels.min() < 0 or pixels.max() > pixel_max:
            raise DataError(
                f"{path} line {line_no}: pixel values must lie in [0, {pixel_max}], "
                f"got {pixels.min()}..{pixels.max()}"
            )
        if out[r, 0] < 0:
            raise DataError(f"{path} line {line_no}: a label must be >= 0, got {out[r, 0]}")
    labels = out[:, 0].copy()
    n_pix = width - 1
    side = math.isqrt(n_pix)
    shape = (side, side) if side * side == n_pix else (1, n_pix)
    return labels, out[:, 1:].astype(np.uint8).reshape(len(rows), *shape)
