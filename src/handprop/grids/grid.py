"""Experiment grids: a CSV of runs (one per row) to run folders and a summary table.

The CSV has the original's columns ``run_name,d,dtrain,dtest,m,alpha,epochs`` and any
other config field as an optional column (``dataset``, ``seed``, ``hidden``,
``activation``, ``loss``, ``optimizer``, ``batch_size``, ``device``, ...); an empty cell takes the
default, or the value from a base config. Each row becomes ``OUT/run_name``.

A row splits the data by its ``split_seed`` cell, else by the base config's split seed
(its ``split_seed``, else its ``seed``), else by its own ``seed``: a ``seed`` column over a
base config varies the initialisation, as ``handprop train BASE --seed S`` does, and the
rows share a test set (an ensemble); without a base, each seed is also its own split.

Re-running a grid picks up where it stopped: a completed run is skipped (its row in the
summary keeps its status, ``completed``, and its metrics), an interrupted
or killed one resumes from its checkpoint, anything else starts again in its own
folder. A run that fails (say it diverges, or would not fit in memory) is recorded in
its folder and in the summary, and the others go on. handprop writes only into folders
it made (:mod:`handprop.run.claim`): a row whose folder is somebody else's fails, and the
user's folder is left as it was. One process runs a grid folder at a time (it holds the
folder's :class:`~handprop.run.claim.GridLock`): a second one is refused before it touches
a row or the summary. With ``jobs > 1`` the worker processes die with the grid's
process (``kill -9`` included), so that running the grid again at once continues it.
"""

from __future__ import annotations

import contextlib
import csv
import dataclasses
import io
import os
import signal
import sys
import time
from collections.abc import Callable
from concurrent.futures import Future, ProcessPoolExecutor, as_completed
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from handprop.atomic import atomic_write_text
from handprop.config import (
    ALIASES,
    RunConfig,
    config_from_mapping,
    load_config,
    parse_toml_config,
    run_name_problem,
)
from handprop.errors import ConfigError, HandpropError, Interrupted
from handprop.run.claim import GRID_MARKER, FolderLock, GridLock, make_or_adopt, remove_if_unused

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
    status: str  # completed, diverged, interrupted, failed or cancelled
    accuracy: float | None = None
    final_loss: float | None = None
    seconds: float | None = None
    epochs: int | None = None
    message: str | None = None
    # complete before this grid ran: not trained again; status and metrics are its run's
    skipped: bool = False


def read_grid(path: str | Path, base: RunConfig | None = None) -> list[GridRow]:
    """Rows of an experiment CSV as validated configs; a bad cell names row and column."""
    from handprop.files import MAX_GRID_BYTES, read_regular

    path = Path(path)
    try:
        # not a FIFO, a device or a huge file: refused before it is opened
        text = read_regular(path, "experiment CSV", MAX_GRID_BYTES, ConfigError)
        text = text.decode("utf-8-sig")
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
    if base is not None:
        # the base's split holds for every row, whatever seed a row sets (as --seed keeps
        # a config's split); a split_seed cell changes it
        base_values["split_seed"] = base.resolved_split_seed
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
        problem = run_name_problem(name)
        if problem:
            raise ConfigError(f"{where} column run_name: {problem}")
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


def run_one(
    cfg: RunConfig,
    run_dir: Path,
    threads: int | None,
    progress: bool,
    checkpoint_seconds: float | None = None,
) -> RunSummary:
    """Train (or resume, or skip) one grid row; never raises for a user error.

    The row's folder is made, or must be one handprop made (its marker inside); it is
    locked while the row trains, so two grids on one folder never train a row twice.
    A Ctrl-C propagates, after the row has checkpointed.
    """
    from handprop.run import CHECKPOINT_SECONDS, resume_run, train_run
    from handprop.run.writer import CONFIG_FILE

    seconds = CHECKPOINT_SECONDS if checkpoint_seconds is None else checkpoint_seconds
    name = run_dir.name
    made = False
    try:
        folder, made = make_or_adopt(run_dir)
        with FolderLock(folder):
            config_file = folder / CONFIG_FILE
            skipped = existing_row(cfg, folder)
            if skipped is not None:
                return skipped
            with _thread_limits(threads):
                if config_file.is_file():  # interrupted, killed, diverged: continue it
                    result = resume_run(
                        folder, progress=progress, checkpoint_seconds=seconds, device=cfg.device
                    )
                else:
                    result = train_run(cfg, folder, progress=progress, checkpoint_seconds=seconds)
        return _summary(folder, result.status)
    except (HandpropError, OSError, MemoryError) as exc:
        if made:
            remove_if_unused(run_dir)  # refused before it began: leave no trace
        if isinstance(exc, MemoryError):
            return RunSummary(name, "failed", message="ran out of memory")
        return RunSummary(name, "failed", message=_one_line(exc))


def existing_row(cfg: RunConfig, folder: Path) -> RunSummary | None:
    """What a row's folder already holds: its summary (status "completed", marked
    ``skipped``) when the row is complete, None when it must (re)start or resume.

    The row's config must be the folder's, but for the device: a grid begun on the CPU
    may go on with ``--device cuda`` (the same numbers to float rounding).

    Raises
    ------
    ConfigError
        The folder holds a run with another config.
    """
    from handprop.files import MAX_CONFIG_BYTES, read_regular
    from handprop.run.writer import CONFIG_FILE, is_complete

    config_file = folder / CONFIG_FILE
    if config_file.is_file():
        text = read_regular(config_file, "config file", MAX_CONFIG_BYTES, ConfigError)
        text = text.decode("utf-8")
        if not _same_run(text, cfg, config_file):
            raise ConfigError(
                f"{folder} holds a run with another config{_split_seed_hint(text, cfg)}; "
                "rename the row's run_name or choose another --out"
            )
        if is_complete(folder):
            return dataclasses.replace(_summary(folder, "completed"), skipped=True)
    return None


def _same_run(text: str, cfg: RunConfig, path: Path) -> bool:
    """Whether the config.toml ``text`` describes ``cfg``'s run, on any device (one
    written before configs had a device reads as "cpu") and with CUDA graphs on or
    off, split by the same seed (one
    written before split_seed existed splits by its seed)."""
    try:
        saved = parse_toml_config(text, str(path))
    except HandpropError:
        return False
    return _as_trained(saved.replace(device=cfg.device, graph=cfg.graph)) == _as_trained(cfg)


def _as_trained(cfg: RunConfig) -> RunConfig:
    """``cfg`` with the seed its split is drawn from written out; without one where the
    split draws nothing (the standard split, no validation part), so that split_seed
    alone never makes two runs of the same data differ."""
    draws = cfg.split == "original" or cfg.validation > 0
    return cfg.replace(split_seed=cfg.resolved_split_seed if draws else None)


def _split_seed_hint(text: str, cfg: RunConfig) -> str:
    """A hint for the message, " (split with split_seed 1, ...)", when the saved run
    differs from the row in its split's seed alone (say, a grid run before a seed column
    over a base config kept the base's split), else ""."""
    try:
        saved = parse_toml_config(text, "config.toml")
        saved = _as_trained(saved.replace(device=cfg.device, graph=cfg.graph))
    except HandpropError:
        return ""
    now = _as_trained(cfg)
    if saved.split_seed == now.split_seed or saved.replace(split_seed=now.split_seed) != now:
        return ""
    return (
        f" (split with split_seed {saved.split_seed}, the row asks for {now.split_seed}: "
        f"a split_seed cell of {saved.split_seed} continues it)"
    )


def _one_line(exc: BaseException) -> str:
    if isinstance(exc, OSError) and not isinstance(exc, HandpropError):
        return f"{exc.filename}: {exc.strerror}" if exc.filename else str(exc.strerror or exc)
    return str(exc)


class _Worker:
    """What a worker process is doing, for its signal handler."""

    running = False  # a row is training
    stopping = False  # and has been told to stop
    stopped = False  # the grid is stopping: rows handed over from now on do not start


def _on_signal_in_worker(signum: int, frame: object) -> None:
    """The first SIGINT or SIGTERM stops the running row (it checkpoints); an idle
    worker, or one already stopping, lets it pass, so that a second signal cannot cut
    a checkpoint short. (The handler stays installed: swapping in SIG_IGN while a
    signal is pending makes Python raise "Signal ignored due to race condition".)"""
    _Worker.stopped = True
    if _Worker.running and not _Worker.stopping:
        _Worker.stopping = True
        raise Interrupted(signum)


def _init_worker(parent: int | None) -> None:
    """A worker process's start: it dies with its parent (the grid's process
    ``parent``, or None: whichever process started it), holds none of the grid's
    locks, and stops its row on SIGINT or SIGTERM."""
    _die_with(os.getppid() if parent is None else parent)
    GridLock.close_inherited()  # a forked copy of the grid's lock, never this worker's
    for signum in _STOP_SIGNALS:
        signal.signal(signum, _on_signal_in_worker)


#: prctl's option that has the kernel send a signal to a process when its parent dies
_PR_SET_PDEATHSIG = 1


def _die_with(parent: int) -> None:
    """End this worker when the grid's process ``parent`` ends, however it ends (a
    ``kill -9`` gives it no chance to stop its workers): on Linux the kernel sends
    SIGKILL at the parent's death (PR_SET_PDEATHSIG); elsewhere a thread looks every
    half second. A row killed so resumes from its checkpoint when the grid runs again.
    """
    if sys.platform.startswith("linux"):
        import ctypes

        with contextlib.suppress(OSError, AttributeError):
            libc = ctypes.CDLL(None, use_errno=True)
            if libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0) == 0:
                if os.getppid() != parent:  # it died before the request: nobody to wait for
                    os._exit(1)
                return
    import threading

    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(0.5)
        os._exit(1)

    if os.getppid() != parent:
        os._exit(1)
    threading.Thread(target=watch, name="handprop-parent-watch", daemon=True).start()


def _run_in_worker(
    cfg: RunConfig, run_dir: Path, threads: int, checkpoint_seconds: float | None
) -> RunSummary:
    """:func:`run_one` in a worker process; a stopped row reports itself interrupted
    instead of raising, and a row handed over after the grid was stopped (rows already
    queued to a worker cannot be cancelled) does not start."""
    if _Worker.stopped:
        return _cancelled(run_dir.name)
    _Worker.running, _Worker.stopping = True, False
    try:
        return run_one(cfg, run_dir, threads, False, checkpoint_seconds)
    except KeyboardInterrupt:
        return _interrupted(run_dir)
    finally:
        _Worker.running = False


_STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)


def _interrupted(run_dir: Path) -> RunSummary:
    try:
        return _summary(run_dir, "interrupted")
    except (OSError, ValueError):
        return RunSummary(run_dir.name, "interrupted", message="interrupted before it began")


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

    from handprop.run.writer import METRICS_FILE

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
    checkpoint_seconds: float | None = None,
) -> list[RunSummary]:
    """Run every row into ``out/<run_name>``; return the summaries in row order.

    With ``jobs > 1`` the runs go to that many worker processes, each limited to
    cores // jobs threads (BLAS's and handprop's own), so that the machine's cores are
    used once, not jobs times over.

    ``out`` is made, or must be a grid folder handprop made. Ctrl-C (or SIGTERM)
    checkpoints the rows that are running, cancels the queued ones, writes the summary
    of every row, and raises :class:`~handprop.errors.Interrupted` carrying the
    summaries (its ``outcome``).
    """
    out, _ = make_or_adopt(out, GRID_MARKER)
    with GridLock(out):  # one process runs the grid at a time
        return _run_grid(rows, out, jobs, progress, on_done, checkpoint_seconds)


def _run_grid(
    rows: list[GridRow],
    out: Path,
    jobs: int,
    progress: bool,
    on_done: Callable[[RunSummary], None] | None,
    checkpoint_seconds: float | None,
) -> list[RunSummary]:
    results: dict[str, RunSummary] = {}

    def done(summary: RunSummary) -> None:
        results[summary.name] = summary
        if on_done:
            on_done(summary)

    try:
        if jobs <= 1:
            for row in rows:
                try:
                    done(run_one(row.config, out / row.name, None, progress, checkpoint_seconds))
                except KeyboardInterrupt:
                    done(_interrupted(out / row.name))
                    raise
        else:
            _run_pool(rows, out, jobs, checkpoint_seconds, done)
    except KeyboardInterrupt as exc:
        summaries = _in_order(rows, results)
        write_summary(out, summaries)
        raise Interrupted.after(exc, summaries) from exc
    summaries = _in_order(rows, results)
    write_summary(out, summaries)
    return summaries


def _in_order(rows: list[GridRow], results: dict[str, RunSummary]) -> list[RunSummary]:
    """Every row's summary; rows that never ran are "cancelled"."""
    return [results.get(row.name) or _cancelled(row.name) for row in rows]


def _cancelled(name: str) -> RunSummary:
    return RunSummary(name, "cancelled", message="not started: the grid was interrupted")


def _run_pool(
    rows: list[GridRow],
    out: Path,
    jobs: int,
    checkpoint_seconds: float | None,
    done: Callable[[RunSummary], None],
) -> None:
    threads = _blas_threads(jobs)
    import multiprocessing

    context = multiprocessing.get_context()
    # the workers' parent: this process (fork, spawn), else the fork server, which ends
    # when this process does
    parent = None if context.get_start_method() == "forkserver" else os.getpid()
    pool = ProcessPoolExecutor(
        max_workers=jobs, mp_context=context, initializer=_init_worker, initargs=(parent,)
    )
    futures = {
        pool.submit(_run_in_worker, row.config, out / row.name, threads, checkpoint_seconds): row
        for row in rows
    }
    reported: set[Future] = set()
    try:
        for future in as_completed(futures):
            done(_result(future, futures[future]))
            reported.add(future)
    except KeyboardInterrupt:
        # queued rows never start; running rows get the signal (a SIGTERM sent to this
        # process alone would not reach them), checkpoint, and report themselves; a
        # second Ctrl-C meanwhile is let pass, so that the summary is still written
        previous = {s: signal.signal(s, _let_pass) for s in _STOP_SIGNALS}
        try:
            for future in futures:
                future.cancel()
            # the pool's worker processes: no public accessor
            for process in list(getattr(pool, "_processes", {}).values()):
                with contextlib.suppress(ProcessLookupError):
                    os.kill(process.pid, signal.SIGTERM)
            for future, row in futures.items():
                if not future.cancelled() and future not in reported:
                    done(_result(future, row))
            pool.shutdown(wait=True, cancel_futures=True)
        finally:
            for signum, handler in previous.items():
                signal.signal(signum, handler)
        raise
    pool.shutdown(wait=True)


def _let_pass(signum: int, frame: object) -> None:
    """A signal handler that does nothing."""


def _result(future: Future, row: GridRow) -> RunSummary:
    try:
        return future.result()
    except BrokenProcessPool:
        return RunSummary(
            row.name,
            "failed",
            message="the worker process running it died (killed, or out of memory); "
            "run the grid again to continue it",
        )


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
        cells = (s.name, acc, loss, secs, str(s.epochs or ""), status)
        lines.append("| " + " | ".join(_md_cell(c) for c in cells) + " |")
    return "\n".join(lines) + "\n"


def _md_cell(text: str) -> str:
    """A table cell: a `|` would end it and a newline the row."""
    return " ".join(text.split()).replace("|", "\\|")


def load_base(path: str | Path | None) -> RunConfig | None:
    return None if path is None else load_config(path)
