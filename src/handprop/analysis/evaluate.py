"""Metrics of a run recomputed from its predictions, and their plain-text tables.

``metrics.json`` holds what training computed; ``handprop evaluate`` recomputes the same
numbers from ``predictions.csv`` (with :mod:`handprop.metrics`, the one implementation)
so that a run can be checked, and so that the scikit-learn comparison predictions
written beside it are scored the very same way.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from handprop.errors import ConfigError
from handprop.metrics import classification_metrics, top_confusions
from handprop.run.reader import (
    MODEL_LABELS,
    GridFolder,
    Predictions,
    RunFolder,
    is_grid,
    resolve_run,
)

TOP_CONFUSIONS = 5


def evaluate_predictions(
    predictions: Predictions, class_names: Sequence[str], top: int = TOP_CONFUSIONS
) -> dict[str, Any]:
    """Metrics of one model's predictions (JSON-able).

    Returns
    -------
    dict
        :func:`handprop.metrics.classification_metrics` plus ``n_correct``,
        ``n_incorrect`` and ``top_confusions``: a list of ``{"true", "pred", "count"}``
        with class names, most frequent first.
    """
    m = classification_metrics(predictions.y_true, predictions.y_pred, list(class_names))
    n_correct = int(np.trace(np.asarray(m["confusion_matrix"])))
    m["n_correct"] = n_correct
    m["n_incorrect"] = m["n"] - n_correct
    m["top_confusions"] = [
        {"true": class_names[i], "pred": class_names[j], "count": count}
        for i, j, count in top_confusions(np.asarray(m["confusion_matrix"]), top)
    ]
    return m


def evaluate_run(run: RunFolder | str | Path, top: int = TOP_CONFUSIONS) -> dict[str, Any]:
    """Metrics of every model whose predictions the run folder holds.

    Returns
    -------
    dict
        ``{"run": path, "status": ..., "class_names": [...], "models": {name: metrics}}``
        with ``"handprop"`` first and then each scikit-learn comparison model present;
        ``recorded_accuracy`` is metrics.json's accuracy when it has one.
    """
    if not isinstance(run, RunFolder):
        run = RunFolder(run)
    names = run.class_names
    models = {model: evaluate_predictions(P, names, top) for model, P in run.models.items()}
    for model, seconds in run.train_seconds.items():
        if model in models:
            models[model]["train_seconds"] = seconds
    return {
        "run": str(run.path),
        "status": run.metrics.get("status"),
        "recorded_accuracy": run.metrics.get("accuracy"),
        "class_names": names,
        "models": models,
    }


def ensemble_runs(paths: Sequence[str | Path]) -> tuple[list[RunFolder], list[str]]:
    """The run folders of ``paths`` (run folders, config files: their latest run, grids:
    every run), and a note for each run of a grid left out because it has no
    predictions (it failed, or has not finished)."""
    runs: list[RunFolder] = []
    notes: list[str] = []
    for path in paths:
        path = resolve_run(path)
        if is_grid(path):
            for run in GridFolder(path).runs:
                if run.has("predictions.csv"):
                    runs.append(run)
                else:
                    status = run.metrics.get("status") or "unfinished"
                    notes.append(f"left out {run.path}: no predictions.csv ({status})")
        else:
            runs.append(RunFolder(path))
    return runs, notes


def evaluate_ensemble(paths: Sequence[str | Path], top: int = TOP_CONFUSIONS) -> dict[str, Any]:
    """Metrics of the ensemble of runs: the mean of their predicted probabilities
    (predictions.csv), then each member's own, for comparison.

    The runs must agree on the dataset, the classes and the test samples (the same
    indices in the same order); ConfigError names the first that does not. The
    ensemble's training time is the sum of its members'.

    Returns
    -------
    dict
        As :func:`evaluate_run`'s, with ``"ensemble"`` first in ``models``, then each
        member by its folder's name; ``members`` lists the folders, ``notes`` the runs
        of a grid left out.
    """
    runs, notes = ensemble_runs(paths)
    if not runs:
        raise ConfigError(f"{', '.join(map(str, paths))}: no finished run to put in an ensemble")
    first = runs[0]
    base = first.predictions
    for run in runs[1:]:
        P = run.predictions
        problem = None
        if run.dataset != first.dataset:
            problem = f"dataset {run.dataset!r}, not {first.dataset!r}"
        elif run.class_names != first.class_names or P.k != base.k:
            problem = f"classes {run.class_names}, not {first.class_names}"
        elif not np.array_equal(P.index, base.index) or not np.array_equal(P.y_true, base.y_true):
            problem = f"other test samples ({P.n} rows) than its {base.n}"
        if problem:
            raise ConfigError(
                f"{run.path}: {problem} in {first.path}; an ensemble's runs must agree on "
                "input, classes and test samples"
            )
    names = first.class_names
    mean_P = np.mean([run.predictions.P for run in runs], axis=0)
    ensemble = Predictions(base.index, base.y_true, mean_P.argmax(axis=1), mean_P, base.path)
    models = {"ensemble": evaluate_predictions(ensemble, names, top)}
    seconds = [run.train_seconds.get("handprop") for run in runs]
    if all(isinstance(t, float) for t in seconds):
        models["ensemble"]["train_seconds"] = float(sum(seconds))  # every member's time
    for run, t in zip(runs, seconds, strict=True):
        key = run.name if run.name not in models else str(run.path)
        models[key] = evaluate_predictions(run.predictions, names, top)
        if t is not None:
            models[key]["train_seconds"] = t
    return {
        "run": f"ensemble of {len(runs)} runs",
        "status": "ensemble",
        "recorded_accuracy": None,
        "class_names": names,
        "models": models,
        "members": [str(run.path) for run in runs],
        "notes": notes,
    }


def format_table(
    header: Sequence[str], rows: Sequence[Sequence[Any]], align: str | None = None
) -> str:
    """Rows as an aligned plain-text table.

    ``align`` has one letter per column, ``l`` or ``r``; by default the first column is
    left-aligned and the others right-aligned (numbers line up on their last digit).
    """
    cells = [[str(c) for c in header]] + [[str(c) for c in row] for row in rows]
    widths = [max(len(row[j]) for row in cells) for j in range(len(header))]
    align = align or "l" + "r" * (len(header) - 1)

    def fmt(row: list[str]) -> str:
        parts = [
            c.ljust(w) if a == "l" else c.rjust(w)
            for c, w, a in zip(row, widths, align, strict=True)
        ]
        return "  ".join(parts).rstrip()

    rule = "  ".join("-" * w for w in widths)
    return "\n".join([fmt(cells[0]), rule] + [fmt(row) for row in cells[1:]])


def _pct(x: float) -> str:
    return f"{100 * x:.2f}%"


def overall_rows(m: dict[str, Any]) -> list[list[str]]:
    """(metric, value) rows: accuracy, counts, macro and weighted averages."""
    rows = [
        ["accuracy", _pct(m["accuracy"])],
        ["correct", f"{m['n_correct']} / {m['n']}"],
    ]
    for avg in ("macro", "weighted"):
        for name in ("precision", "recall", "f1"):
            rows.append([f"{avg} {name}", f"{m['averages'][avg][name]:.4f}"])
    return rows


def per_class_rows(m: dict[str, Any]) -> list[list[str]]:
    """(class, precision, recall, F1, support) rows, then the two averages."""
    pc = m["per_class"]
    rows = [
        [name, f"{p:.4f}", f"{r:.4f}", f"{f:.4f}", str(s)]
        for name, p, r, f, s in zip(
            m["class_names"], pc["precision"], pc["recall"], pc["f1"], pc["support"], strict=True
        )
    ]
    for avg in ("macro", "weighted"):
        a = m["averages"][avg]
        rows.append(
            [
                f"{avg} avg",
                f"{a['precision']:.4f}",
                f"{a['recall']:.4f}",
                f"{a['f1']:.4f}",
                str(m["n"]),
            ]
        )
    return rows


PER_CLASS_HEADER = ("class", "precision", "recall", "f1", "support")


def format_seconds(seconds: Any) -> str:
    """A training time as "12.3", or "-" when none was recorded."""
    return f"{seconds:.1f}" if isinstance(seconds, (int, float)) else "-"


def comparison_rows(result: dict[str, Any]) -> list[list[str]]:
    """(model, accuracy, macro F1, correct, incorrect, training time) rows, one per model."""
    return [
        [
            MODEL_LABELS.get(model, model),
            _pct(m["accuracy"]),
            f"{m['averages']['macro']['f1']:.4f}",
            str(m["n_correct"]),
            str(m["n_incorrect"]),
            format_seconds(m.get("train_seconds")),
        ]
        for model, m in result["models"].items()
    ]


COMPARISON_HEADER = ("model", "accuracy", "macro f1", "correct", "incorrect", "time (s)")


def format_confusion(m: dict[str, Any]) -> str:
    """The confusion matrix as a table: rows true class, columns predicted class."""
    names = m["class_names"]
    header = ["true \\ pred", *names]
    rows = [[name, *row] for name, row in zip(names, m["confusion_matrix"], strict=True)]
    return format_table(header, rows)


def format_evaluation(result: dict[str, Any]) -> str:
    """The whole evaluation as plain text: one block per table."""
    hp = next(iter(result["models"].values()))  # handprop's, or the ensemble's
    blocks = [
        f"run: {result['run']}  (status: {result['status'] or 'unknown'}, {hp['n']} test samples)"
    ]
    if result.get("members"):
        blocks[0] += "\nmembers: " + ", ".join(result["members"])
        blocks[0] += "\nthe ensemble's probabilities are the mean of its members'; its time is "
        blocks[0] += "the sum of theirs"
    blocks += result.get("notes") or []
    recorded = result.get("recorded_accuracy")
    if isinstance(recorded, (int, float)) and abs(recorded - hp["accuracy"]) > 1e-9:
        blocks.append(
            f"note: metrics.json records accuracy {_pct(recorded)}, "
            f"predictions.csv gives {_pct(hp['accuracy'])}"
        )
    if len(result["models"]) > 1:
        blocks.append("models\n" + format_table(COMPARISON_HEADER, comparison_rows(result)))
    blocks.append("overall\n" + format_table(("metric", "value"), overall_rows(hp)))
    blocks.append("per class\n" + format_table(PER_CLASS_HEADER, per_class_rows(hp)))
    blocks.append("confusion matrix (rows: true, columns: predicted)\n" + format_confusion(hp))
    pairs = [[c["true"], c["pred"], c["count"]] for c in hp["top_confusions"]]
    if pairs:
        blocks.append(
            "most confused pairs\n" + format_table(("true", "predicted", "count"), pairs, "llr")
        )
    else:
        blocks.append("most confused pairs\n(none: every test sample is classified correctly)")
    return "\n\n".join(blocks)
