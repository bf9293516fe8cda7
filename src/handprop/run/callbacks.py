"""The jobs at an epoch's end, one small class each, one method: ``on_epoch_end(run)``.

:func:`handprop.run.fit.fit` calls the evaluations on evaluated epochs (reports: their
time is not training time), then the records on every epoch. Each reads the
:class:`~handprop.run.build.Run` and records into its ``row``; the run-folder writer does
nothing off MPI rank 0, so every rank runs the same callbacks. The checkpoints are
:class:`handprop.run.checkpoint.Checkpoints`.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any

import numpy as np

from handprop.nn import backend

if TYPE_CHECKING:
    from handprop.run.build import Run


class Callback:
    """A job at an epoch's end; ``close`` when training stops, however it stops."""

    def on_epoch_end(self, run: Run) -> None:
        raise NotImplementedError

    def close(self) -> None:
        pass


# -- evaluations (on evaluated epochs) -----------------------------------------------------


class RecordDiagnostics(Callback):
    """Per-layer norms and unit health into diagnostics.csv (rank 0 only)."""

    def __init__(self, run: Run) -> None:
        from handprop.run.diagnostics import Diagnostics

        self.diagnostics = Diagnostics(run.net)
        # the weights before each epoch's last step, for the update ratio (every rank)
        run.watch_last_step(self.diagnostics.keep_before)

    def on_epoch_end(self, run: Run) -> None:
        if run.writer.writes:
            self.diagnostics.record(run.row["epoch"], run.data.X_train, run.run_dir)
            run.writer.diagnostics(self.diagnostics.rows)


class Evaluate(Callback):
    """Training and test accuracies into the row (the validation part's loss and
    accuracy are training's: :func:`handprop.run.fit.validate`).

    Evaluation reads host arrays: predict_proba moves them batch by batch."""

    def on_epoch_end(self, run: Run) -> None:
        data, model = run.data, run.model
        train_acc = run.train_acc
        if train_acc is None:
            train_acc = model.accuracy(data.X_train, data.y_train)
        run.record(train_acc=train_acc, test_acc=model.accuracy(data.X_test, data.y_test))


def loss_value(run: Run, X: np.ndarray, y: np.ndarray) -> float:
    """The inference loss over the host arrays (X, y): at once on the host; on a
    device, batch by batch (each moved there), weighted by the batches' sizes."""
    xp, n = run.net.xp, len(y)
    if backend.is_numpy(xp):
        return run.model.loss_value(X, y)
    step, total = run.net.inference_batch(), 0.0
    for start in range(0, n, step):
        xb, yb = X[start : start + step], y[start : start + step]
        loss = run.model.loss_value(
            backend.asarray(xb, xp), backend.asarray(yb, xp, dtype=xp.int64)
        )
        total += loss * len(yb)
    return total / max(n, 1)


class EarlyStopping:
    """The parameters of the lowest validation loss, and when to stop looking for them.

    ``patience``: stop after this many evaluations without a lower validation loss
    (None: never stop early; the best parameters are still the run's result).
    """

    def __init__(self, patience: int | None) -> None:
        self.patience = patience
        self.best_loss = math.inf
        self.best_epoch = 0
        self.bad_evals = 0  # evaluations since the best one
        self.best_params: np.ndarray | None = None
        self.stopped = False

    def on_epoch_end(self, run: Run) -> None:
        if "val_loss" in run.row:
            self.update(run.row["epoch"], run.row["val_loss"], backend.to_host(run.net.params))

    def update(self, epoch: int, val_loss: float, params: np.ndarray) -> None:
        if val_loss < self.best_loss:
            self.best_loss, self.best_epoch, self.bad_evals = val_loss, epoch, 0
            if self.best_params is None:
                self.best_params = np.empty_like(params)
            self.best_params[...] = params
        else:
            self.bad_evals += 1
            self.stopped = self.patience is not None and self.bad_evals >= self.patience

    def state(self) -> dict[str, np.ndarray]:
        """For a checkpoint: ``best`` (loss, epoch, evaluations since) and the params."""
        state = {"best": np.array([self.best_loss, self.best_epoch, self.bad_evals])}
        if self.best_params is not None:
            state["best_params"] = self.best_params
        return state

    def load(self, best: np.ndarray, best_params: np.ndarray | None) -> None:
        self.best_loss, best_epoch, bad_evals = best.tolist()
        self.best_epoch, self.bad_evals = int(best_epoch), int(bad_evals)
        self.best_params = None if best_params is None else np.array(best_params)

    def summary(self) -> dict[str, Any]:
        return {
            "best_epoch": self.best_epoch,
            "best_val_loss": self.best_loss,
            "stopped_early": self.stopped,
        }


class WeightAverage:
    """The mean of the parameters at the ends of epochs ``start`` to the last: the run's
    result in place of the last epoch's parameters (stochastic weight averaging,
    Izmailov et al. 2018). A mean of points along the path through a basin of low loss
    lies nearer its middle than any of them, and often predicts about as well as an
    ensemble of them.

    The mean of k vectors, kept as each one comes: mean_k = mean_{k-1} + (p_k -
    mean_{k-1}) / k. It lives where the parameters do (a device's array on a GPU).

    ``start``: the first epoch averaged (None: no averaging; :meth:`on_epoch_end` does
    nothing).
    """

    def __init__(self, start: int | None) -> None:
        self.start = start
        self.count = 0  # epochs averaged
        self.mean: Any = None

    def on_epoch_end(self, run: Run) -> None:
        if self.start is not None and run.row["epoch"] >= self.start:
            self.update(run.net.params)

    def update(self, params: Any) -> None:
        self.count += 1
        if self.mean is None:
            self.mean = backend.copy(params)
        else:
            self.mean += (params - self.mean) / self.count

    def state(self) -> dict[str, np.ndarray]:
        """For a checkpoint: ``average`` and ``averaged`` (its count), once there is one."""
        if self.mean is None:
            return {}
        return {"average": backend.to_host(self.mean), "averaged": np.array(self.count)}

    def load(self, average: np.ndarray | None, count: int, xp: Any) -> None:
        """A checkpoint's mean of ``count`` epochs' parameters, moved to namespace ``xp``."""
        self.count = count
        self.mean = None if average is None else backend.asarray(np.array(average), xp)


# -- records (every epoch) -----------------------------------------------------------------


class WriteHistory(Callback):
    """history.csv after every evaluated epoch, so that a long run can be followed."""

    def on_epoch_end(self, run: Run) -> None:
        if run.evaluated:
            run.writer.history(run.history)


class Progress(Callback):
    """The progress bar: epochs, with the last loss and accuracies (rank 0 only)."""

    def __init__(self, run: Run) -> None:
        from tqdm import tqdm

        self.bar = tqdm(
            total=run.cfg.epochs,
            initial=run.epoch,
            desc="train",
            unit="epoch",
            disable=not run.progress,
            dynamic_ncols=True,
            leave=False,
        )

    def on_epoch_end(self, run: Run) -> None:
        self.bar.set_postfix(progress_fields(run.row), refresh=False)
        self.bar.update(1)

    def close(self) -> None:
        self.bar.close()


def progress_fields(row: dict[str, Any]) -> dict[str, str]:
    """The progress bar's loss and accuracies for an epoch's history row."""
    fields = {"loss": f"{row['loss']:.4f}"}
    for key in ("train_acc", "test_acc", "val_acc"):
        if row.get(key) is not None:
            fields[key.removesuffix("_acc")] = f"{row[key]:.4f}"
    return fields
