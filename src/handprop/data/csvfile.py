"""The common MNIST CSV layout: a label, then one column per pixel; a header row or not."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np

from handprop.data.idx import read_bytes
from handprop.errors import DataError
from handprop.files import MAX_CSV_BYTES
from handprop.memory import check_fits

#: the most classes a label may name when the caller does not say how many there are
MAX_CLASSES = 1 << 16


def read_csv(
    path: str | Path,
    n_pixels: int | None = None,
    pixel_max: int = 255,
    n_classes: int = MAX_CLASSES,
) -> tuple[np.ndarray, np.ndarray]:
    """Labels (n,) int64 and pixels (n, h, w) uint8 from a label-first CSV.

    The first line is a header when a cell of it is not a number. Images are square
    (784 pixels -> 28x28) unless the count is not a square, then (n, 1, pixels).
    A malformed row (a cell that is not an integer, a label outside [0, n_classes), a
    pixel outside [0, pixel_max], a wrong number of columns) is refused with its line.
    """
    path = Path(path)
    raw = read_bytes(path, what="CSV file", max_bytes=MAX_CSV_BYTES)
    check_fits(6 * len(raw), f"reading {path}")  # lists, strings and int64 cells of the text
    try:
        lines = raw.decode("utf-8-sig").splitlines()
    except UnicodeDecodeError as exc:
        raise DataError(
            f"{path}: not a UTF-8 text file ({exc.reason} at byte {exc.start})"
        ) from None
    start = 0
    if lines and not all(map(_is_number, lines[0].split(","))):
        start = 1  # a header row: a row of numbers, even malformed ones, is data
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
            values = [int(c) for c in cells]
        except ValueError:
            bad = next(c for c in cells if not _is_number(c, int)).strip()
            bad = bad if len(bad) <= 40 else bad[:37] + "..."
            raise DataError(f"{path} line {line_no}: not an integer: {bad!r}") from None
        if not 0 <= values[0] < n_classes:
            raise DataError(
                f"{path} line {line_no}: a label must lie in [0, {n_classes}), got {values[0]}"
            )
        lo, hi = min(values[1:]), max(values[1:])
        if lo < 0 or hi > pixel_max:
            raise DataError(
                f"{path} line {line_no}: pixel values must lie in [0, {pixel_max}], got {lo}..{hi}"
            )
        out[r] = values  # every value is now known to fit in int64
    labels = out[:, 0].copy()
    n_pix = width - 1
    side = math.isqrt(n_pix)
    shape = (side, side) if side * side == n_pix else (1, n_pix)
    return labels, out[:, 1:].astype(np.uint8).reshape(len(rows), *shape)


def _is_number(cell: str, kind: type = float) -> bool:
    try:
        kind(cell)
    except ValueError:
        return False
    return True
