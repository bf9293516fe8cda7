"""``handprop evaluate RUN...``: metrics recomputed from run folders' predictions; several
runs (or a grid with --ensemble) are scored as one ensemble."""

from __future__ import annotations

import json
from pathlib import Path

import click


@click.command("evaluate", short_help="Accuracy, per-class precision/recall/F1, confusions of RUN.")
@click.argument("runs", nargs=-1, required=True, type=click.Path(path_type=Path))
@click.option(
    "--ensemble",
    is_flag=True,
    help="Score the runs (a grid: all its finished runs) as one ensemble: the mean of "
    "their probabilities. Implied by several RUNs.",
)
@click.option("--json", "as_json", is_flag=True, help="Print the metrics as JSON.")
@click.option(
    "--top",
    type=click.IntRange(min=0),
    default=5,
    show_default=True,
    help="How many confused pairs to list.",
)
def command(runs: tuple[Path, ...], ensemble: bool, as_json: bool, top: int) -> None:
    """Accuracy, per-class precision/recall/F1 and confusion matrix of RUN.

    RUN is a run folder or a config file (.toml, .cfg: its latest run); with
    --ensemble, also an experiment grid (its finished runs). Recomputed from
    RUN/predictions.csv; scikit-learn comparison predictions in RUN
    (predictions_sklearn_*.csv) are scored the same way and shown side by side.

    Several RUNs, or --ensemble (e.g. handprop evaluate GRID --ensemble), are scored as
    one ensemble: the mean of their predicted probabilities, next to each member's own
    score. They must share the dataset, classes and test samples; the ensemble's
    training time is the sum of its members'.
    """
    from handprop.analysis.evaluate import evaluate_ensemble, evaluate_run, format_evaluation
    from handprop.errors import ConfigError
    from handprop.run.reader import is_grid, resolve_run

    if ensemble or len(runs) > 1:
        result = evaluate_ensemble(runs, top=top)
    else:
        if is_grid(resolve_run(runs[0])):
            raise ConfigError(
                f"{runs[0]}: an experiment grid; name one of its run folders, or add "
                "--ensemble to score its runs as one ensemble"
            )
        result = evaluate_run(runs[0], top=top)
    click.echo(json.dumps(result, indent=2) if as_json else format_evaluation(result))
