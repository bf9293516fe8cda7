"""``handprop compare RUN``: scikit-learn's MLPClassifier on the run's own split."""

from __future__ import annotations

import json
from pathlib import Path

import click

CHOICES = {"default": "sklearn_default", "analogue": "sklearn_analogue"}


@click.command("compare", short_help="Train scikit-learn's MLP on RUN's split, beside handprop.")
@click.argument("run", type=click.Path(path_type=Path))
@click.option(
    "--only",
    type=click.Choice(sorted(CHOICES)),
    multiple=True,
    help="Train only this scikit-learn setting (repeatable); by default both.",
)
@click.option("--data-dir", type=click.Path(path_type=Path), help="Where the dataset is now.")
@click.option("--json", "as_json", is_flag=True, help="Print comparison.json instead.")
@click.option("-q", "--quiet", is_flag=True, help="No progress messages.")
def command(run: Path, only: tuple[str, ...], data_dir: Path | None, as_json: bool, quiet: bool):
    """Train scikit-learn's MLPClassifier on exactly RUN's split, beside handprop.

    Two settings: scikit-learn's defaults (ReLU, Adam), and the closest analogue of
    the run's own algorithm (for the original: logistic, full-batch SGD, no momentum,
    no L2, the same epochs). RUN is a run folder or a config file (.toml, .cfg: its
    latest run). Their predictions are saved in RUN as predictions_sklearn_*.csv, and the
    side-by-side numbers (accuracy, macro F1, time, epochs, scikit-learn's parameters
    and caveats) in RUN/comparison.json.
    """
    from handprop.analysis.compare import MODELS, compare_run, format_comparison

    models = tuple(CHOICES[name] for name in only) or MODELS
    echo = lambda line: click.echo(line, err=True)  # noqa: E731 - progress on stderr
    result = compare_run(run, models=models, data_dir=data_dir, progress=not quiet, echo=echo)
    click.echo(json.dumps(result, indent=2) if as_json else format_comparison(result))
