"""``handprop figures RUN``: PNG figures of a run folder or an experiment grid."""

from __future__ import annotations

from pathlib import Path

import click


@click.command("figures")
@click.argument("run", type=click.Path(path_type=Path))
@click.option(
    "--out",
    type=click.Path(file_okay=False, path_type=Path),
    default=None,
    help="Folder for the PNG files  [default: RUN/figures]",
)
def command(run: Path, out: Path | None) -> None:
    """Confusion matrices, per-class scores, training curves and errors of RUN.

    RUN is a run folder, or an experiment grid (then: curves of all runs and accuracy
    against data size, epochs and hidden size). Prints each file written.
    """
    from handprop.figures import write_figures

    result = write_figures(run, out, on_figure=lambda path: click.echo(str(path)))
    for message in result.skipped:
        click.echo(f"handprop: warning: skipped {message}", err=True)
