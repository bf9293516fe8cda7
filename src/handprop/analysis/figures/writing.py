"""Building the figures of a run folder, an experiment grid or several runs overlaid,
and writing them as PNG files.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from matplotlib.figure import Figure

from handprop.analysis.figures.diagnostics import diagnostics_figure, overlay_training_curves_figure
from handprop.analysis.figures.grid import (
    grid_accuracy_figure,
    grid_training_curves_figure,
    grid_varied_parameters,
)
from handprop.analysis.figures.run import (
    confusion_figure,
    correct_incorrect_figure,
    first_layer_figure,
    misclassified_figure,
    per_class_figure,
    top_confusions_figure,
    training_curves_figure,
)
from handprop.analysis.figures.style import save_png
from handprop.errors import ConfigError, DataError, HandpropError
from handprop.run.reader import HANDPROP, GridFolder, RunFolder, find_key, is_grid, resolve_run


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
