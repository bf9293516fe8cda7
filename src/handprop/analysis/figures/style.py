"""The one style of handprop's figures: sizes, colors, fonts, and the axis scales.

Figures are built with matplotlib's object-oriented API on the Agg canvas: no pyplot,
so no global figure registry, no backend switch and nothing left open; the style is
applied with ``rc_context`` per figure, so a caller's matplotlib settings are untouched.
Every figure has a fixed size in inches at a fixed dpi (``SIZES``, ``DPI``), so the same
run gives images of the same pixel size (the misclassified grid is as tall as the rows
of errors it shows), and each file is written under a temporary name and renamed into
place.

Axis scales follow one rule: quantities that training changes by factors (losses,
gradient and weight norms, update ratios) are drawn on logarithmic axes, always, so
that runs compare at a glance; a value of 0 there (a cosine schedule's last step
updates nothing) is marked at the bottom of the axis and named in the panel, never
dropped silently. Fractions (accuracy, precision, recall, F1, saturated or dead units)
are on linear axes that start at 0, with two exceptions that zoom and say so: accuracy
curves (on the range the run covers) and per-class precision, recall and F1 when every
score is at least ``PER_CLASS_ZOOM_FROM`` (from a little below the lowest score: bars
of 0.88 and 1.00 drawn from 0 look alike).
"""

from __future__ import annotations

import io
import math
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
from matplotlib import rc_context
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.layout_engine import ConstrainedLayoutEngine
from matplotlib.ticker import LogFormatter, MaxNLocator

from handprop.atomic import atomic_write_bytes
from handprop.run.reader import HANDPROP, MODEL_LABELS

# --- the one style -----------------------------------------------------------------------

DPI = 100

#: figure sizes in inches; the PNG is (width * DPI) x (height * DPI) pixels
SIZES: dict[str, tuple[float, float]] = {
    "confusion": (12.0, 5.4),
    "per_class": (12.0, 9.0),
    "training_curves": (12.0, 4.8),
    "misclassified": (12.0, 8.0),
    "correct_incorrect": (8.0, 5.0),
    "top_confusions": (9.0, 7.5),
    "grid_training_curves": (14.0, 5.2),
    "grid_accuracy": (13.0, 5.6),
    "first_layer": (12.0, 6.4),
    "diagnostics": (13.0, 9.0),
    "overlay_training_curves": (13.0, 5.0),
}

#: one color per model, the same in every figure
MODEL_COLORS = {
    HANDPROP: "#1f77b4",
    "sklearn_default": "#ff7f0e",
    "sklearn_analogue": "#2ca02c",
}
CORRECT_COLOR = "#4c9a5b"
INCORRECT_COLOR = "#c44e52"
TRAIN_COLOR = "#7f7f7f"
CMAP = "Blues"
WEIGHT_CMAP = "RdBu_r"  # weights: red positive, blue negative, white 0
IMAGE_CMAP = "gray_r"

RC = {
    "font.size": 11,
    "axes.titlesize": 13,
    "axes.titleweight": "bold",
    "axes.labelsize": 11,
    "xtick.labelsize": 10,
    "ytick.labelsize": 10,
    "legend.fontsize": 10,
    "figure.titlesize": 15,
    "figure.titleweight": "bold",
    "axes.spines.top": False,
    "axes.spines.right": False,
    "axes.grid": False,
    "grid.alpha": 0.3,
    "savefig.facecolor": "white",
    "figure.facecolor": "white",
}

MISCLASSIFIED_ROWS, MISCLASSIFIED_COLS = 4, 8
#: height in inches of one row of the misclassified grid, and of its title
MISCLASSIFIED_ROW_HEIGHT, MISCLASSIFIED_TITLE_HEIGHT = 1.9, 0.5
FIRST_LAYER_ROWS, FIRST_LAYER_COLS = 4, 8
#: height in inches of one row of the first layer's weight images, and of its title
FIRST_LAYER_ROW_HEIGHT, FIRST_LAYER_TITLE_HEIGHT = 1.4, 0.8
TOP_PAIRS = 10
#: a bar's count label: its font size as a share of the bar's height, and its bounds (pt)
BAR_LABEL_FILL, BAR_LABEL_SIZES = 0.75, (6.0, 9.0)
#: grid accuracy panels label their points with run names up to this many runs
MAX_POINT_LABELS = 12


#: the figures whose height follows their rows of images: (title, one row) in inches
ROW_HEIGHTS = {
    "misclassified": (MISCLASSIFIED_TITLE_HEIGHT, MISCLASSIFIED_ROW_HEIGHT),
    "first_layer": (FIRST_LAYER_TITLE_HEIGHT, FIRST_LAYER_ROW_HEIGHT),
}


def _filled_rows(n_images: int, most: int, cols: int) -> int:
    """Rows of ``cols`` that ``n_images`` fill: at least one, at most ``most``."""
    return max(1, math.ceil(min(n_images, most * cols) / cols))


def first_layer_rows(n_images: int) -> int:
    """Rows of the first layer's grid for ``n_images`` weight images: as many as they
    fill, at most FIRST_LAYER_ROWS (a 16-filter convolution: 2 rows, no empty band)."""
    return _filled_rows(n_images, FIRST_LAYER_ROWS, FIRST_LAYER_COLS)


def misclassified_rows(n_wrong: int) -> int:
    """Rows of the misclassified grid for ``n_wrong`` errors: as many as they fill (at
    least one, for the message that there are none), at most MISCLASSIFIED_ROWS."""
    return _filled_rows(n_wrong, MISCLASSIFIED_ROWS, MISCLASSIFIED_COLS)


def _size(kind: str, rows: int | None = None) -> tuple[float, float]:
    if rows is not None and kind in ROW_HEIGHTS:
        title, row = ROW_HEIGHTS[kind]
        return SIZES[kind][0], title + rows * row
    return SIZES[kind]


def pixel_size(kind: str, rows: int | None = None) -> tuple[int, int]:
    """(width, height) in pixels of the figures of ``kind`` (a key of ``SIZES``); for
    "misclassified", ``rows`` of errors (:func:`misclassified_rows`) set the height, and
    for "first_layer" the rows of weight images (:func:`first_layer_rows`)."""
    w, h = _size(kind, rows)
    return round(w * DPI), round(h * DPI)


@contextmanager
def _figure(kind: str, rows: int | None = None) -> Iterator[Figure]:
    """A new Figure of the fixed size of ``kind``, built under the handprop style."""
    with rc_context(RC):
        # a margin of 0.1 in keeps tick labels off the image edge
        layout = ConstrainedLayoutEngine(w_pad=0.1, h_pad=0.1)
        fig = Figure(figsize=_size(kind, rows), dpi=DPI, layout=layout)
        FigureCanvasAgg(fig)
        yield fig


def png_bytes(fig: Figure) -> bytes:
    """The figure rendered as PNG at the style's dpi (no tight bbox: the size stays fixed)."""
    buf = io.BytesIO()
    with rc_context(RC):
        fig.savefig(buf, format="png", dpi=DPI, metadata={"Software": None})
    return buf.getvalue()


def save_png(fig: Figure, path: Path) -> Path:
    """Write ``fig`` to ``path`` atomically: a temporary file in the same folder, renamed."""
    atomic_write_bytes(path, png_bytes(fig))
    return path


def _label(model: str) -> str:
    return MODEL_LABELS.get(model, model)


def _tick_rotation(names: list[str]) -> int:
    # digit names fit flat; Fashion-MNIST's "T-shirt/top" does not
    return 0 if max(len(n) for n in names) <= 3 else 30


def _no_data(ax: Any, message: str) -> None:
    ax.text(0.5, 0.5, message, ha="center", va="center", transform=ax.transAxes, color="0.4")
    ax.set_xticks([])
    ax.set_yticks([])


# --- scales and colors shared by the figures ---------------------------------------------


def _log_axis(ax: Any) -> None:
    """A logarithmic y axis labelled in plain numbers ("0.5", "20", "1e-05"), with the
    in-between ticks labelled when it spans less than a decade or so."""
    ax.set_yscale("log")
    ax.yaxis.set_major_formatter(PlainLogFormatter(labelOnlyBase=False))
    ax.yaxis.set_minor_formatter(PlainLogFormatter(labelOnlyBase=False, minor_thresholds=(1, 0.4)))


class PlainLogFormatter(LogFormatter):
    """Label the ticks matplotlib's LogFormatter labels, as plain numbers ("0.6", not
    "6e-01")."""

    def __call__(self, x: float, pos: int | None = None) -> str:
        return f"{x:g}" if super().__call__(x, pos) else ""


def _loss_axis(ax: Any, losses: np.ndarray, loss_name: str = "loss") -> None:
    """The one rule for loss axes: logarithmic, always (see the module docstring)."""
    finite = losses[np.isfinite(losses) & (losses > 0)]
    if finite.size:
        _log_axis(ax)
    ax.set_title("training loss")
    ax.set_xlabel("epoch")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_ylabel(f"{loss_name} (log scale)")
    ax.grid(True, which="both" if finite.size and finite.max() / finite.min() < 10 else "major")


LOSS_LABELS = {"cross_entropy": "cross-entropy", "mse": "mean squared error"}


def _run_colors(n: int) -> list[Any]:
    from matplotlib import colormaps

    cmap = colormaps["tab10" if n <= 10 else "viridis"]
    return [cmap(i) if n <= 10 else cmap(i / max(n - 1, 1)) for i in range(n)]
