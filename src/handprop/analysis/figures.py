"""Figures of a run or an experiment grid, as PNG files of fixed pixel size.

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

The confusion heat maps are scikit-learn's ``ConfusionMatrixDisplay`` drawn into our
own axes (it imports pyplot for its colormap lookup, but draws no pyplot figure).
"""

from __future__ import annotations

import io
import math
import textwrap
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from matplotlib import rc_context
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.colors import Normalize
from matplotlib.figure import Figure
from matplotlib.layout_engine import ConstrainedLayoutEngine
from matplotlib.lines import Line2D
from matplotlib.ticker import FormatStrFormatter, LogFormatter, MaxNLocator, MultipleLocator

from handprop.atomic import atomic_write_bytes
from handprop.errors import ConfigError, DataError, HandpropError
from handprop.metrics import confusion_matrix, per_class, top_confusions
from handprop.run.reader import (
    HANDPROP,
    MODEL_LABELS,
    GridFolder,
    LayerDiagnostics,
    Predictions,
    RunFolder,
    find_key,
    is_grid,
    resolve_run,
)

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
TOP_PAIRS = 10
#: a bar's count label: its font size as a share of the bar's height, and its bounds (pt)
BAR_LABEL_FILL, BAR_LABEL_SIZES = 0.75, (6.0, 9.0)
#: grid accuracy panels label their points with run names up to this many runs
MAX_POINT_LABELS = 12


def misclassified_rows(n_wrong: int) -> int:
    """Rows of the misclassified grid for ``n_wrong`` errors: as many as they fill (at
    least one, for the message that there are none), at most MISCLASSIFIED_ROWS."""
    shown = min(n_wrong, MISCLASSIFIED_ROWS * MISCLASSIFIED_COLS)
    return max(1, math.ceil(shown / MISCLASSIFIED_COLS))


def _size(kind: str, rows: int | None = None) -> tuple[float, float]:
    if kind == "misclassified" and rows is not None:
        return SIZES[kind][0], MISCLASSIFIED_TITLE_HEIGHT + rows * MISCLASSIFIED_ROW_HEIGHT
    return SIZES[kind]


def pixel_size(kind: str, rows: int | None = None) -> tuple[int, int]:
    """(width, height) in pixels of the figures of ``kind`` (a key of ``SIZES``); for
    "misclassified", ``rows`` of errors (:func:`misclassified_rows`) set the height."""
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


# --- run figures --------------------------------------------------------------------------


def _matrix_panel(
    ax: Any, M: np.ndarray, names: list[str], title: str, fmt: str, vmax: float | None = None
) -> Any:
    """One annotated heat map by scikit-learn's ConfusionMatrixDisplay; zero cells are
    left blank, so the errors stand out."""
    from sklearn.metrics import ConfusionMatrixDisplay

    k = len(names)
    norm = Normalize(vmin=0, vmax=vmax if vmax is not None else max(float(M.max()), 1.0))
    display = ConfusionMatrixDisplay(M, display_labels=names)
    rotation = _tick_rotation(names)
    display.plot(
        ax=ax,
        cmap=CMAP,
        colorbar=False,
        values_format=fmt,
        xticks_rotation=rotation,
        # annotations stop being legible beyond ~15 classes
        include_values=k <= 15,
        im_kw={"norm": norm},
        text_kw={"fontsize": 9 if k > 10 else 10},
    )
    if display.text_ is not None:
        for (i, j), text in np.ndenumerate(display.text_):
            text.set_visible(M[i, j] != 0)
    if rotation:
        for label in ax.get_xticklabels():
            label.set_horizontalalignment("right")
    ax.set_title(title)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    return display.im_


def confusion_figure(P: Predictions, names: list[str], model: str) -> Figure:
    """Counts and row-normalized confusion matrices of one model, side by side."""
    C = confusion_matrix(P.y_true, P.y_pred, P.k)
    support = C.sum(axis=1, keepdims=True)
    R = np.divide(C, support, out=np.zeros(C.shape), where=support != 0)
    acc = np.trace(C) / C.sum()
    with _figure("confusion") as fig:
        axes = fig.subplots(1, 2)
        im = _matrix_panel(axes[0], C, names, "counts", "d")
        fig.colorbar(im, ax=axes[0], shrink=0.85)
        im = _matrix_panel(axes[1], R, names, "row-normalized (recall)", ".2f", vmax=1.0)
        fig.colorbar(im, ax=axes[1], shrink=0.85)
        fig.suptitle(f"Confusion matrix of {_label(model)}: accuracy {100 * acc:.2f}%")
    return fig


#: the per-class axes zoom when every score is at least this; below, they start at 0
PER_CLASS_ZOOM_FROM = 0.5
#: a zoomed per-class axis starts on a multiple of this, at least 0.01 below the lowest score
PER_CLASS_STEP = 0.05


def per_class_floor(scores: np.ndarray) -> float:
    """Where the per-class axes start: 0, or when every score is at least
    PER_CLASS_ZOOM_FROM, the multiple of PER_CLASS_STEP at least 0.01 below the lowest
    (0.88 -> 0.85, 1.0 -> 0.95), so that 0.88 and 1.00 do not look alike."""
    finite = scores[np.isfinite(scores)]
    if not finite.size:
        return 0.0
    # round first: (0.95 - 0.01) / 0.05 is 18.799999..., not 18.8
    floor = math.floor(round((float(finite.min()) - 0.01) / PER_CLASS_STEP, 9)) * PER_CLASS_STEP
    return round(floor, 2) if floor >= PER_CLASS_ZOOM_FROM else 0.0


def per_class_figure(models: dict[str, Predictions], names: list[str]) -> Figure:
    """Per-class precision, recall and F1 as grouped bars, one bar per model.

    The three axes share one range: from 0, or zoomed from ``per_class_floor`` of every
    score shown to 1, which the title and each axis label state.
    """
    scores = {m: per_class(confusion_matrix(P.y_true, P.y_pred, P.k)) for m, P in models.items()}
    k = len(names)
    x = np.arange(k)
    width = 0.8 / len(models)
    metrics = ("precision", "recall", "f1")
    floor = per_class_floor(np.concatenate([scores[m][q] for m in scores for q in metrics]))
    with _figure("per_class") as fig:
        axes = fig.subplots(3, 1, sharex=True)
        for ax, metric in zip(axes, metrics, strict=True):
            for i, model in enumerate(models):
                ax.bar(
                    x + (i - (len(models) - 1) / 2) * width,
                    scores[model][metric],
                    width,
                    label=_label(model),
                    color=MODEL_COLORS.get(model),
                )
            # zoomed, and saying so: from 0, scores of 0.88 and 1.00 look alike
            ax.set_ylim(floor, 1.0)
            name = "F1" if metric == "f1" else metric
            ax.set_ylabel(f"{name}\n(axis from {floor:.2f})" if floor else name)
            if floor:
                ax.yaxis.set_major_locator(MultipleLocator(PER_CLASS_STEP if floor >= 0.8 else 0.1))
                ax.yaxis.set_major_formatter(FormatStrFormatter("%.2f"))
            ax.grid(axis="y")
            ax.set_axisbelow(True)
        # above the panels: inside one, the legend would hide the bars of some class
        fig.legend(
            *axes[0].get_legend_handles_labels(), loc="outside lower center", ncols=len(models)
        )
        axes[-1].set_xticks(
            x,
            names,
            rotation=_tick_rotation(names),
            ha="right" if _tick_rotation(names) else "center",
        )
        axes[-1].set_xlabel("class")
        zoom = f" (y axes from {floor:.2f}, not 0)" if floor else ""
        fig.suptitle(f"Per-class precision, recall and F1{zoom}")
    return fig


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


def training_curves_figure(
    history: dict[str, np.ndarray], title: str = "Training curves", loss: str | None = None
) -> Figure:
    """Loss per epoch, and train/test accuracy on the epochs that evaluated them.

    ``loss``: the config's loss name, for the axis label.
    """
    epoch = history["epoch"]
    with _figure("training_curves") as fig:
        ax_loss, ax_acc = fig.subplots(1, 2)
        ax_loss.plot(epoch, history["loss"], color=MODEL_COLORS[HANDPROP], lw=1.8)
        _loss_axis(ax_loss, history["loss"], LOSS_LABELS.get(loss or "", "loss"))
        plotted = False
        for key, label, color in (
            ("train_acc", "train", TRAIN_COLOR),
            ("test_acc", "test", MODEL_COLORS[HANDPROP]),
        ):
            ok = np.isfinite(history[key])
            if ok.any():
                ax_acc.plot(
                    epoch[ok],
                    100 * history[key][ok],
                    label=label,
                    color=color,
                    lw=1.8,
                    marker="o" if ok.sum() <= 30 else None,
                    ms=4,
                )
                plotted = True
        if plotted:
            ax_acc.set_title("accuracy")
            ax_acc.set_xlabel("epoch")
            ax_acc.set_ylabel("accuracy (%)")
            ax_acc.grid(True)
            ax_acc.legend(loc="lower right")
        else:
            ax_acc.set_title("accuracy")
            _no_data(ax_acc, "no accuracy recorded during training")
        fig.suptitle(title)
    return fig


def misclassified_figure(
    P: Predictions, images: np.ndarray, names: list[str], model: str = HANDPROP
) -> Figure:
    """The most confident mistakes: image, true and predicted class, confidence.

    ``images`` is the dataset's (N, H, W) array; ``P.index`` selects the test samples.
    """
    wrong = np.flatnonzero(P.y_true != P.y_pred)
    wrong = wrong[np.argsort(-P.confidence[wrong], kind="stable")]
    shown = min(MISCLASSIFIED_ROWS * MISCLASSIFIED_COLS, wrong.size)
    rows = misclassified_rows(wrong.size)
    with _figure("misclassified", rows) as fig:
        axes = np.atleast_1d(fig.subplots(rows, MISCLASSIFIED_COLS)).reshape(-1)
        for ax in axes:
            ax.set_axis_off()
        for ax, r in zip(axes, wrong[:shown], strict=False):
            ax.imshow(images[P.index[r]], cmap=IMAGE_CMAP, interpolation="nearest")
            ax.set_title(
                _error_caption(names[P.y_true[r]], names[P.y_pred[r]], P.confidence[r]),
                fontsize=9,
                fontweight="normal",
                color=INCORRECT_COLOR,
            )
        if wrong.size == 0:
            fig.text(0.5, 0.4, "no misclassified test samples", ha="center", color="0.4")
            fig.suptitle(f"Misclassified test samples of {_label(model)}: none")
        else:
            which = "the one" if wrong.size == 1 else f"all {shown}"
            if shown < wrong.size:
                which = f"the {shown} most confident of {wrong.size}"
            fig.suptitle(f"Misclassified test samples of {_label(model)}: {which}")
    return fig


#: characters per line of a misclassified caption (a cell is 1.5 in wide at 9 pt)
CAPTION_WIDTH = 18


def _error_caption(true: str, pred: str, confidence: float) -> str:
    """ "true X / pred Y / 87%" on three lines, a long class name wrapped to the cell."""
    lines = [
        *textwrap.wrap(f"true {true}", CAPTION_WIDTH, break_on_hyphens=False),
        *textwrap.wrap(f"pred {pred}", CAPTION_WIDTH, break_on_hyphens=False),
        f"{100 * confidence:.0f}% sure",
    ]
    return "\n".join(lines)


def first_layer_images(net: Any) -> tuple[np.ndarray, str]:
    """(m, h, w) weight images of the network's first layer, and what they are, as the
    layer gives them (``Layer.weight_images``): a Conv2D's filters (summed over input
    channels when there are several), or the input weights of a Dense layer's first
    hidden units, reshaped to the image. Raises DataError when the first layer has no
    image-shaped weights.
    """
    layer = net.layers[0]
    shape = tuple(net.meta.get("image_shape") or ())
    found = layer.weight_images(shape, FIRST_LAYER_ROWS * FIRST_LAYER_COLS)
    if found is None:
        raise DataError(f"the first layer {layer!r} has no image-shaped weights to draw")
    return found


def first_layer_figure(net: Any) -> Figure:
    """The first layer's weights as images, on one symmetric color scale around 0."""
    W, what = first_layer_images(net)
    vmax = float(np.abs(W).max()) or 1.0
    norm = Normalize(-vmax, vmax)
    with _figure("first_layer") as fig:
        axes = fig.subplots(FIRST_LAYER_ROWS, FIRST_LAYER_COLS)
        for ax in axes.flat:
            ax.set_axis_off()
        image = None
        for j, (ax, w) in enumerate(zip(axes.flat, W, strict=False)):
            image = ax.imshow(w, cmap=WEIGHT_CMAP, norm=norm, interpolation="nearest")
            ax.set_title(str(j), fontsize=9, fontweight="normal")
        if image is not None:
            fig.colorbar(image, ax=axes, shrink=0.8, label="weight")
        fig.suptitle(f"First layer: {what}")
    return fig


def correct_incorrect_figure(models: dict[str, Predictions]) -> Figure:
    """Correct and incorrect test predictions per model, as grouped bars."""
    labels = [_label(m) for m in models]
    correct = np.array([int((P.y_true == P.y_pred).sum()) for P in models.values()])
    total = np.array([P.n for P in models.values()])
    x = np.arange(len(models))
    with _figure("correct_incorrect") as fig:
        ax = fig.subplots()
        width = 0.38
        bars_c = ax.bar(x - width / 2, correct, width, label="correct", color=CORRECT_COLOR)
        bars_i = ax.bar(
            x + width / 2, total - correct, width, label="incorrect", color=INCORRECT_COLOR
        )
        for bars in (bars_c, bars_i):
            ax.bar_label(bars, padding=3)
        ax.set_xticks(x, labels)
        ax.set_ylabel("test samples")
        ax.set_ylim(0, total.max() * 1.12)
        ax.legend(loc="upper right")
        ax.set_title("Correct vs incorrect test predictions")
    return fig


def top_confusions_figure(models: dict[str, Predictions], names: list[str]) -> Figure:
    """handprop's most frequent confusions, with each model's count for the same pairs."""
    Cs = {m: confusion_matrix(P.y_true, P.y_pred, P.k) for m, P in models.items()}
    ranked = HANDPROP if HANDPROP in Cs else next(iter(Cs))
    pairs = top_confusions(Cs[ranked], TOP_PAIRS)
    with _figure("top_confusions") as fig:
        ax = fig.subplots()
        many = "the most confused pair" if len(pairs) == 1 else f"{len(pairs)} most confused pairs"
        ax.set_title(f"The {many} of {_label(ranked)}, counted for every model")
        if not pairs:
            ax.set_title("Most confused pairs")
            _no_data(ax, "no confusions: every test sample is classified correctly")
            return fig
        y = np.arange(len(pairs))
        height = 0.84 / len(models)
        all_bars = []
        for i, (model, C) in enumerate(Cs.items()):
            counts = [C[t, p] for t, p, _ in pairs]
            all_bars.append(
                ax.barh(
                    y + (i - (len(models) - 1) / 2) * height,
                    counts,
                    height,
                    label=_label(model),
                    color=MODEL_COLORS.get(model),
                )
            )
        ax.set_yticks(y, [f"{names[t]} → {names[p]}" for t, p, _ in pairs])
        ax.tick_params(axis="y", length=0, pad=6)
        ax.invert_yaxis()
        ax.set_xlabel("test samples (true → predicted)")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        top = max(int(C[t, p]) for C in Cs.values() for t, p, _ in pairs)
        ax.set_xlim(0, max(top, 1) * 1.12)  # room for the count after the longest bar
        ax.grid(axis="x")
        ax.set_axisbelow(True)
        if len(models) > 1:  # below the axes: inside, it would cover bars
            fig.legend(*ax.get_legend_handles_labels(), loc="outside lower center", ncols=3)
        _count_labels(fig, ax, all_bars, height)
    return fig


def _count_labels(fig: Figure, ax: Any, all_bars: list[Any], height: float) -> None:
    """Each bar's count after it, in a font no taller than the bar, so that the labels
    of neighbouring bars (the 0s of three models side by side) do not run together;
    a 0, whose bar has no length, in grey."""
    fig.draw_without_rendering()  # lay the figure out: the axes' height in pixels is known
    y0, y1 = ax.get_ylim()
    bar_pt = ax.get_window_extent().height / abs(y1 - y0) * height * 72 / DPI
    size = float(np.clip(BAR_LABEL_FILL * bar_pt, BAR_LABEL_SIZES[0], BAR_LABEL_SIZES[1]))
    for bars in all_bars:
        for text in ax.bar_label(bars, padding=3, fontsize=size):
            if text.get_text() == "0":
                text.set_color("0.45")


# --- diagnostics of training ------------------------------------------------------------

#: the panels of the diagnostics figure: (quantity, title, axis label, log scale)
DIAGNOSTIC_PANELS = (
    ("grad_norm", "gradient norm ||dW||", "||dW|| (log scale)", True),
    ("weight_norm", "weight norm ||W||", "||W|| (log scale)", True),
    (
        "update_ratio",
        "update / weight ratio of the epoch's last step",
        "||ΔW|| / ||W|| (log)",
        True,
    ),
    ("health", "activation health on the probe batch", "units (%)", False),
)
#: what a 0 on a log panel means, for the note beside its marker at the axis bottom
ZERO_NOTES = {
    "grad_norm": "||dW|| = 0",
    "weight_norm": "||W|| = 0",
    "update_ratio": "update 0 (learning rate 0: a cosine schedule's last step?)",
}
#: line styles telling layers apart when color tells runs apart (the output layer solid)
LAYER_STYLES = ("--", ":", "-.", (0, (5, 1, 1, 1, 1, 1)), (0, (1, 3)))


def _layer_style(layer: LayerDiagnostics, n_layers: int) -> Any:
    if layer.number == n_layers:
        return "-"
    return LAYER_STYLES[(layer.number - 1) % len(LAYER_STYLES)]


#: the marker of a 0 on a log panel: a triangle at the bottom, pointing down
ZERO_MARKER = "v"


def _mark_zeros(ax: Any, epochs: np.ndarray, color: Any) -> None:
    """Triangles at the bottom of a log axis at ``epochs``, where the value is 0: x in data,
    y in axes coordinates, so the marks sit on the axis whatever its range."""
    ax.plot(
        epochs,
        np.full(len(epochs), 0.03),
        transform=ax.get_xaxis_transform(),
        ls="none",
        marker=ZERO_MARKER,
        ms=8,
        color=color,
        clip_on=False,
        zorder=4,
    )


def _zero_note(ax: Any, quantity: str, epochs: list[float]) -> None:
    """A legend in the panel saying what the triangles at its bottom are."""
    at = ", ".join(f"{e:g}" for e in epochs) if len(epochs) <= 3 else f"{len(epochs)} epochs"
    handle = Line2D([], [], ls="none", marker=ZERO_MARKER, ms=8, color="0.3")
    label = f"epoch {at}: {ZERO_NOTES[quantity]}\n0 is not on a log axis: marked ▼ at its bottom"
    ax.legend([handle], [label], loc="best", fontsize=8)


def diagnostics_figure(runs: list[tuple[str, list[LayerDiagnostics]]]) -> Figure:
    """Per-layer diagnostics (``diagnostics.csv``) of one run or several overlaid.

    One panel per quantity, a line per layer: gradient norm, weight norm and update
    ratio on log axes (they move by factors; a value of 0, such as the update of a
    cosine schedule's last step at learning rate 0, is a ▼ at the bottom of the axis,
    explained in the panel), the saturated (sigmoid, tanh) and dead
    (ReLU) units on a linear axis from 0 to 100%. One run: a color per layer. Several:
    a color per run, and a line style per layer (the output layer solid).
    """
    colors = _run_colors(max(len(runs), 1))
    with _figure("diagnostics") as fig:
        axes = fig.subplots(2, 2).reshape(-1)
        for ax, (_, title, ylabel, log) in zip(axes, DIAGNOSTIC_PANELS, strict=True):
            ax.set_title(title)
            ax.set_xlabel("epoch")
            ax.set_ylabel(ylabel)
            ax.grid(True)
            ax.xaxis.set_major_locator(MaxNLocator(integer=True))
            if log:
                _log_axis(ax)
        ax_health = axes[3]
        any_health = False
        zeros: dict[str, set[float]] = {}  # quantity -> epochs where some layer's value is 0
        for r, (run_name, layers) in enumerate(runs):
            n_layers = len(layers)
            layer_colors = _run_colors(n_layers)
            for layer in layers:
                if len(runs) == 1:
                    color, style, label = layer_colors[layer.number - 1], "-", layer.label
                else:
                    color, style = colors[r], _layer_style(layer, n_layers)
                    label = f"{run_name}: {layer.label}"
                width = 2.0 if layer.number == n_layers else 1.5
                for ax, (quantity, _, _, log) in zip(axes[:3], DIAGNOSTIC_PANELS, strict=False):
                    values = layer.values[quantity]
                    if log:  # a 0 or a missing value has no place on a log axis
                        zero = values == 0  # a missing value (NaN) is not a 0
                        if zero.any():
                            _mark_zeros(ax, layer.epoch[zero], color)
                            zeros.setdefault(quantity, set()).update(layer.epoch[zero].tolist())
                        values = np.where(values > 0, values, np.nan)
                    ax.plot(layer.epoch, values, color=color, ls=style, lw=width, label=label)
                for quantity, what, marker in (
                    ("saturated", "saturated", "o"),
                    ("dead", "dead", "s"),
                ):
                    values = layer.values[quantity]
                    if np.isfinite(values).any():
                        any_health = True
                        ax_health.plot(
                            layer.epoch,
                            100 * values,
                            color=color,
                            ls=style,
                            lw=width,
                            marker=marker,
                            markevery=max(1, len(values) // 12),
                            ms=4,
                            label=f"{label}: {what}",
                        )
        for ax, (quantity, _, _, _) in zip(axes[:3], DIAGNOSTIC_PANELS, strict=False):
            if quantity in zeros:
                _zero_note(ax, quantity, sorted(zeros[quantity]))
        if any_health:
            ax_health.set_ylim(0, 100)
            ax_health.legend(loc="best", fontsize=8)
        else:
            _no_data(ax_health, "no sigmoid, tanh or ReLU layer")
        from handprop.run.diagnostics import SATURATION_DERIVATIVE

        ax_health.set_title(
            f"saturated (σ', tanh' < {SATURATION_DERIVATIVE:g}) and dead (ReLU) units"
        )
        handles, labels = axes[0].get_legend_handles_labels()
        if handles:
            fig.legend(
                handles, labels, loc="outside lower center", ncols=min(len(handles), 4), fontsize=9
            )
        what = runs[0][0] if len(runs) == 1 else " vs ".join(name for name, _ in runs)
        fig.suptitle(f"Inside training: {what}")
    return fig


def overlay_training_curves_figure(runs: list[RunFolder]) -> Figure:
    """Training loss and test accuracy of several runs on shared axes."""
    colors = _run_colors(len(runs))
    with _figure("overlay_training_curves") as fig:
        ax_loss, ax_acc = fig.subplots(1, 2)
        losses = []
        for run, color in zip(runs, colors, strict=True):
            h = run.history
            if h is None:
                continue
            losses.append(h["loss"])
            loss_name = LOSS_LABELS.get(str(find_key(run.config, "loss") or ""), "loss")
            label = f"{run.name} ({loss_name})"
            ax_loss.plot(h["epoch"], h["loss"], color=color, lw=1.6, label=label)
            ok = np.isfinite(h["test_acc"])
            if ok.any():
                ax_acc.plot(h["epoch"][ok], 100 * h["test_acc"][ok], color=color, lw=1.6)
        _loss_axis(ax_loss, np.concatenate(losses) if losses else np.array([]), "each run's loss")
        ax_acc.set_title("test accuracy")
        ax_acc.set_xlabel("epoch")
        ax_acc.set_ylabel("accuracy (%)")
        ax_acc.grid(True)
        if losses:
            fig.legend(loc="outside lower center", ncols=min(len(runs), 4))
        fig.suptitle("Training curves: " + " vs ".join(r.name for r in runs))
    return fig


# --- grid figures -------------------------------------------------------------------------

#: grid parameters plotted against accuracy: (label, config keys holding the value)
GRID_PARAMETERS: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("train samples", ("dtrain", "n_train", "train")),
    ("epochs", ("epochs",)),
    ("hidden size", ("hidden", "hidden_size", "hidden_sizes", "m")),
)


def run_accuracy(run: RunFolder) -> float | None:
    """The run's test accuracy: metrics.json's, else recomputed from predictions.csv."""
    acc = run.metrics.get("accuracy")
    if isinstance(acc, (int, float)):
        return float(acc)
    if run.has("predictions.csv"):
        P = run.predictions
        return float((P.y_true == P.y_pred).mean())
    return None


def run_parameter(run: RunFolder, label: str) -> Any:
    """The value of a grid parameter for one run (None when it cannot be found)."""
    if label == "train samples":
        split = run.metrics.get("split")
        if isinstance(split, dict) and isinstance(split.get("train"), int):
            return split["train"]
    keys = dict(GRID_PARAMETERS)[label]
    value = find_key(run.config, *keys)
    if label == "epochs" and value is None:
        value = run.metrics.get("epochs_completed")
    if isinstance(value, list):
        # no hidden layer plots as 0; several as a category "100-50"
        value = (value[0] if len(value) == 1 else "-".join(map(str, value))) if value else 0
    if isinstance(value, (dict, bool)):  # a TOML table of that name, or a flag: not a size
        return None
    return value


#: line styles and markers cycled with the colors, so that no run hides another: two
#: runs with the same curve (a shorter run is a prefix of a longer one) still show both
RUN_STYLES = ("-", "--", ":", "-.")
RUN_MARKERS = ("o", "s", "^", "D", "v", "P", "X", "<", ">", "*")
#: markers along each curve of the grid's training curves
MARKS_PER_CURVE = 8


def run_styles(n: int) -> list[dict[str, Any]]:
    """Line keywords for ``n`` runs drawn on shared axes: a color, a line style and a
    marker each; no two runs share all three."""
    colors = _run_colors(n)
    return [
        {
            "color": colors[i],
            "ls": RUN_STYLES[i % len(RUN_STYLES)],
            "marker": RUN_MARKERS[i % len(RUN_MARKERS)],
        }
        for i in range(n)
    ]


def _markevery(n_points: int, i: int, n_runs: int) -> tuple[int, int]:
    """Every step-th point from an offset that differs per run, so that the markers of
    runs on the same curve do not fall on each other."""
    step = max(1, n_points // MARKS_PER_CURVE)
    return (i * step // max(n_runs, 1)) % step, step


def grid_training_curves_figure(grid: GridFolder) -> Figure:
    """Loss and test accuracy per epoch of every run of the grid on shared axes.

    Each run has its own color, line style and marker, and the longest runs are drawn
    first: a run whose curve another one continues (same settings, fewer epochs) lies
    on top of it, instead of under it. The legend is below the axes, in the grid's order.
    """
    runs = [r for r in grid.runs if r.history is not None]
    with _figure("grid_training_curves") as fig:
        ax_loss, ax_acc = fig.subplots(1, 2)
        styles = run_styles(len(runs))
        any_acc = False
        # longest first, so shorter runs are drawn over the runs that continue them
        order = sorted(range(len(runs)), key=lambda i: -len(runs[i].history["epoch"]))
        lines: dict[int, Any] = {}
        for z, i in enumerate(order):
            h, style = runs[i].history, styles[i]
            kw = {"lw": 1.6, "ms": 5, "zorder": 2 + z, **style}
            every = _markevery(len(h["epoch"]), i, len(runs))
            (lines[i],) = ax_loss.plot(
                h["epoch"], h["loss"], label=runs[i].name, markevery=every, **kw
            )
            ok = np.isfinite(h["test_acc"])
            if ok.any():
                every = _markevery(int(ok.sum()), i, len(runs))
                ax_acc.plot(h["epoch"][ok], 100 * h["test_acc"][ok], markevery=every, **kw)
                any_acc = True
        handles = [lines[i] for i in range(len(runs))]
        losses = np.concatenate([r.history["loss"] for r in runs]) if runs else np.array([])
        _loss_axis(ax_loss, losses)
        ax_acc.set_title("test accuracy")
        if any_acc:
            ax_acc.set_xlabel("epoch")
            ax_acc.set_ylabel("accuracy (%)")
            ax_acc.grid(True)
        else:
            _no_data(ax_acc, "no test accuracy recorded during training")
        if runs:
            # below the axes: beside the title it crowded it, inside it would hide curves
            fig.legend(
                handles,
                [r.name for r in runs],
                loc="outside lower center",
                ncols=min(len(runs), 6),
                fontsize=9 if len(runs) > 8 else 10,
            )
        else:
            _no_data(ax_loss, "no run has a history.csv")
        fig.suptitle(f"Training curves: {grid.name}")
    return fig


def _run_colors(n: int) -> list[Any]:
    from matplotlib import colormaps

    cmap = colormaps["tab10" if n <= 10 else "viridis"]
    return [cmap(i) if n <= 10 else cmap(i / max(n - 1, 1)) for i in range(n)]


def grid_varied_parameters(grid: GridFolder) -> dict[str, list[tuple[Any, float, str]]]:
    """For each parameter taking more than one value in the grid: (value, accuracy, run)."""
    varied = {}
    for label, _ in GRID_PARAMETERS:
        points = []
        for run in grid.runs:
            acc, value = run_accuracy(run), run_parameter(run, label)
            if acc is not None and value is not None:
                points.append((value, acc, run.name))
        if len({v for v, _, _ in points}) > 1:
            varied[label] = points
    return varied


#: config fields that name or place a run without changing what it learns
NOT_SETTINGS = frozenset({"name", "out", "data_dir", "device"})
#: the config fields (and experiment CSV columns) each grid parameter spans; the split's
#: sizes count as one setting, the data size, as in the original's "more data" row
PARAMETER_FIELDS: dict[str, frozenset[str]] = {
    "train samples": frozenset({"dtrain", "n_train", "train", "total", "d", "test", "dtest"}),
    "epochs": frozenset({"epochs"}),
    "hidden size": frozenset({"hidden", "hidden_size", "hidden_sizes", "m"}),
}


def _config_items(tree: dict[str, Any], prefix: str = "") -> Iterator[tuple[str, Any]]:
    """(dotted key, value) of a nested config; a list of one repeated value (one activation
    per hidden layer) reads as that value, so it does not change with the layer count."""
    for key, value in tree.items():
        if isinstance(value, dict):
            yield from _config_items(value, f"{prefix}{key}.")
            continue
        if isinstance(value, list) and value and all(v == value[0] for v in value):
            value = value[0]
        yield f"{prefix}{key}", value


def _held_settings(run: RunFolder, label: str) -> tuple[tuple[str, str], ...]:
    """Every setting of ``run`` but the grid parameter ``label`` (and its name, folder
    and device): runs with equal tuples differ in ``label`` alone."""
    skip = NOT_SETTINGS | PARAMETER_FIELDS[label]
    items = {k: repr(v) for k, v in _config_items(run.config) if k.rsplit(".")[-1] not in skip}
    for other, _ in GRID_PARAMETERS:  # also where the config does not hold them
        if other != label:
            items[f"[{other}]"] = repr(run_parameter(run, other))
    return tuple(sorted(items.items()))


@dataclass
class GridLine:
    """Runs of a grid that differ in one parameter only: a line may join their points.

    held : the other varied parameters' values, as a legend says them ("epochs 100")
    points : (value of the parameter, accuracy, run name) of each run
    """

    held: str
    points: list[tuple[Any, float, str]]


def grid_lines(grid: GridFolder, label: str, others: list[str]) -> list[GridLine]:
    """The groups of runs that differ only in the grid parameter ``label`` (every other
    setting equal) and take at least two of its values, in the grid's order.

    ``others``: the other parameters the grid varies, named in each group's ``held``.
    Runs in no group are on no line: joining them would mix the effects of two settings.
    """
    groups: dict[tuple[tuple[str, str], ...], list[RunFolder]] = {}
    for run in grid.runs:
        if run_accuracy(run) is not None and run_parameter(run, label) is not None:
            groups.setdefault(_held_settings(run, label), []).append(run)
    lines = []
    for key, runs in groups.items():
        points = [(run_parameter(r, label), run_accuracy(r), r.name) for r in runs]
        if len({v for v, _, _ in points}) < 2:
            continue
        held = ", ".join(f"{o} {run_parameter(runs[0], o)}" for o in others)
        lines.append((key, GridLine(held or "all else equal", points)))
    # lines whose named settings read alike differ in another: say which
    named = [line.held for _, line in lines]
    for (key, line), held in zip(lines, named, strict=True):
        twins = [k for (k, _), h in zip(lines, named, strict=True) if h == held and k != key]
        if twins:
            mine = dict(key)
            differ = sorted({n for k in twins for n, v in k if mine.get(n) != v})
            extra = ", ".join(f"{n} {mine[n].strip(chr(39))}" for n in differ if n in mine)
            line.held = f"{held}, {extra}" if held != "all else equal" else extra
    return [line for _, line in lines]


def _value_order(value: Any) -> tuple[Any, ...]:
    """Sort key of a category such as 100 or "100-50": by layer count, then sizes."""
    parts = str(value).split("-")
    sizes = [float(p) if p.replace(".", "", 1).isdigit() else math.inf for p in parts]
    return len(parts), sizes, str(value)


def grid_accuracy_figure(
    grid: GridFolder, varied: dict[str, list[tuple[Any, float, str]]]
) -> Figure:
    """Test accuracy against each parameter the grid varies, one panel each.

    Every run is a point; a line joins only runs that differ in that parameter alone
    (``grid_lines``), one line per setting of the others, named in the panel's legend.
    A panel with no such runs says so and draws no line: an average over runs that
    differ in other settings too would show a trend that is not the parameter's.
    """
    with _figure("grid_accuracy") as fig:
        # a row under the panels for their legends: inside, a legend would hide points
        grid_axes = fig.subplots(2, len(varied), height_ratios=(4, 1), squeeze=False)
        for ax, key_ax, (label, points) in zip(*grid_axes, varied.items(), strict=True):
            key_ax.set_axis_off()
            others = [o for o in varied if o != label]
            lines = grid_lines(grid, label, others)
            numeric = all(
                isinstance(v, (int, float)) and not isinstance(v, bool) for v, _, _ in points
            )
            if numeric:
                position = {v: v for v, _, _ in points}
            else:  # categories at 0, 1, 2, ... in a reading order, labelled
                values = sorted({str(v) for v, _, _ in points}, key=_value_order)
                position = {v: values.index(str(v)) for v, _, _ in points}
            on_line = {name for line in lines for _, _, name in line.points}
            for v, a, name in points:
                if name not in on_line:  # compared with no other run: a hollow point
                    ax.scatter(
                        position[v], 100 * a, s=40, facecolors="white", edgecolors="0.45", zorder=3
                    )
            colors = _run_colors(len(lines))
            for line, color in zip(lines, colors, strict=True):
                xs = sorted({position[v] for v, _, _ in line.points})
                # repeated runs of the same settings: their mean
                ys = [np.mean([100 * a for v, a, _ in line.points if position[v] == x]) for x in xs]
                ax.plot(xs, ys, color=color, lw=1.5, alpha=0.8, label=line.held, zorder=2)
                for v, a, _ in line.points:
                    ax.scatter(position[v], 100 * a, color=color, s=40, alpha=0.9, zorder=3)
            if len(points) <= MAX_POINT_LABELS:
                for v, a, run_name in points:
                    ax.annotate(
                        run_name,
                        (position[v], 100 * a),
                        xytext=(5, 3),
                        textcoords="offset points",
                        fontsize=8,
                        color="0.35",
                    )
            if lines:
                handles, labels = ax.get_legend_handles_labels()
                if len(on_line) < len(points):
                    handles.append(
                        Line2D([], [], ls="none", marker="o", mfc="white", mec="0.45", ms=6)
                    )
                    labels.append(f"on no line: no other run differs in {label} alone")
                key_ax.legend(
                    handles,
                    labels,
                    title="each line: all else equal, at",
                    loc="upper center",
                    fontsize=8,
                    title_fontsize=8,
                )
            else:
                _panel_note(key_ax, f"no line: no two runs differ only in {label}")
            xs_all = sorted(set(position.values()))
            if numeric and min(xs_all) > 0 and max(xs_all) / min(xs_all) >= 10:
                ax.set_xscale("log")
            elif numeric:
                ax.xaxis.set_major_locator(MaxNLocator(nbins=5, integer=True))
            else:
                ax.set_xticks(xs_all, values)
            ax.margins(x=0.15)
            ax.set_xlabel(label)
            ax.set_ylabel("test accuracy (%)")
            ax.set_title(f"accuracy vs {label}")
            ax.grid(True)
        fig.suptitle(f"Test accuracy across the grid: {grid.name}")
    return fig


def _panel_note(key_ax: Any, text: str) -> None:
    """A note in the legend box under a panel, where its legend would be."""
    handle = Line2D([], [], ls="none")
    key_ax.legend([handle], [text], loc="upper center", fontsize=8, handlelength=0, handletextpad=0)


# --- writing ------------------------------------------------------------------------------


@dataclass
class FigureSet:
    """What a figures call produced: files written (or figures built) and figures skipped."""

    written: list[Path] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)


def _load_images(run: RunFolder) -> np.ndarray:
    """The dataset's images (N, H, W), through handprop.data."""
    from handprop.data import load_dataset

    if run.dataset is None:
        raise DataError("the run's config names no dataset")
    return load_dataset(run.dataset, data_dir=run.data_dir).images


def build_run_figures(run: RunFolder) -> tuple[list[tuple[str, Figure]], list[str]]:
    """All figures of a run folder, as (file stem, Figure), and the reasons for skips.

    Raises
    ------
    HandpropError
        ``predictions.csv`` (or a comparison file) is missing or malformed.
    """
    models = run.models
    names = run.class_names
    figures: list[tuple[str, Figure]] = []
    skipped: list[str] = []
    for model, P in models.items():
        figures.append((f"confusion_{model}", confusion_figure(P, names, model)))
    figures.append(("per_class_metrics", per_class_figure(models, names)))
    if run.history is not None and run.history["epoch"].size:
        loss = find_key(run.config, "loss")
        figures.append(("training_curves", training_curves_figure(run.history, loss=loss)))
    else:
        skipped.append("training_curves: the run has no history.csv")
    figures += diagnostics_figures(run, skipped)
    figures.append(("correct_incorrect", correct_incorrect_figure(models)))
    figures.append(("top_confusions", top_confusions_figure(models, names)))
    if run.has("model.npz"):
        from handprop import nn

        try:
            figures.append(("first_layer", first_layer_figure(nn.load(run.path / "model.npz"))))
        except HandpropError as exc:
            skipped.append(f"first_layer: {exc}")
    else:
        skipped.append("first_layer: the run has no model.npz")
    try:
        images = _load_images(run)
        P = models[HANDPROP]
        if images.ndim != 3 or P.index.min() < 0 or P.index.max() >= len(images):
            raise DataError(
                f"the dataset's images {images.shape} do not match the indices in {P.path}"
            )
        figures.append(("misclassified", misclassified_figure(P, images, names)))
    except (HandpropError, ImportError, OSError, KeyError, ValueError) as exc:
        skipped.append(f"misclassified: cannot load the dataset's images: {exc}")
    return figures, skipped


def diagnostics_figures(run: RunFolder, skipped: list[str]) -> list[tuple[str, Figure]]:
    """The run's diagnostics figure, or a reason in ``skipped``."""
    if run.diagnostics:
        return [("diagnostics", diagnostics_figure([(run.name, run.diagnostics)]))]
    skipped.append("diagnostics: the run has no diagnostics.csv (trained before it was written)")
    return []


def build_overlay_figures(paths: list[str | Path]) -> tuple[list[tuple[str, Figure]], list[str]]:
    """Figures that overlay several runs: their diagnostics and their training curves."""
    runs = [RunFolder(p) for p in paths]
    names = [r.name for r in runs]
    if len(set(names)) < len(names):  # two folders of one name: tell them apart
        names = [str(r.path) for r in runs]
    figures: list[tuple[str, Figure]] = []
    skipped: list[str] = []
    with_diag = [(n, r.diagnostics) for n, r in zip(names, runs, strict=True) if r.diagnostics]
    for n, r in zip(names, runs, strict=True):
        if not r.diagnostics:
            skipped.append(f"{n}: no diagnostics.csv to overlay")
    if with_diag:
        figures.append(("overlay_diagnostics", diagnostics_figure(with_diag)))
    if any(r.history is not None for r in runs):
        figures.append(("overlay_training_curves", overlay_training_curves_figure(runs)))
    return figures, skipped


def build_grid_figures(grid: GridFolder) -> tuple[list[tuple[str, Figure]], list[str]]:
    """The figures of an experiment grid, as (file stem, Figure), and the reasons for skips."""
    figures: list[tuple[str, Figure]] = []
    skipped: list[str] = []
    if any(r.history is not None for r in grid.runs):
        figures.append(("grid_training_curves", grid_training_curves_figure(grid)))
    else:
        skipped.append("grid_training_curves: no run of the grid has a history.csv")
    varied = grid_varied_parameters(grid)
    if varied:
        figures.append(("grid_accuracy", grid_accuracy_figure(grid, varied)))
    else:
        skipped.append("grid_accuracy: the grid varies neither data size, epochs nor hidden size")
    return figures, skipped


def build_figures(path: str | Path) -> tuple[list[tuple[str, Figure]], list[str]]:
    """Figures of a run folder or of an experiment grid (whichever ``path`` is)."""
    if is_grid(path):
        return build_grid_figures(GridFolder(path))
    return build_run_figures(RunFolder(path))


def write_figures(
    path: str | Path,
    out: str | Path | None = None,
    on_figure: Callable[[Path], None] | None = None,
) -> FigureSet:
    """Write every figure of a run folder or grid as PNG into ``out`` (default PATH/figures).

    Parameters
    ----------
    path : the run folder or experiment grid
    out : the folder for the PNG files; created if needed
    on_figure : called with each file's path as soon as it is written

    Returns
    -------
    FigureSet
        The files written, in order, and one message per figure skipped.
    """
    path = resolve_run(path)
    figures, skipped = build_figures(path)
    folder = Path(out) if out is not None else Path(path) / "figures"
    return _write(figures, skipped, folder, on_figure)


def write_overlay_figures(
    paths: list[str | Path],
    out: str | Path,
    on_figure: Callable[[Path], None] | None = None,
) -> FigureSet:
    """Write the figures overlaying several runs (each a run folder or a config, for its
    latest run) as PNG into ``out``: overlay_diagnostics.png, overlay_training_curves.png."""
    figures, skipped = build_overlay_figures(paths)
    return _write(figures, skipped, Path(out), on_figure)


def _write(
    figures: list[tuple[str, Figure]],
    skipped: list[str],
    folder: Path,
    on_figure: Callable[[Path], None] | None,
) -> FigureSet:
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise ConfigError(f"{folder}: cannot create the figures folder: {exc.strerror}") from None
    result = FigureSet(skipped=skipped)
    for stem, fig in figures:
        written = save_png(fig, folder / f"{stem}.png")
        result.written.append(written)
        if on_figure is not None:
            on_figure(written)
    return result
