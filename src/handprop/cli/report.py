"""``handprop report RUN``: one self-contained HTML page of a run folder or grid."""

from __future__ import annotations

from pathlib import Path

import click


@click.command("report", short_help="One self-contained HTML page of RUN.")
@click.argument("run", type=click.Path(path_type=Path))
@click.option(
    "--out",
    type=click.Path(dir_okay=False, path_type=Path),
    default=None,
    help="The HTML file to write  [default: RUN/report.html]",
)
def command(run: Path, out: Path | None) -> None:
    """Config, metrics, comparison and figures of RUN in one HTML file.

    RUN is a run folder, an experiment grid, or a config file (.toml, .cfg: its latest
    run). The page embeds its figures and styles,
    so it opens offline and can be sent as a single file. Prints the file written.
    """
    from handprop.analysis.report import write_report

    click.echo(str(write_report(run, out)))
