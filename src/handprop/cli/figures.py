"""``handprop figures RUN [RUN ...]``: PNG figures of a run folder or an experiment grid,
or figures overlaying several runs."""

from __future__ import annotations

from pathlib import Path

import click

#: where overlays of several runs go when --out is not given
OVERLAY_FOLDER = Path("figures")


@click.command("figures", short_help="PNG figures of RUN: confusions, scores, curves, errors.")
@click.argument("runs", nargs=-1, required=True, type=click.Path(path_type=Path))
@click.option(
    "--out",
    type=click.Path(file_okay=False, path_type=Path),
    default=None,
    help="Folder for the PNG files  [default: RUN/figures; for several runs ./figures]",
)
def command(runs: tuple[Path, ...], out: Path | None) -> None:
    """Confusion matrices, per-class scores, training curves, diagnostics and errors of RUN.

    RUN is a run folder, a config file (.toml, .cfg: its latest run), or an experiment
    grid (then: curves of all runs and accuracy against data size, epochs and hidden
    size). Several RUNs are overlaid: their per-layer diagnostics and training curves
    on shared axes, in overlay_diagnostics.png and overlay_training_curves.png. Prints
    each file written.
    """
    from handprop.analysis.figures import write_figures, write_overlay_figures

    def echo(path: Path) -> None:
        click.echo(str(path))

    if len(runs) == 1:
        result = write_figures(runs[0], out, on_figure=echo)
    else:
        result = write_overlay_figures(list(runs), out or OVERLAY_FOLDER, on_figure=echo)
    for message in result.skipped:
        click.echo(f"handprop: warning: skipped {message}", err=True)
