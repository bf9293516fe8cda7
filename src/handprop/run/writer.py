"""Writing a run folder: its files, its checkpoints, and the checks on resuming.

The layout is the contract in ``docs/formats.md``. Every file is written atomically
(:mod:`handprop.atomic`). Under MPI only rank 0 writes: the other ranks get a
:class:`RunWriter` with ``writes=False``, whose writes do nothing, so the training loop
reads the same on every rank.
"""

from __future__ import annotations

import csv
import io
import json
import math
from pathlib import Path
from typing import Any

import numpy as np

from handprop.atomic import atomic_write_bytes, atomic_write_text
from handprop.config import RunConfig, to_toml
from handprop.errors import ConfigError
from handprop.run.diagnostics import DIAGNOSTICS_FILE, diagnostics_csv

HISTORY_COLUMNS = ("epoch", "loss", "train_acc", "test_acc", "seconds")

CONFIG_FILE = "config.toml"
MODEL_FILE = "model.npz"
SPLIT_FILE = "split.npz"
HISTORY_FILE = "history.csv"
PREDICTIONS_FILE = "predictions.csv"
METRICS_FILE = "metrics.json"
CHECKPOINT_FILE = "checkpoint.npz"
#: every file a run writes; a run started again in its own folder removes only these
RUN_FILES = (
    CONFIG_FILE,
    MODEL_FILE,
    SPLIT_FILE,
    HISTORY_FILE,
    PREDICTIONS_FILE,
    METRICS_FILE,
    CHECKPOINT_FILE,
    DIAGNOSTICS_FILE,
)

#: config fields a resumed run may change: where things are, not what is computed (the
#: device computes the same numbers to float rounding: a run begun on a GPU may go on
#: on the CPU, and the other way round; so do CUDA graphs, on or off)
RESUME_FREE_FIELDS = ("name", "out", "data_dir", "device", "graph")


# -- file contents ----------------------------------------------------------------------


def _cell(value: float | None, fmt: str) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return ""
    return format(value, fmt)


def history_csv(history: list[dict[str, Any]], columns: tuple[str, ...]) -> str:
    """history.csv: one row per epoch; empty cells where nothing was measured."""
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(columns)
    formats = {"epoch": "d", "loss": "r", "val_loss": "r", "seconds": ".4f"}
    for row in history:
        writer.writerow(
            [
                repr(float(row[c]))
                if formats.get(c) == "r" and row.get(c) is not None
                else _cell(row.get(c), formats.get(c, ".6f"))
                for c in columns
            ]
        )
    return buf.getvalue()


def predictions_csv(test_idx: np.ndarray, y: np.ndarray, P: np.ndarray) -> str:
    """``index,true,pred,p0..p{k-1}``: one row per test sample."""
    k = P.shape[1]
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(["index", "true", "pred", *(f"p{j}" for j in range(k))])
    pred = P.argmax(axis=1)
    for i in range(len(y)):
        writer.writerow(
            [int(test_idx[i]), int(y[i]), int(pred[i]), *(f"{p:.6g}" for p in P[i].tolist())]
        )
    return buf.getvalue()


def save_npz(path: Path, **arrays: np.ndarray) -> None:
    buf = io.BytesIO()
    np.savez(buf, **arrays)
    atomic_write_bytes(path, buf.getvalue())


def write_json(path: Path, obj: dict[str, Any]) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2) + "\n")


# -- the writer --------------------------------------------------------------------------


class RunWriter:
    """The files of one run folder.

    Parameters
    ----------
    run_dir : Path
    columns : the history's columns
    writes : False on MPI ranks other than 0: every write does nothing
    """

    def __init__(self, run_dir: Path, columns: tuple[str, ...], writes: bool = True) -> None:
        self.run_dir = Path(run_dir)
        self.columns = columns
        self.writes = writes
        self._history = ""  # the history.csv text last written

    def start(self, cfg: RunConfig, indices: dict[str, np.ndarray]) -> None:
        """The files written before the first epoch: the config and the split."""
        if self.writes:
            atomic_write_text(self.run_dir / CONFIG_FILE, to_toml(cfg))
            save_npz(self.run_dir / SPLIT_FILE, **indices)

    def history(self, rows: list[dict[str, Any]]) -> None:
        """history.csv, unless it already holds these rows (an epoch both evaluated and
        checkpointed asks twice)."""
        if self.writes:
            text = history_csv(rows, self.columns)
            if text != self._history:
                atomic_write_text(self.run_dir / HISTORY_FILE, text)
                self._history = text

    def diagnostics(self, rows: list[dict[str, Any]]) -> None:
        """diagnostics.csv (:mod:`handprop.run.diagnostics`): one row per evaluation and layer."""
        if self.writes:
            atomic_write_text(self.run_dir / DIAGNOSTICS_FILE, diagnostics_csv(rows))

    def checkpoint(self, rows: list[dict[str, Any]], **arrays: np.ndarray) -> None:
        """The history, then checkpoint.npz: a checkpoint never names an epoch the
        history has not reached."""
        if self.writes:
            self.history(rows)
            save_npz(self.run_dir / CHECKPOINT_FILE, **arrays)

    def read_history(self, epochs: int) -> list[dict[str, Any]]:
        """The history's rows up to epoch ``epochs`` (a checkpoint's), which must all be
        there."""
        from handprop.run.reader import read_history

        columns = read_history(self.run_dir / HISTORY_FILE)
        rows = [
            {c: None if np.isnan(v[i]) else float(v[i]) for c, v in columns.items()}
            for i in range(len(columns["epoch"]))
            if columns["epoch"][i] <= epochs
        ]
        for row in rows:
            row["epoch"] = int(row["epoch"])
        if len(rows) != epochs:
            raise ConfigError(
                f"{self.run_dir / HISTORY_FILE}: has {len(rows)} epochs up to the "
                f"checkpoint's epoch {epochs}; the run folder was changed by hand"
            )
        return rows

    def results(self, model_bytes: bytes, predictions: str, metrics: dict[str, Any]) -> None:
        """A completed run's model, predictions and metrics; the checkpoint goes."""
        if self.writes:
            atomic_write_bytes(self.run_dir / MODEL_FILE, model_bytes)
            atomic_write_text(self.run_dir / PREDICTIONS_FILE, predictions)
            write_json(self.run_dir / METRICS_FILE, metrics)
            (self.run_dir / CHECKPOINT_FILE).unlink(missing_ok=True)

    def metrics(self, metrics: dict[str, Any]) -> None:
        if self.writes:
            write_json(self.run_dir / METRICS_FILE, metrics)


# -- resuming ----------------------------------------------------------------------------


def is_complete(run_dir: Path) -> bool:
    """True when the folder holds a completed run (metrics.json says so)."""
    try:
        return json.loads((run_dir / METRICS_FILE).read_text())["status"] == "completed"
    except (OSError, ValueError, KeyError, TypeError):
        return False
