"""Experiment grids: a CSV of runs (one per row) to run folders and a summary table.

The CSV has the original's columns ``run_name,d,dtrain,dtest,m,alpha,epochs`` and any
other config field as an optional column (``dataset``, ``seed``, ``hidden``,
``activation``, ``loss``, ``optimizer``, ``batch_size``, ...); an empty cell takes the
default, or the value from a base config. Each row becomes ``OUT/run_name``.

Re-running a grid picks up where it stopped: a completed run is skipped, an interrupted
one resumes from its checkpoint, anything else starts again. A run that fails (say it
diverges) is recorded in its folder and in the summary, and the others go on.
"""

from __future__ import annotations

import csv
import io
import shutil
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from handprop.atomic import atomic_write_text
from handprop.config import ALIASES, RunConfig, config_from_mapping, load_config, to_toml
from handprop.errors import ConfigError, HandpropError

SUMMARY_COLUMNS = ("run", "status", "accuracy", "final_loss", "seconds", "epochs", "message")


@dataclass(frozen=True)
class GridRow:
    """One row of an experiment CSV, resolved to a validated config."""

    name: str
    config: RunConfig
    line: int


@dataclass
class RunSummary:
    name: str
    status: str  # completed, diverged, interrupted, failed, skipped (already complete)
    accuracy: float | None = None
    final_loss: float | None = None
    seconds: float | None = None
    epochs: int | None = None
    message: str | None = None


def read_grid(path: str | Path, base: RunConfig | None = None) -> list[GridRow]:
    """Rows of an experiment CSV as validated configs; a bad cell names row and column."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8-sig")
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{path}: cannot read the experiment CSV ({exc})") from None
    reader = csv.reader(io.StringIO(text))
    try:
        header = [h.strip() for h in next(reader)]
    except StopIteration:
        raise ConfigError(
            f"{path}: empty file; expected a header such as run_name,d,dtrain,dtest,m,alpha,epochs"
        ) from None
    if "run_name" not in header:
        raise ConfigError(
            f"{path} line 1: the header needs a run_name column, got {','.join(header)}"
        )
    dupes = {h for h in header if header.count(h) > 1}
    if dupes:
        raise ConfigError(f"{path} line 1: column {sorted(dupes)[0]!r} appears twice")
    base_values = {} if base is None else base.to_dict()
    rows: list[GridRow] = []
    names: dict[str, int] = {}
    for line, cells in enumerate(reader, start=2):
        if not any(c.strip() for c in cells):
            continue  # blank line
        if len(cells) != len(header):
            raise ConfigError(
                f"{path} row {line}: expected {len(header)} cells ({','.join(header)}), "
                f"got {len(cells)}"
            )
        values = dict(zip(header, (c.strip() for c in cells), strict=True))
        name = values.pop("run_name")
        where = f"{path} row {line}"
        if not name or name in (".", "..") or any(c in name for c in "/\\"):
            raise ConfigError(f"{where} column run_name: must be a folder name, got {name!r}")
        if name in names:
            raise ConfigError(
                f"{where} column run_name: {name!r} already used on row {names[name]}"
            )
        names[name] = line
        # the row's cells, as written (so messages name the CSV's own column), then the
        # base config's values for the fields no cell sets
        merged = {key: cell for key, cell in values.items() if cell}
        covered = {ALIASES.get(key, key) for key in merged} | {"name"}
        merged.update(
            (k, _as_text(v)) for k, v in base_values.items() if v is not None and k not in covered
        )
        merged["name"] = name
        cfg = config_from_mapping(
            merged,
            where,
            lambda key, where=where: f"{where} column {key}",
        )
        rows.append(GridRow(name, cfg, line))
    if not rows:
        raise ConfigError(f"{path}: no runs (only a header)")
    return rows


def _as_text(value: Any) -> str:
    """A base-config value as the text a CSV cell would hold."""
    if isinstance(value, (list, tuple)):
        return ",".join(str(v) for v in value)
    return repr(value) if isinstance(value, float) else str(value)


# -- running ---------------------------------------------------------------------------


def _blas_threads(jobs: int) -> int:
    """Threads per run so that ``jobs`` runs side by side fill the cores once."""
    from handprop.nn.threads import get_threads

    return max(1, get_threads() // jobs)


def run_one(cfg: RunConfig, run_dir: Path, threads: int | None, progress: bool) -> RunSummary:
    """Train (or resume, or skip) one grid row; never raises for a user error."""
    from handprop.train import CHECKPOINT_FILE, CONFIG_FILE, is_complete, resume_run, train_run

    name = run_dir.name
    try:
        if (run_dir / CONFIG_FILE).is_file():
            if (run_dir / CONFIG_FILE).read_text() != to_toml(cfg):
                raise ConfigError(
                    f"{run_dir} holds a run with another config; remove the folder or "
                    "rename the row's run_name"
                )
            if is_complete(run_dir):
                return _summary(run_dir, "skipped")
        limits = _thread_limits(threads)
        with limits:
            if (run_dir / CHECKPOINT_FILE).is_file():
                result = resume_run(run_dir, progress=progress)
            else:
                if run_dir.exists():
                    shutil.rmtree(run_dir)  # a failed or half-made attempt: start again
                result = train_run(cfg, run_dir, progress=progress)
        return _summary(run_dir, result.status)
    except HandpropError as exc:
        return RunSummary(name, "failed", message=str(exc))


def _thread_limits(threads: int | None):
    """BLAS threads and handprop's own (shards, elementwise passes) held to ``threads``
    in a worker process."""
    import contextlib

    if threads is None:
        return contextlib.nullcontext()
    from threadpoolctl import threadpool_limits

    from handprop.nn.threads import set_threads

    set_threads(threads)
    return threadpool_limits(limits=threads, user_api="blas")


def _summary(run_dir: Path, status: str) -> RunSummary:
    import json

    from handprop.train import METRICS_FILE

    metrics = json.loads((run_dir / METRICS_FILE).read_text())
    return RunSummary(
        run_dir.name,
        status,
        metrics.get("accuracy"),
        metrics.get("final_loss"),
        metrics.get("train_seconds"),
        metrics.get("epochs_completed"),
        metrics.get("message"),
    )


def run_grid(
    rows: list[GridRow],
    out: str | Path,
    jobs: int = 1,
    progress: bool = True,
    on_done: Callable[[RunSummary], None] | None = None,
) -> list[RunSummary]:
    """Run every row into ``out/<run_name>``; return the summaries in row order.

    With ``jobs > 1`` the runs go to that many worker processes, each limited to
    cores // jobs threads (BLAS's and handprop's own), so that the machine's cores are
    used once, not jobs times over.
    """
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    results: dict[str, RunSummary] = {}
    if jobs <= 1:
        for row in rows:
            summary = run_one(row.config, out / row.name, None, progress)
            results[row.name] = summary
            if on_done:
                on_done(summary)
    else:
        threads = _blas_threads(jobs)
        with ProcessPoolExecutor(max_workers=jobs) as pool:
            futures = {
                pool.submit(run_one, row.config, out / row.name, threads, False): row.name
                for row in rows
            }
            for future in as_completed(futures):
                summary = future.result()
                results[futures[future]] = summary
                if on_done:
                    on_done(summary)
    summaries = [results[row.name] for row in rows]
    write_summary(out, summaries)
    return summaries


def write_summary(out: Path, summaries: list[RunSummary]) -> None:
    """summary.csv and summary.md in the grid folder."""
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(SUMMARY_COLUMNS)
    for s in summaries:
        writer.writerow(
            [
                s.name,
                s.status,
                "" if s.accuracy is None else f"{s.accuracy:.6f}",
                "" if s.final_loss is None else f"{s.final_loss:.6g}",
                "" if s.seconds is None else f"{s.seconds:.2f}",
                "" if s.epochs is None else s.epochs,
                s.message or "",
            ]
        )
    atomic_write_text(out / "summary.csv", buf.getvalue())
    atomic_write_text(out / "summary.md", summary_markdown(summaries))


def summary_markdown(summaries: list[RunSummary]) -> str:
    lines = [
        "| run | accuracy | final loss | time (s) | epochs | status |",
        "|---|---:|---:|---:|---:|---|",
    ]
    for s in summaries:
        acc = "" if s.accuracy is None else f"{s.accuracy:.2%}"
        loss = "" if s.final_loss is None else f"{s.final_loss:.4f}"
        secs = "" if s.seconds is None else f"{s.seconds:.1f}"
        status = s.status if not s.message else f"{s.status}: {s.message}"
        lines.append(f"| {s.name} | {acc} | {loss} | {secs} | {s.epochs or ''} | {status} |")
    return "\n".join(lines) + "\n"


def load_base(path: str | Path | None) -> RunConfig | None:
    return None if path is None else load_config(path)
