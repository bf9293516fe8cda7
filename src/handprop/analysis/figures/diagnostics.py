"""Figures of what happens inside training: the per-layer diagnostics of one run or
several overlaid (``diagnostics.csv``), and several runs' training curves overlaid.
"""

from __future__ import annotations

from typing import Any

import numpy as np
from matplotlib.figure import Figure
from matplotlib.lines import Line2D
from matplotlib.ticker import MaxNLocator

from handprop.analysis.figures.style import (
    LOSS_LABELS,
    _figure,
    _log_axis,
    _loss_axis,
    _no_data,
    _run_colors,
)
from handprop.run.reader import LayerDiagnostics, RunFolder, find_key

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
