"""``handprop evaluate RUN``: metrics recomputed from a run folder's predictions."""

from __future__ import annotations

import json
from pathlib import Path

import click


@click.command("evaluate")
@click.argument("run", type=click.Path(path_type=Path))
@click.option("--json", "as_json", is_flag=True, help="Print the metrics as JSON.")
@click.option(
    "--top",
    type=click.IntRange(min=0),
    default=5,
    show_default=True,
    help="How many confused pairs to list.",
)
def command(run: Path, as_json: bool, top: int) -> None:
    """Accuracy, per-class precision/recall/F1 and confusion matrix of RUN.

    Recomputed from RUN/predictions.csv; scikit-learn comparison predictions in RUN
    (predictions_sklearn_*.csv) are scored the same way and shown side by side.
    """
    from handprop.evaluate import evaluate_run, format_evaluation

    result = evaluate_run(run, top=top)
    click.echo(json.dumps(result, indent=2) if as_json else format_evaluation(result))
