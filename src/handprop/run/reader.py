"""Reading run folders and experiment grids written by ``handprop train``/``experiments``.

The layout is the contract in ``docs/formats.md``. Readers validate at this boundary, so
that evaluate, figures and report can trust the arrays: a malformed file raises
:class:`~handprop.errors.DataError` (or :class:`~handprop.errors.ConfigError` for the
config and for a folder named on the command line) naming the file and the line.
"""

from __future__ import annotations

import csv
import json
import math
from collections.abc import Iterator
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Any

import numpy as np

from handprop.errors import ConfigError, DataError

try:  # Python >= 3.11
    import tomllib
except ModuleNotFoundError:  # pragma: no cover - Python 3.10
    import tomli as tomllib

#: the model whose predictions are ``predictions.csv``
HANDPROP = "handprop"

#: comparison models (``handprop compare``): name -> file name in the run folder
COMPARISON_FILES = {
    "sklearn_default": "predictions_sklearn_default.csv",
    "sklearn_analogue": "predictions_sklearn_analogue.csv",
}

#: how each model is named in tables and legends
MODEL_LABELS = {
    HANDPROP: "handprop",
    "sklearn_default": "scikit-learn (default)",
    "sklearn_analogue": "scikit-learn (analogue)",
}

#: the side-by-side summary ``handprop compare`` writes (times, parameters, notes)
COMPARISON_FILE = "comparison.json"

HISTORY_COLUMNS = ("epoch", "loss", "train_acc", "test_acc", "seconds")


@dataclass(frozen=True)
class Predictions:
    """The rows of one ``predictions.csv``.

    Attributes
    ----------
    index : ndarray of shape (n,) int64    each test sample's index into the dataset
    y_true : ndarray of shape (n,) int64   true class ids in [0, k)
    y_pred : ndarray of shape (n,) int64   predicted class ids in [0, k)
    P : ndarray of shape (n, k) float64    predicted probability of every class
    path : Path                            the file read
    """

    index: np.ndarray
    y_true: np.ndarray
    y_pred: np.ndarray
    P: np.ndarray
    path: Path

    @property
    def k(self) -> int:
        """Number of classes (probability columns)."""
        return int(self.P.shape[1])

    @property
    def n(self) -> int:
        """Number of test samples."""
        return int(self.y_true.shape[0])

    @property
    def confidence(self) -> np.ndarray:
        """(n,) the probability given to the predicted class."""
        return self.P[np.arange(self.n), self.y_pred]


def _rows(path: Path) -> Iterator[tuple[int, list[str]]]:
    """(line number, cells) of every non-blank line of a CSV file."""
    from handprop.files import MAX_RUN_LOG_BYTES, regular_file

    try:
        regular_file(path, "CSV file", MAX_RUN_LOG_BYTES)  # not a FIFO, a device, a huge file
        f = path.open(newline="", encoding="utf-8")
    except FileNotFoundError:
        raise DataError(f"{path}: file not found") from None
    except OSError as exc:
        raise DataError(f"{path}: cannot read: {exc.strerror}") from None
    with f:
        reader = csv.reader(f)
        try:
            for cells in reader:
                if cells and any(c.strip() for c in cells):
                    yield reader.line_num, [c.strip() for c in cells]
        except (csv.Error, UnicodeDecodeError) as exc:
            raise DataError(f"{path} line {reader.line_num + 1}: not valid CSV: {exc}") from None


#: the largest sample index a predictions file may hold (an int64's)
MAX_INDEX = int(np.iinfo(np.int64).max)


def _shown(text: str) -> str:
    """A cell as a message quotes it: a long one cut, with its length."""
    return repr(text) if len(text) <= 40 else f"{text[:30]!r}... ({len(text):,} characters)"


def _int(path: Path, line: int, column: str, text: str) -> int:
    try:
        return int(text)
    except ValueError:
        raise DataError(
            f"{path} line {line}, column {column}: expected an integer, got {_shown(text)}"
        ) from None


def _id(path: Path, line: int, column: str, text: str, high: int) -> int:
    """A cell holding a sample index or a class id: an integer in [0, high]; DataError,
    naming the line and the column, for one that is not."""
    digits = text.lstrip("+-")
    if len(digits) > 400 and digits.isascii() and digits.isdigit():
        value = -1 if text.startswith("-") else high + 1  # int() stops at 4,300 digits
    else:
        value = _int(path, line, column, text)
    if not 0 <= value <= high:
        shown = text if len(text) <= 40 else _shown(text)
        if column != "index":
            rule = f"class id must be in [0, {high + 1})"
        elif value < 0:
            rule = "sample index must be >= 0"
        else:
            rule = f"sample index must be at most {high:,} (an int64's largest)"
        raise DataError(f"{path} line {line}, column {column}: {rule}, got {shown}")
    return value


def _float(path: Path, line: int, column: str, text: str, allow_empty: bool = False) -> float:
    if allow_empty and text == "":
        return math.nan
    try:
        value = float(text)
    except ValueError:
        value = math.nan
        text_ok = False
    else:
        text_ok = math.isfinite(value)
    if not text_ok:
        raise DataError(
            f"{path} line {line}, column {column}: expected a finite number, got {_shown(text)}"
        )
    return value


def read_predictions(path: str | Path) -> Predictions:
    """Read and validate a ``predictions.csv`` (``index,true,pred,p0,...,p{k-1}``).

    Raises
    ------
    DataError
        The file is missing or empty, its header is not the contract's, a row has the
        wrong number of columns, a cell is not a number, an index is negative or beyond
        an int64, or a class id is out of [0, k).
    """
    path = Path(path)
    rows = _rows(path)
    try:
        line, header = next(rows)
    except StopIteration:
        raise DataError(f"{path}: file is empty, expected header index,true,pred,p0,...") from None
    k = len(header) - 3
    expected = ["index", "true", "pred"] + [f"p{j}" for j in range(max(k, 0))]
    if k < 1 or header != expected:
        raise DataError(
            f"{path} line {line}: expected header index,true,pred,p0,...,p{{k-1}}, "
            f"got {','.join(header)!r}"
        )
    ints: list[tuple[int, int, int]] = []
    probs: list[list[float]] = []
    for line, cells in rows:
        if len(cells) != k + 3:
            raise DataError(f"{path} line {line}: expected {k + 3} columns, got {len(cells)}")
        i = _id(path, line, "index", cells[0], MAX_INDEX)
        t, p = (
            _id(path, line, name, c, k - 1) for name, c in zip(header[1:3], cells[1:3], strict=True)
        )
        ints.append((i, t, p))
        probs.append([_float(path, line, header[3 + j], c) for j, c in enumerate(cells[3:])])
    if not ints:
        raise DataError(f"{path}: no prediction rows after the header")
    ids = np.array(ints, dtype=np.int64)
    return Predictions(
        index=ids[:, 0],
        y_true=ids[:, 1],
        y_pred=ids[:, 2],
        P=np.array(probs, dtype=np.float64),
        path=path,
    )


def read_history(path: str | Path) -> dict[str, np.ndarray]:
    """Read ``history.csv`` into float64 columns (NaN where a cell is empty).

    ``epoch`` and ``loss`` are required; ``train_acc``, ``test_acc`` and ``seconds`` are
    NaN-filled when the column is absent, so plots need not special-case old runs.

    Raises
    ------
    DataError
        Missing file, missing required column, wrong column count or a non-number.
    """
    path = Path(path)
    rows = _rows(path)
    try:
        line, header = next(rows)
    except StopIteration:
        raise DataError(
            f"{path}: file is empty, expected header {','.join(HISTORY_COLUMNS)}"
        ) from None
    for required in ("epoch", "loss"):
        if required not in header:
            raise DataError(
                f"{path} line {line}: header lacks column {required!r}, got {','.join(header)!r}"
            )
    columns: dict[str, list[float]] = {name: [] for name in header}
    for line, cells in rows:
        if len(cells) != len(header):
            raise DataError(f"{path} line {line}: expected {len(header)} columns, got {len(cells)}")
        for name, cell in zip(header, cells, strict=True):
            required = name in ("epoch", "loss")
            # a diverged run logs its non-finite loss: keep it readable as NaN
            if name == "loss" and cell.lower() in ("nan", "inf", "-inf"):
                columns[name].append(math.nan)
                continue
            columns[name].append(_float(path, line, name, cell, allow_empty=not required))
    n = len(columns["epoch"])
    history = {name: np.asarray(values, dtype=np.float64) for name, values in columns.items()}
    for name in HISTORY_COLUMNS:
        history.setdefault(name, np.full(n, np.nan))
    return history


#: diagnostics.csv's columns that hold numbers (handprop.run.diagnostics writes them)
DIAGNOSTICS_NUMBERS = ("grad_norm", "weight_norm", "update_ratio", "saturated", "dead")


@dataclass(frozen=True)
class LayerDiagnostics:
    """One layer's rows of ``diagnostics.csv``: a series per quantity over the epochs.

    Attributes
    ----------
    number : int         1, 2, ... among the layers with parameters (the last: output)
    name : str           "dense 784-100", "conv 1-32 3x3", ...
    activation : str     the activation after it ("sigmoid", ..., "softmax", "none")
    epoch : ndarray (m,) the evaluated epochs
    values : dict        quantity -> ndarray (m,) float64, NaN where empty
    """

    number: int
    name: str
    activation: str
    epoch: np.ndarray
    values: dict[str, np.ndarray]

    @property
    def label(self) -> str:
        """The layer in a legend: "dense 784-100 (sigmoid)"."""
        return f"{self.name} ({self.activation})" if self.activation != "none" else self.name


def read_diagnostics_rows(path: str | Path) -> list[dict[str, Any]]:
    """The rows of ``diagnostics.csv`` as dicts (numbers as floats, None where empty).

    Raises
    ------
    DataError
        Missing file, a missing column, a wrong column count or a non-number.
    """
    path = Path(path)
    rows = _rows(path)
    try:
        line, header = next(rows)
    except StopIteration:
        raise DataError(f"{path}: file is empty, expected a header") from None
    for required in ("epoch", "layer", "name", "activation", *DIAGNOSTICS_NUMBERS):
        if required not in header:
            raise DataError(
                f"{path} line {line}: header lacks column {required!r}, got {','.join(header)!r}"
            )
    out = []
    for line, cells in rows:
        if len(cells) != len(header):
            raise DataError(f"{path} line {line}: expected {len(header)} columns, got {len(cells)}")
        cell = dict(zip(header, cells, strict=True))
        row: dict[str, Any] = {
            "epoch": _int(path, line, "epoch", cell["epoch"]),
            "layer": _int(path, line, "layer", cell["layer"]),
            "name": cell["name"],
            "activation": cell["activation"],
        }
        for name in DIAGNOSTICS_NUMBERS:
            text = cell[name]
            if text == "":
                row[name] = None
            elif text.lower() in ("nan", "inf", "-inf"):  # a run on its way to diverging
                row[name] = float(text)
            else:
                row[name] = _float(path, line, name, text)
        out.append(row)
    return out


def read_diagnostics(path: str | Path) -> list[LayerDiagnostics]:
    """``diagnostics.csv`` as one :class:`LayerDiagnostics` per layer, in layer order."""
    by_layer: dict[int, list[dict[str, Any]]] = {}
    for row in read_diagnostics_rows(path):
        by_layer.setdefault(row["layer"], []).append(row)
    layers = []
    for number in sorted(by_layer):
        rows = sorted(by_layer[number], key=lambda r: r["epoch"])
        values = {
            q: np.array([math.nan if r[q] is None else r[q] for r in rows], dtype=np.float64)
            for q in DIAGNOSTICS_NUMBERS
        }
        layers.append(
            LayerDiagnostics(
                number,
                rows[-1]["name"],
                rows[-1]["activation"],
                np.array([r["epoch"] for r in rows], dtype=np.int64),
                values,
            )
        )
    return layers


def read_json(path: str | Path) -> dict[str, Any]:
    """Read a JSON object (``metrics.json``); DataError names the line of a syntax error."""
    from handprop.files import MAX_RUN_LOG_BYTES, read_regular

    path = Path(path)
    try:
        text = read_regular(path, "JSON file", MAX_RUN_LOG_BYTES).decode("utf-8")
    except FileNotFoundError:
        raise DataError(f"{path}: file not found") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise DataError(f"{path}: cannot read: {exc}") from None
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        raise DataError(f"{path} line {exc.lineno}: not valid JSON: {exc.msg}") from None
    if not isinstance(data, dict):
        raise DataError(f"{path}: expected a JSON object, got {type(data).__name__}")
    return data


def read_config(path: str | Path) -> dict[str, Any]:
    """Read ``config.toml`` as a plain dict; ConfigError names the line of a syntax error."""
    from handprop.files import MAX_CONFIG_BYTES, read_regular

    path = Path(path)
    try:
        text = read_regular(path, "config file", MAX_CONFIG_BYTES, ConfigError)
        return tomllib.loads(text.decode("utf-8"))
    except FileNotFoundError:
        raise ConfigError(f"{path}: file not found") from None
    except tomllib.TOMLDecodeError as exc:
        # the message ends with "(at line L, column C)"
        raise ConfigError(f"{path}: not valid TOML: {exc}") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{path}: cannot read: {exc}") from None


def read_table(path: str | Path) -> tuple[list[str], list[list[str]]]:
    """A CSV file (``summary.csv``) as its header and its rows of text cells."""
    path = Path(path)
    rows = list(_rows(path))
    if not rows:
        raise DataError(f"{path}: file is empty")
    header = rows[0][1]
    body = []
    for line, cells in rows[1:]:
        if len(cells) != len(header):
            raise DataError(f"{path} line {line}: expected {len(header)} columns, got {len(cells)}")
        body.append(cells)
    return header, body


def find_key(tree: Any, *names: str) -> Any:
    """The value of the first of ``names`` found in a nested dict, depth-first; else None.

    The config is read as a plain dict whose table layout belongs to ``handprop.config``;
    looking keys up by name keeps this module working whether a field sits at the top
    level or in a ``[data]``/``[model]`` table.
    """
    if not isinstance(tree, dict):
        return None
    for name in names:
        if name in tree:
            return tree[name]
    for value in tree.values():
        found = find_key(value, *names)
        if found is not None:
            return found
    return None


def _require_dir(path: str | Path, what: str) -> Path:
    path = Path(path)
    if not path.exists():
        raise ConfigError(f"{path}: {what} not found")
    if not path.is_dir():
        raise ConfigError(f"{path}: not a folder; expected a {what}")
    return path


#: suffixes of the config files ``handprop train`` reads
CONFIG_SUFFIXES = (".toml", ".cfg")


def latest_run(config: str | Path) -> Path:
    """The newest run folder ``handprop train CONFIG`` made: ``OUT/NAME-K`` with the
    largest K (``OUT/NAME`` is K = 1), where OUT is the config's ``out`` and NAME its
    ``name`` or else the file's stem, as ``handprop train`` names them.

    Raises
    ------
    ConfigError
        The config cannot be read, or no run of it exists yet.
    """
    from handprop.config import load_config
    from handprop.run.claim import is_owned

    config = Path(config)
    cfg = load_config(config)
    name = cfg.name or config.stem
    base = Path(cfg.out)
    found: list[tuple[int, Path]] = []
    if base.is_dir():
        for folder in base.iterdir():
            if folder.name == name:
                k = 1
            elif folder.name.startswith(name + "-") and folder.name[len(name) + 1 :].isdigit():
                k = int(folder.name[len(name) + 1 :])
            else:
                continue
            if folder.is_dir() and is_owned(folder):
                found.append((k, folder))
    if not found:
        raise ConfigError(
            f"{config}: no run of this config under {base}/ yet (looked for {name}, "
            f"{name}-2, ...); train it first: handprop train {config}"
        )
    return max(found)[1]


def resolve_run(path: str | Path) -> Path:
    """A run folder or grid as given, or for a config file (.toml, .cfg) its latest run
    (:func:`latest_run`)."""
    path = Path(path)
    if path.is_file() and path.suffix.lower() in CONFIG_SUFFIXES:
        return latest_run(path)
    return path


class RunFolder:
    """A run folder written by ``handprop train``; each file is read once, on first use.

    Parameters
    ----------
    path : str or Path   the folder, or a config file: its latest run (:func:`latest_run`)

    Raises
    ------
    ConfigError
        ``path`` does not exist or is not a folder (nor a config with a run).
    """

    def __init__(self, path: str | Path) -> None:
        self.path = _require_dir(resolve_run(path), "run folder")

    @property
    def name(self) -> str:
        """The folder's name (the run's name in a grid)."""
        return self.path.name

    def has(self, filename: str) -> bool:
        """Whether the folder holds ``filename``."""
        return (self.path / filename).is_file()

    @cached_property
    def metrics(self) -> dict[str, Any]:
        """``metrics.json``, or {} when the run has none (yet)."""
        return read_json(self.path / "metrics.json") if self.has("metrics.json") else {}

    @cached_property
    def config(self) -> dict[str, Any]:
        """``config.toml`` as a dict, or {} when absent."""
        return read_config(self.path / "config.toml") if self.has("config.toml") else {}

    @cached_property
    def history(self) -> dict[str, np.ndarray] | None:
        """``history.csv`` columns, or None when absent."""
        return read_history(self.path / "history.csv") if self.has("history.csv") else None

    @cached_property
    def diagnostics(self) -> list[LayerDiagnostics] | None:
        """``diagnostics.csv`` per layer, or None when absent (a run from before it)."""
        path = self.path / "diagnostics.csv"
        return read_diagnostics(path) if path.is_file() else None

    @cached_property
    def predictions(self) -> Predictions:
        """``predictions.csv``; DataError when missing, naming the run's status if known."""
        if not self.has("predictions.csv"):
            status = self.metrics.get("status") if self.has("metrics.json") else None
            hint = f" (metrics.json says the run is {status})" if status else ""
            if (self.path / "summary.csv").is_file():
                hint = " (this is an experiment grid; name one of its run folders)"
            raise DataError(f"{self.path / 'predictions.csv'}: file not found{hint}")
        return read_predictions(self.path / "predictions.csv")

    @cached_property
    def comparisons(self) -> dict[str, Predictions]:
        """Predictions of the scikit-learn comparison models present, in a fixed order."""
        found = {}
        for model, filename in COMPARISON_FILES.items():
            if self.has(filename):
                P = read_predictions(self.path / filename)
                self._check_same_test_set(P)
                found[model] = P
        return found

    @cached_property
    def comparison(self) -> dict[str, dict[str, Any]]:
        """``comparison.json``'s entry of each comparison model whose predictions file
        is present (written by ``handprop compare``), or {}."""
        if not self.has(COMPARISON_FILE):
            return {}
        models = read_json(self.path / COMPARISON_FILE).get("models")
        return {
            model: entry
            for model, entry in (models if isinstance(models, dict) else {}).items()
            if model in COMPARISON_FILES
            and isinstance(entry, dict)
            and self.has(COMPARISON_FILES[model])
        }

    @cached_property
    def train_seconds(self) -> dict[str, float]:
        """Training time of each model: handprop's from metrics.json, the comparison
        models' from :attr:`comparison`."""
        entries = {HANDPROP: self.metrics, **self.comparison}
        return {
            model: float(entry["train_seconds"])
            for model, entry in entries.items()
            if isinstance(entry.get("train_seconds"), (int, float))
        }

    @property
    def models(self) -> dict[str, Predictions]:
        """handprop's predictions first, then every comparison model's."""
        return {HANDPROP: self.predictions, **self.comparisons}

    @cached_property
    def class_names(self) -> list[str]:
        """From ``metrics.json`` when it names k classes, else "0" ... "k-1"."""
        k = self.predictions.k
        names = self.metrics.get("class_names")
        if isinstance(names, list) and len(names) == k:
            return [str(name) for name in names]
        return [str(j) for j in range(k)]

    @property
    def dataset(self) -> str | None:
        """The dataset's name from the config (or metrics.json)."""
        name = find_key(self.config, "dataset")
        if isinstance(name, dict):  # a [dataset] table
            name = find_key(name, "name")
        if name is None:
            name = self.metrics.get("dataset")
        return str(name) if name is not None else None

    @property
    def data_dir(self) -> str | None:
        """The config's data directory, or None for the default."""
        value = find_key(self.config, "data_dir")
        return str(value) if value not in (None, "") else None

    def _check_same_test_set(self, other: Predictions) -> None:
        # side-by-side numbers only mean something on the very same test samples
        own = self.predictions
        if other.k != own.k or not np.array_equal(other.index, own.index):
            raise DataError(
                f"{other.path}: not the same test samples as {own.path} "
                f"({other.n} rows of {other.k} classes vs {own.n} rows of {own.k})"
            )


def is_run(path: str | Path) -> bool:
    """Whether ``path`` looks like a run folder (holds a run's config, metrics or predictions)."""
    path = Path(path)
    return path.is_dir() and any(
        (path / f).is_file() for f in ("predictions.csv", "metrics.json", "config.toml")
    )


def is_grid(path: str | Path) -> bool:
    """Whether ``path`` is an experiment grid: a summary.csv or run folders inside."""
    path = Path(path)
    if not path.is_dir() or (path / "predictions.csv").is_file():
        return False
    return (path / "summary.csv").is_file() or any(is_run(sub) for sub in path.iterdir())


class GridFolder:
    """An experiment grid written by ``handprop experiments``: run folders and summary.csv.

    Raises
    ------
    ConfigError
        ``path`` does not exist, is not a folder, or holds no run folder.
    """

    def __init__(self, path: str | Path) -> None:
        self.path = _require_dir(path, "experiment grid folder")
        self.runs = [RunFolder(sub) for sub in sorted(self.path.iterdir()) if is_run(sub)]
        if not self.runs:
            raise ConfigError(f"{self.path}: no run folders inside; expected an experiment grid")

    @property
    def name(self) -> str:
        """The folder's name."""
        return self.path.name

    @cached_property
    def summary(self) -> tuple[list[str], list[list[str]]] | None:
        """``summary.csv`` as (header, rows), or None when absent."""
        path = self.path / "summary.csv"
        return read_table(path) if path.is_file() else None
