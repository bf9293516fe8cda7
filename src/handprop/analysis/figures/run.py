"""The figures of one run: confusion matrices, per-class scores, training curves, the
most confident mistakes, the first layer's weights, correct against incorrect, and the
most confused pairs.

The confusion heat maps are scikit-learn's ``ConfusionMatrixDisplay`` drawn into our
own axes (it imports pyplot for its colormap lookup, but draws no pyplot figure).
"""

from __future__ import annotations

import math
import textwrap
from typing import Any

import numpy as np
from matplotlib.colors import Normalize
from matplotlib.figure import Figure
from matplotlib.ticker import FormatStrFormatter, MaxNLocator, MultipleLocator

from handprop.analysis.figures.style import (
    BAR_LABEL_FILL,
    BAR_LABEL_SIZES,
    CMAP,
    CORRECT_COLOR,
    DPI,
    FIRST_LAYER_COLS,
    FIRST_LAYER_ROWS,
    IMAGE_CMAP,
    INCORRECT_COLOR,
    LOSS_LABELS,
    MISCLASSIFIED_COLS,
    MISCLASSIFIED_ROWS,
    MODEL_COLORS,
    TOP_PAIRS,
    TRAIN_COLOR,
    WEIGHT_CMAP,
    _figure,
    _label,
    _loss_axis,
    _no_data,
    _tick_rotation,
    first_layer_rows,
    misclassified_rows,
)
from handprop.errors import DataError
from handprop.metrics import confusion_matrix, per_class, top_confusions
from handprop.run.reader import HANDPROP, Predictions


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
    rows = first_layer_rows(len(W))
    with _figure("first_layer", rows) as fig:
        axes = fig.subplots(rows, FIRST_LAYER_COLS, squeeze=False)
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
