"""The figures of an experiment grid: every run's training curves, and test accuracy
against each parameter the grid varies.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
from matplotlib.figure import Figure
from matplotlib.lines import Line2D
from matplotlib.ticker import MaxNLocator

from handprop.analysis.figures.style import (
    MAX_POINT_LABELS,
    _figure,
    _loss_axis,
    _no_data,
    _run_colors,
)
from handprop.run.reader import GridFolder, RunFolder, find_key

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
NOT_SETTINGS = frozenset({"name", "out", "data_dir", "device", "graph"})
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
