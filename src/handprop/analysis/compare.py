"""``handprop compare``: scikit-learn's ``MLPClassifier`` on exactly a run's split.

Two scikit-learn models are trained on the same training samples (the indices of the
run's ``split.npz``, re-derived from its config and checked against that file), with the
same normalization and dtype, and the same hidden layer sizes:

``sklearn_default``
    ``MLPClassifier``'s defaults: ReLU, Adam, mini-batches of 200, L2 ``alpha=1e-4``,
    up to 200 epochs with its own convergence test.
``sklearn_analogue``
    the closest analogue of the run's own algorithm: the run's activation (sigmoid is
    scikit-learn's ``logistic``), plain SGD with the run's learning rate and batch size
    (full batch when the run used full-batch gradient descent), the run's momentum
    (none for ``gd``/``sgd``), L2 only if the run had weight decay, no shuffling, and
    exactly the run's number of epochs (scikit-learn's early stopping switched off).

Each model's test predictions go to the run folder in the ``predictions.csv`` format
(``predictions_sklearn_default.csv``, ``predictions_sklearn_analogue.csv``) so that
``handprop evaluate``, ``figures`` and ``report`` show them beside handprop's, and
``comparison.json`` records for every model its accuracy, macro F1, training time and
the exact scikit-learn parameters used. Only this module imports scikit-learn.
"""

from __future__ import annotations

import contextlib
import math
import time
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from handprop.atomic import atomic_write_text
from handprop.config import RunConfig, load_config
from handprop.errors import ConfigError, DataError
from handprop.metrics import classification_metrics
from handprop.run.build import Split, load_split, split_description
from handprop.run.reader import (
    COMPARISON_FILE,
    COMPARISON_FILES,
    HANDPROP,
    MODEL_LABELS,
    RunFolder,
    is_grid,
)
from handprop.run.writer import (
    CONFIG_FILE,
    METRICS_FILE,
    SPLIT_FILE,
    predictions_csv,
    write_json,
)

#: the comparison models, in the order they are trained and shown
MODELS = tuple(COMPARISON_FILES)

#: handprop activation -> scikit-learn's name for it
SKLEARN_ACTIVATIONS = {
    "sigmoid": "logistic",
    "tanh": "tanh",
    "relu": "relu",
    "identity": "identity",
}


def sklearn_params(model: str, cfg: RunConfig, n_train: int) -> tuple[dict[str, Any], list[str]]:
    """``MLPClassifier`` keyword arguments for ``model``, and notes on what differs.

    The notes name every part of the run's algorithm that scikit-learn cannot mirror,
    so the comparison says what it is and is not.
    """
    base = {"hidden_layer_sizes": tuple(cfg.hidden), "random_state": cfg.seed}
    if model == "sklearn_default":
        return base, []
    if model != "sklearn_analogue":
        raise ConfigError(f"unknown comparison model {model!r}; expected one of {MODELS}")

    notes = []
    activations = set(cfg.activation)
    if len(activations) > 1:
        notes.append(
            f"the run uses activations {list(cfg.activation)}; scikit-learn takes one for "
            f"all hidden layers, {cfg.activation[0]!r}"
        )
    batch = n_train if cfg.batch_size is None else min(cfg.batch_size, n_train)
    params: dict[str, Any] = {
        **base,
        "activation": SKLEARN_ACTIVATIONS[cfg.activation[0]],
        "batch_size": batch,
        "learning_rate_init": cfg.learning_rate,
        "learning_rate": "constant",
        "alpha": cfg.weight_decay * batch,  # scikit-learn scales alpha by 1/batch size
        "max_iter": cfg.epochs,
        "shuffle": cfg.batch_size is not None,
        # never stop before the run's epoch count: the loss must not 'plateau' first
        "tol": 0.0,
        "n_iter_no_change": cfg.epochs + 1,
        "early_stopping": False,
    }
    if cfg.optimizer == "adam":
        params.update(solver="adam", beta_1=cfg.beta1, beta_2=cfg.beta2, epsilon=cfg.eps)
    else:
        momentum = cfg.momentum if cfg.optimizer in ("momentum", "nesterov") else 0.0
        params.update(
            solver="sgd", momentum=momentum, nesterovs_momentum=cfg.optimizer == "nesterov"
        )
        if cfg.optimizer == "rmsprop":
            notes.append("scikit-learn has no RMSprop; plain SGD stands in for it")
    if cfg.loss != "cross_entropy":
        notes.append(f"the run's loss is {cfg.loss}; scikit-learn trains with cross-entropy")
    if cfg.schedule != "constant" or cfg.warmup:
        notes.append(f"the run's {cfg.schedule} schedule has no scikit-learn equivalent")
    if any(cfg.dropout):
        notes.append("scikit-learn has no dropout")
    if cfg.validation:
        notes.append("scikit-learn trains on the training samples without early stopping")
    notes.append(f"initialisation is scikit-learn's own, not the run's {cfg.init}")
    return params, notes


def _full_proba(clf: Any, X: np.ndarray, k: int) -> np.ndarray:
    """(n, k) probabilities; a class absent from the training labels gets 0."""
    P = np.zeros((len(X), k))
    P[:, clf.classes_] = clf.predict_proba(X)
    return P


def _edited(run: RunFolder, field: str, now: str, then: str) -> ConfigError:
    return ConfigError(
        f"{run.path / CONFIG_FILE}: {field} is {now}, but the run's was {then} (its "
        f"{METRICS_FILE}); the config was edited after the run: put {field} back, compare "
        "trains on the run's own split"
    )


def _check_dataset(run: RunFolder, cfg: RunConfig) -> None:
    """The config's dataset must be the one the run recorded (checked before loading)."""
    then = run.metrics.get("dataset")
    if then is not None and cfg.dataset != then:
        raise _edited(run, "dataset", repr(cfg.dataset), repr(then))


def _edited_field(run: RunFolder, cfg: RunConfig, data: Split) -> ConfigError | None:
    """The first field of config.toml that gives another split than the one the run
    recorded in metrics.json ("split": kind, total, seed, and the sample counts), or
    None when the config gives the recorded split (or the run recorded none)."""
    then = run.metrics.get("split")
    if not isinstance(then, dict):
        return None
    now = split_description(cfg, data)
    seed = "seed" if cfg.split_seed is None else "split_seed"
    # (config field, what it is now, what the run had): the settings first, then the
    # counts they give; train counts the validation samples carved out of it
    fields = [
        ("split", now["kind"], then.get("kind")),
        ("total", now["total"], then.get("total")),
        (seed, now["seed"], then.get("seed")),
    ]
    held_out = then.get("validation") or 0  # absent in a run from before validation
    with contextlib.suppress(KeyError, TypeError):  # a metrics.json edited too: settings only
        fields += [
            ("train", now["train"] + now["validation"], then["train"] + held_out),
            ("test", now["test"], then["test"]),
            ("validation", now["validation"], held_out),
        ]
    for field, value, recorded in fields:
        if recorded is not None and value != recorded:
            if field == "validation":  # a fraction in the config, a count in metrics.json
                now_text = f"{cfg.validation!r} ({value:,} samples)"
                return _edited(run, field, now_text, f"{recorded:,} samples")
            return _edited(run, field, repr(value), repr(recorded))
    return None


def _check_split(run: RunFolder, data: Split, cfg: RunConfig | None = None) -> None:
    """The re-derived split must be the one the run trained and tested on: ConfigError
    naming the field of an edited config.toml (``cfg``) that changed it, or DataError
    when the dataset files did."""
    path = run.path / SPLIT_FILE
    if not path.is_file():
        raise DataError(f"{path}: file not found; this folder is not a complete handprop run")
    try:
        with np.load(path, allow_pickle=False) as z:
            saved = {key: z[key] for key in ("train_idx", "test_idx")}
    except (OSError, ValueError, KeyError) as exc:
        raise DataError(f"{path}: not a split file with train_idx and test_idx ({exc})") from None
    for key in saved:
        if not np.array_equal(saved[key], getattr(data, key)):
            edited = None if cfg is None else _edited_field(run, cfg, data)
            if edited is not None:
                raise edited
            source = run.metrics.get("data_source")
            then = f", the run's from {source}" if source and source != data.source else ""
            raise DataError(
                f"{path}: {key} differs from the split its config gives on the data found "
                f"now ({data.source}{then}); the dataset files changed since the run"
            )


def load_run_config(run: RunFolder, data_dir: str | Path | None) -> RunConfig:
    """The run's config, refused when scikit-learn's MLP cannot stand beside it."""
    cfg = load_config(run.path / CONFIG_FILE)
    if cfg.layers is not None:
        raise ConfigError(
            f"{run.path / CONFIG_FILE}: this run's network is a layer list (a CNN); "
            "scikit-learn's MLPClassifier compares only with fully-connected runs"
        )
    if data_dir is not None:
        cfg = cfg.replace(data_dir=str(data_dir))
    return cfg


def compare_run(
    run: str | Path,
    *,
    models: Sequence[str] = MODELS,
    data_dir: str | Path | None = None,
    progress: bool = True,
    echo: Callable[[str], None] = print,
) -> dict[str, Any]:
    """Train the scikit-learn models on ``run``'s split and write their results into it.

    Returns the contents of ``comparison.json``: ``{"run", "split", "models": {name:
    {"label", "accuracy", "macro_f1", "train_seconds", ...}}}`` with handprop first.
    """
    try:
        from sklearn.exceptions import ConvergenceWarning
        from sklearn.neural_network import MLPClassifier
    except ImportError:  # pragma: no cover - scikit-learn is a dependency
        raise ConfigError("handprop compare needs scikit-learn: pip install scikit-learn") from None

    folder = RunFolder(run)
    unknown = [m for m in models if m not in MODELS]
    if unknown:
        raise ConfigError(f"unknown comparison model {unknown[0]!r}; expected one of {MODELS}")
    if not folder.has(METRICS_FILE):
        hint = " (an experiment grid? name one of its run folders)" if is_grid(folder.path) else ""
        raise DataError(f"{folder.path}: no {METRICS_FILE}; not a handprop run folder{hint}")
    if folder.metrics.get("status") != "completed":
        raise DataError(
            f"{folder.path / METRICS_FILE}: the run is not completed "
            f"(status {folder.metrics.get('status', 'missing')}); compare needs a finished run"
        )
    cfg = load_run_config(folder, data_dir)
    _check_dataset(folder, cfg)
    data = load_split(cfg, progress=progress)
    _check_split(folder, data, cfg)
    k = len(data.class_names)

    hp = folder.predictions
    own = classification_metrics(data.y_test, hp.y_pred, data.class_names)
    result: dict[str, Any] = {
        "run": str(folder.path),
        "split": {"train": len(data.y_train), "test": len(data.y_test), "dtype": cfg.dtype},
        "models": {
            HANDPROP: {
                "label": MODEL_LABELS[HANDPROP],
                "accuracy": own["accuracy"],
                "macro_f1": own["averages"]["macro"]["f1"],
                "train_seconds": folder.metrics.get("train_seconds"),
                "epochs": folder.metrics.get("epochs_completed"),
            }
        },
    }
    previous = folder.comparison
    for model in MODELS:
        if model not in models:
            if model in previous:  # keep what an earlier compare measured
                result["models"][model] = previous[model]
            continue
        params, notes = sklearn_params(model, cfg, len(data.y_train))
        label = MODEL_LABELS[model]
        if progress:
            echo(f"training {label}: MLPClassifier({_describe(params)}) ...")
        clf = MLPClassifier(**params)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always", ConvergenceWarning)
            start = time.perf_counter()
            with np.errstate(all="ignore"):  # overflow in its logistic is its own affair
                clf.fit(data.X_train, data.y_train)
            seconds = time.perf_counter() - start
        P = _full_proba(clf, data.X_test, k)
        if not np.all(np.isfinite(P)):
            raise DataError(f"{label} produced non-finite probabilities; its loss diverged")
        m = classification_metrics(data.y_test, P.argmax(axis=1), data.class_names)
        atomic_write_text(
            folder.path / COMPARISON_FILES[model], predictions_csv(data.test_idx, data.y_test, P)
        )
        result["models"][model] = {
            "label": label,
            "accuracy": m["accuracy"],
            "macro_f1": m["averages"]["macro"]["f1"],
            "train_seconds": round(seconds, 4),
            "epochs": int(clf.n_iter_),
            "converged": not any(issubclass(w.category, ConvergenceWarning) for w in caught),
            "final_loss": float(clf.loss_) if math.isfinite(clf.loss_) else None,
            "params": {key: _jsonable(v) for key, v in params.items()},
            "notes": notes,
        }
    write_json(folder.path / COMPARISON_FILE, result)
    return result


def _jsonable(value: Any) -> Any:
    return list(value) if isinstance(value, tuple) else value


def _describe(params: dict[str, Any]) -> str:
    keys = ("hidden_layer_sizes", "activation", "solver", "batch_size", "learning_rate_init")
    shown = [f"{key}={params[key]!r}" for key in keys if key in params]
    if "max_iter" in params:
        shown.append(f"max_iter={params['max_iter']}")
    return ", ".join(shown) if len(shown) > 1 else "defaults"


COMPARISON_HEADER = ("model", "accuracy", "macro f1", "time (s)", "epochs")


def comparison_table_rows(result: dict[str, Any]) -> list[list[str]]:
    """(model, accuracy, macro F1, training time, epochs) rows, handprop first."""
    from handprop.analysis.evaluate import format_seconds

    return [
        [
            entry["label"],
            f"{100 * entry['accuracy']:.2f}%",
            f"{entry['macro_f1']:.4f}",
            format_seconds(entry.get("train_seconds")),
            str(entry.get("epochs") or "-"),
        ]
        for entry in result["models"].values()
    ]


def comparison_caveats(models: dict[str, dict[str, Any]]) -> list[str]:
    """Every caveat of a comparison, one sentence each: a scikit-learn default run that
    stopped at max_iter unconverged, and each note on what the analogue cannot mirror.

    ``models``: ``comparison.json``'s ``models`` (name -> entry). ``format_comparison``
    prints these and the report shows them, so the two never disagree.
    """
    caveats = []
    for model, entry in models.items():
        label = entry.get("label") or MODEL_LABELS.get(model, model)
        if model == "sklearn_default" and entry.get("converged") is False:
            caveats.append(f"{label} stopped at max_iter before converging")
        for note in entry.get("notes", []):
            caveats.append(f"{label}: {note}")
    return caveats


def format_comparison(result: dict[str, Any]) -> str:
    """The side-by-side table, then the notes on what the analogue cannot mirror."""
    from handprop.analysis.evaluate import format_table

    lines = [
        f"run: {result['run']}  (train {result['split']['train']}, "
        f"test {result['split']['test']}, {result['split']['dtype']})",
        format_table(COMPARISON_HEADER, comparison_table_rows(result)),
    ]
    lines += [f"note: {caveat}" for caveat in comparison_caveats(result["models"])]
    return "\n".join(lines)


__all__ = [
    "COMPARISON_FILE",
    "MODELS",
    "compare_run",
    "comparison_caveats",
    "comparison_table_rows",
    "format_comparison",
    "sklearn_params",
]
