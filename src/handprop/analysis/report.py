"""One self-contained HTML page for a run folder or an experiment grid.

Everything the page shows is inside it: figures as base64 ``data:`` PNGs, CSS inline,
no script, font or link to another file, so the page can be mailed, archived or opened
offline and still show the whole run.
"""

from __future__ import annotations

import base64
import html
from collections.abc import Sequence
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from matplotlib.figure import Figure

from handprop import __version__
from handprop.analysis.compare import comparison_caveats
from handprop.analysis.evaluate import (
    COMPARISON_HEADER,
    PER_CLASS_HEADER,
    comparison_rows,
    evaluate_run,
    overall_rows,
)
from handprop.analysis.figures import (
    build_grid_figures,
    build_run_figures,
    diagnostics_figures,
    png_bytes,
    run_accuracy,
    training_curves_figure,
)
from handprop.atomic import atomic_write_text
from handprop.errors import ConfigError
from handprop.run.reader import MODEL_LABELS, GridFolder, RunFolder, find_key, is_grid, resolve_run

CSS = """
body { font-family: -apple-system, "Segoe UI", Helvetica, Arial, sans-serif; color: #222;
       max-width: 1250px; margin: 2em auto; padding: 0 1.5em; line-height: 1.45; }
h1 { font-size: 1.7em; margin-bottom: 0.2em; }
h2 { font-size: 1.3em; margin-top: 2em; border-bottom: 2px solid #1f77b4; padding-bottom: 0.2em; }
h3 { font-size: 1.05em; margin-top: 1.4em; }
.meta { color: #666; font-size: 0.9em; }
.status { display: inline-block; padding: 0.1em 0.6em; border-radius: 0.8em; color: white;
          background: #4c9a5b; font-size: 0.9em; }
.status.bad { background: #c44e52; }
nav a { margin-right: 1.2em; color: #1f77b4; text-decoration: none; }
table { border-collapse: collapse; margin: 0.6em 0 1em; font-size: 0.92em; }
th, td { padding: 0.3em 0.8em; border-bottom: 1px solid #ddd; text-align: right; }
th { background: #f3f6fa; }
th:first-child, td:first-child { text-align: left; }
tr.avg td { font-style: italic; background: #fafafa; }
figure { margin: 1.2em 0 2em; max-width: 100%; }
/* border-box: the 1px border counts in the 100%, so an image wider than the page (the
   diagnostics are 1300 px) scales to the box instead of overflowing it */
figure img { display: block; box-sizing: border-box; max-width: 100%; height: auto;
             border: 1px solid #eee; }
figcaption { color: #555; font-size: 0.9em; margin-top: 0.3em; }
.accuracy { font-size: 2.2em; font-weight: bold; color: #1f77b4; }
.columns { display: flex; flex-wrap: wrap; gap: 2.5em; }
tr.changed td { font-weight: bold; }
td.default { color: #888; font-weight: normal; }
details { margin: 0.6em 0 1em; }
summary { cursor: pointer; color: #1f77b4; }
ul.caveats { color: #444; }
"""


def _esc(value: Any) -> str:
    return html.escape(str(value), quote=True)


def html_table(
    header: Sequence[Any],
    rows: Sequence[Sequence[Any]],
    row_classes: Sequence[str] | None = None,
) -> str:
    """An HTML table with every cell escaped."""
    head = "".join(f"<th>{_esc(h)}</th>" for h in header)
    body = []
    for i, row in enumerate(rows):
        cls = f' class="{_esc(row_classes[i])}"' if row_classes and row_classes[i] else ""
        body.append(f"<tr{cls}>" + "".join(f"<td>{_esc(c)}</td>" for c in row) + "</tr>")
    return f"<table><thead><tr>{head}</tr></thead><tbody>{''.join(body)}</tbody></table>"


def flatten(tree: dict[str, Any], prefix: str = "") -> list[tuple[str, Any]]:
    """A nested config dict as (dotted key, value) pairs, in file order."""
    items: list[tuple[str, Any]] = []
    for key, value in tree.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            items.extend(flatten(value, f"{name}."))
        else:
            items.append((name, value))
    return items


def figure_html(fig: Figure, caption: str, anchor: str) -> str:
    """A <figure> with the PNG embedded as a base64 data: URI."""
    data = base64.b64encode(png_bytes(fig)).decode("ascii")
    return (
        f'<figure id="{_esc(anchor)}"><img alt="{_esc(caption)}" '
        f'src="data:image/png;base64,{data}"><figcaption>{_esc(caption)}</figcaption></figure>'
    )


FIGURE_CAPTIONS = {
    "per_class_metrics": "Per-class precision, recall and F1 of every model. When every score "
    "is 0.5 or more, the axes zoom in: they start a little below the lowest score (the title "
    "and axis labels say where), so that 0.88 and 1.00 do not look alike.",
    "training_curves": "Loss (log scale, as every loss axis) and accuracy per epoch (history.csv).",
    "diagnostics": "Inside training, per layer at every evaluation (diagnostics.csv): the "
    "weight gradient's norm, the weights' norm, the last step's update relative to the "
    "weights, and the share of sigmoid/tanh outputs saturated (derivative below 0.01) or "
    "of ReLU units dead on 512 training samples. A ▼ at the bottom of a log panel marks "
    "a 0 (a log axis cannot show it), such as the update at a cosine schedule's last step.",
    "correct_incorrect": "Correct and incorrect test predictions per model.",
    "top_confusions": "The most frequent confusions, counted for every model.",
    "misclassified": "The most confident mistakes on the test set.",
    "first_layer": "What the first layer learned: its weights drawn as images.",
    "grid_training_curves": "Loss and test accuracy per epoch of every run (each its own "
    "color, line style and marker; shorter runs drawn over longer ones).",
    "grid_accuracy": "Test accuracy against each parameter the grid varies. A line joins "
    "only runs that differ in that parameter alone; a hollow point has no such partner.",
}


def _caption(stem: str) -> str:
    if stem.startswith("confusion_"):
        model = stem.removeprefix("confusion_")
        return f"Confusion matrix of {MODEL_LABELS.get(model, model)}: counts and row-normalized."
    return FIGURE_CAPTIONS.get(stem, stem)


def _figures_section(figures: list[tuple[str, Figure]], skipped: list[str]) -> str:
    parts = ['<h2 id="figures">Figures</h2>']
    parts += [figure_html(fig, _caption(stem), f"fig-{stem}") for stem, fig in figures]
    if skipped:
        parts.append("<p class='meta'>Not shown: " + "; ".join(_esc(s) for s in skipped) + "</p>")
    return "\n".join(parts)


def _page(title: str, nav: list[tuple[str, str]], body: str) -> str:
    links = "".join(f'<a href="#{_esc(a)}">{_esc(t)}</a>' for a, t in nav)
    stamp = datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    return (
        '<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
        f"<title>{_esc(title)}</title><style>{CSS}</style></head><body>\n"
        f"<h1>{_esc(title)}</h1>\n"
        f'<p class="meta">handprop {_esc(__version__)} · generated {stamp}</p>\n'
        f"<nav>{links}</nav>\n{body}\n</body></html>\n"
    )


def _status_html(metrics: dict[str, Any]) -> str:
    status = metrics.get("status") or "unknown"
    cls = "status" if status == "completed" else "status bad"
    text = f'<span class="{cls}">{_esc(status)}</span>'
    if metrics.get("message"):
        text += f" <span class='meta'>{_esc(metrics['message'])}</span>"
    return f"<p>{text}</p>"


def _run_facts(metrics: dict[str, Any]) -> list[list[str]]:
    """Training facts from metrics.json worth a row of their own."""
    facts = []
    for key, label in (
        ("dataset", "dataset"),
        ("epochs_completed", "epochs completed"),
        ("final_loss", "final loss"),
        ("train_seconds", "training time (s)"),
        ("n_params", "parameters"),
    ):
        if metrics.get(key) is not None:
            value = metrics[key]
            facts.append([label, f"{value:.4g}" if isinstance(value, float) else str(value)])
    split = metrics.get("split")
    if isinstance(split, dict):
        facts.append(["split", split_text(split)])
    return facts


def _config_value(name: str, value: Any) -> str:
    """A config value as a reader writes it: 100-50, sigmoid, full batch, 1e-08."""
    if value is None:
        return "full batch" if name == "batch_size" else "not set"
    if isinstance(value, list):
        if not value:
            return "none"
        if len(set(map(str, value))) == 1 and name in ("activation", "dropout"):
            return _config_value(name, value[0])  # one value for every layer
        sep = " · " if name == "layers" else "-"
        return sep.join(_config_value(name, v) for v in value)
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, float):
        return f"{value:g}"
    return str(value)


def defining_fields(config: dict[str, Any]) -> list[str]:
    """The config fields that define this run's algorithm, in a reading order: the data
    and its split, the network, the loss, the optimizer and only its own settings, the
    schedule, and regularization or augmentation when used."""
    from handprop.config import field_specs

    known = field_specs()

    def get(name: str) -> Any:
        value = find_key(config, name)
        return value if value is not None else _default(name)

    names = ["dataset", "split"]
    names += ["total", "train", "test"] if get("split") == "original" else ["train", "test"]
    names += ["seed"]
    names += ["layers"] if get("layers") else ["hidden", "activation"]
    names += ["loss", "init", "dtype", "optimizer", "learning_rate", "batch_size", "epochs"]
    optimizer = get("optimizer")
    if optimizer in ("momentum", "nesterov"):
        names.append("momentum")
    elif optimizer == "adam":
        names += ["beta1", "beta2", "eps"]
    elif optimizer == "rmsprop":
        names += ["rho", "eps"]
    schedule = get("schedule")
    names.append("schedule")
    if schedule == "step":
        names += ["step_size", "gamma"]
    elif schedule == "exponential":
        names.append("gamma")
    if get("warmup"):
        names.append("warmup")
    for name in ("weight_decay", "augment_shift", "augment_rotate", "augment_scale"):
        if get(name):
            names.append(name)
    if get("augment_elastic_alpha"):
        names += ["augment_elastic_alpha", "augment_elastic_sigma"]
    dropout = get("dropout")
    if any(dropout) if isinstance(dropout, list) else dropout:
        names.append("dropout")
    if get("validation"):
        names += ["validation", "patience"]
    return [n for n in names if n in known]


#: what _default returns for a field every config must set (no default to differ from)
REQUIRED = object()


def _default(name: str) -> Any:
    from dataclasses import MISSING, fields

    from handprop.config import RunConfig

    for f in fields(RunConfig):
        if f.name == name:
            default = REQUIRED if f.default is MISSING else f.default
            return list(default) if isinstance(default, tuple) else default
    return None


def _same(a: Any, b: Any) -> bool:
    if isinstance(a, list) and not isinstance(b, list):
        return all(_same(x, b) for x in a)
    if isinstance(a, (int, float)) and isinstance(b, (int, float)) and not isinstance(a, bool):
        return float(a) == float(b)
    return a == b


def config_html(config: dict[str, Any]) -> str:
    """The fields that define the run (non-defaults in bold, the default beside), and
    the whole config.toml folded away in a <details>."""
    from handprop.config import field_specs

    specs = field_specs()
    rows = []
    for name in defining_fields(config):
        value = find_key(config, name)
        default = _default(name)
        changed = default is not REQUIRED and value is not None and not _same(value, default)
        shown_default = _config_value(name, default) if changed else ""
        if value is None and default is not REQUIRED:
            value = default
        rows.append(
            f'<tr class="{"changed" if changed else ""}">'
            f'<td title="{_esc(specs[name].label)}">{_esc(name)}</td>'
            f"<td>{_esc(_config_value(name, value))}</td>"
            f'<td class="default">{_esc(shown_default)}</td></tr>'
        )
    table = (
        "<table><thead><tr><th>setting</th><th>value</th><th>handprop's default</th>"
        f"</tr></thead><tbody>{''.join(rows)}</tbody></table>"
    )
    full = html_table(
        ("field", "value"), [(k, _config_value(k.rsplit(".")[-1], v)) for k, v in flatten(config)]
    )
    return (
        "<p>What defines this run: the settings its algorithm uses; those that differ "
        "from handprop's default are in bold, with the default beside them.</p>"
        + table
        + "<details><summary>The full config (every field of config.toml)</summary>"
        + full
        + "</details>"
    )


def split_text(split: dict[str, Any]) -> str:
    """metrics.json's split in words: "18000 train / 2000 test (original split of the
    first 20000 samples, seed 0)"."""
    parts = [f"{split.get('train')} train", f"{split.get('test')} test"]
    if split.get("validation"):
        parts.insert(1, f"{split['validation']} validation")
    how = split.get("kind")
    if how == "original":
        how = f"original split of the first {split.get('total')} samples, seed {split.get('seed')}"
    elif how == "standard":
        how = "the dataset's standard training and test parts"
    return " / ".join(parts) + (f" ({how})" if how else "")


def _per_class_html(m: dict[str, Any]) -> str:
    pc = m["per_class"]
    rows: list[list[Any]] = [
        [name, f"{p:.4f}", f"{r:.4f}", f"{f:.4f}", s]
        for name, p, r, f, s in zip(
            m["class_names"], pc["precision"], pc["recall"], pc["f1"], pc["support"], strict=True
        )
    ]
    classes = [""] * len(rows)
    for avg in ("macro", "weighted"):
        a = m["averages"][avg]
        rows.append(
            [f"{avg} avg", f"{a['precision']:.4f}", f"{a['recall']:.4f}", f"{a['f1']:.4f}", m["n"]]
        )
        classes.append("avg")
    return html_table(PER_CLASS_HEADER, rows, classes)


def run_report_html(run: RunFolder | str | Path) -> str:
    """The HTML page of one run folder (a string)."""
    if not isinstance(run, RunFolder):
        run = RunFolder(run)
    if not run.has("predictions.csv") and run.metrics.get("status") in ("diverged", "interrupted"):
        return _unfinished_report_html(run)
    result = evaluate_run(run)
    hp = result["models"]["handprop"]
    figures, skipped = build_run_figures(run)
    nav = [("summary", "Summary")]
    parts = [
        '<h2 id="summary">Summary</h2>',
        _status_html(run.metrics),
        f'<p><span class="accuracy">{100 * hp["accuracy"]:.2f}%</span> '
        f"test accuracy ({hp['n_correct']} of {hp['n']} correct)</p>",
    ]
    facts = _run_facts(run.metrics)
    if facts:
        parts.append(html_table(("fact", "value"), facts))
    if len(result["models"]) > 1:
        nav.append(("comparison", "Comparison"))
        parts += [
            '<h2 id="comparison">Comparison with scikit-learn</h2>',
            "<p>Every model scored on the same test samples.</p>",
            html_table(COMPARISON_HEADER, comparison_rows(result)),
        ]
        caveats = comparison_caveats(run.comparison)
        if caveats:
            items = "".join(f"<li>{_esc(c)}</li>" for c in caveats)
            parts.append(f"<p>Caveats:</p><ul class='caveats'>{items}</ul>")
    nav += [("config", "Config"), ("metrics", "Metrics"), ("figures", "Figures")]
    parts.append('<h2 id="config">Config</h2>')
    if run.config:
        parts.append(config_html(run.config))
    else:
        parts.append("<p class='meta'>The run folder has no config.toml.</p>")
    pairs = [[c["true"], c["pred"], c["count"]] for c in hp["top_confusions"]]
    parts += [
        '<h2 id="metrics">Metrics</h2><div class="columns"><div>',
        "<h3>Overall</h3>",
        html_table(("metric", "value"), overall_rows(hp)),
        "</div><div><h3>Most confused pairs</h3>",
        html_table(("true", "predicted", "count"), pairs) if pairs else "<p>None.</p>",
        "</div></div><h3>Per class</h3>",
        _per_class_html(hp),
    ]
    parts.append(_figures_section(figures, skipped))
    return _page(f"handprop run: {run.name}", nav, "\n".join(parts))


def _unfinished_report_html(run: RunFolder) -> str:
    """A diverged or interrupted run has no predictions: show why, its config and curves."""
    parts = ['<h2 id="summary">Summary</h2>', _status_html(run.metrics)]
    facts = _run_facts(run.metrics)
    if facts:
        parts.append(html_table(("fact", "value"), facts))
    parts.append('<h2 id="config">Config</h2>')
    parts.append(config_html(run.config) if run.config else "")
    figures, skipped = [], ["every figure of the test predictions: the run wrote none"]
    if run.history is not None and run.history["epoch"].size:
        loss = find_key(run.config, "loss")
        figures.append(("training_curves", training_curves_figure(run.history, loss=loss)))
    figures += diagnostics_figures(run, skipped)
    parts.append(_figures_section(figures, skipped))
    nav = [("summary", "Summary"), ("config", "Config"), ("figures", "Figures")]
    return _page(f"handprop run: {run.name}", nav, "\n".join(parts))


#: the grid table's columns: (header, metrics.json key, summary.csv column)
GRID_COLUMNS = (
    ("status", "status", "status"),
    ("accuracy", "accuracy", "accuracy"),
    ("final loss", "final_loss", "final_loss"),
    ("epochs", "epochs_completed", "epochs"),
    ("training time (s)", "train_seconds", "seconds"),
    ("message", "message", "message"),
)


def _grid_cell(header: str, value: Any) -> str:
    if value is None or value == "":
        return ""
    try:
        number = float(value)
    except (TypeError, ValueError):
        return str(value)
    if header == "accuracy":
        return f"{100 * number:.2f}%"
    if header == "final loss":
        return f"{number:.4g}"
    if header == "training time (s)":
        return f"{number:.1f}"
    return str(value)


def grid_table(grid: GridFolder) -> tuple[list[str], list[list[str]]]:
    """One row per run of the grid: its run folder's numbers, and summary.csv's for
    what the folder lacks (a run cancelled before it started has no folder), in
    summary.csv's order; the message column only when some run has one."""
    by_name = {run.name: run for run in grid.runs}
    summary: dict[str, dict[str, str]] = {}
    if grid.summary is not None:
        header, rows = grid.summary
        key = next((k for k in ("run", "run_name") if k in header), None)
        if key is not None:
            for row in rows:
                record = dict(zip(header, row, strict=False))
                summary[record[key]] = record
    names = list(summary) + [n for n in by_name if n not in summary]
    rows = []
    for name in names:
        run, record = by_name.get(name), summary.get(name, {})
        metrics = run.metrics if run is not None else {}
        cells = [name]
        for header, key, column in GRID_COLUMNS:
            value = run_accuracy(run) if header == "accuracy" and run is not None else None
            if value is None:
                value = metrics.get(key)
            if value is None:
                value = record.get(column)
            cells.append(_grid_cell(header, value))
        rows.append(cells)
    headers = ["run"] + [h for h, _, _ in GRID_COLUMNS]
    if not any(row[-1] for row in rows):
        headers, rows = headers[:-1], [row[:-1] for row in rows]
    return headers, rows


def grid_report_html(grid: GridFolder | str | Path) -> str:
    """The HTML page of an experiment grid (a string): one table of its runs, then its
    figures."""
    if not isinstance(grid, GridFolder):
        grid = GridFolder(grid)
    figures, skipped = build_grid_figures(grid)
    header, rows = grid_table(grid)
    parts = ['<h2 id="summary">Summary</h2>', html_table(header, rows)]
    parts.append(_figures_section(figures, skipped))
    nav = [("summary", "Summary"), ("figures", "Figures")]
    return _page(f"handprop experiment grid: {grid.name}", nav, "\n".join(parts))


def report_html(path: str | Path) -> str:
    """The HTML page of a run folder or of an experiment grid (whichever ``path`` is)."""
    return grid_report_html(path) if is_grid(path) else run_report_html(path)


def write_report(path: str | Path, out: str | Path | None = None) -> Path:
    """Write the report of a run folder or grid to ``out`` (default PATH/report.html).

    The page is written under a temporary name in the same folder and renamed into
    place, so a reader never sees half a page.
    """
    path = resolve_run(path)
    page = report_html(path)
    out = Path(out) if out is not None else Path(path) / "report.html"
    try:
        atomic_write_text(out, page)
    except OSError as exc:
        raise ConfigError(f"{out}: cannot write the report: {exc.strerror}") from None
    return out
