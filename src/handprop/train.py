"""The training loop and the run folder.

``train_run`` turns one validated :class:`~handprop.config.RunConfig` into a run folder
(see ``docs/formats.md``): it loads and splits the data, builds the network, runs
gradient descent with a live progress bar, guards against divergence, checkpoints at
epoch boundaries (every ``checkpoint_seconds``, and on Ctrl-C or SIGTERM), and writes
the model, history, predictions and metrics, each file atomically. The run folder is
made exclusively and locked while training (:mod:`handprop.rundir`).
"""

from __future__ import annotations

import csv
import io
import json
import math
import time
import zipfile
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from handprop import nn
from handprop.atomic import atomic_write_bytes, atomic_write_text
from handprop.config import RunConfig, load_config, parse_toml_config, to_toml
from handprop.errors import ConfigError, DivergenceError, HandpropError
from handprop.metrics import classification_metrics
from handprop.rundir import (
    FolderLock,
    is_owned,
    make_folder,
    remove_own_files,
    remove_stale_temporaries,
)

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
)

#: a checkpoint is written at the first epoch boundary this many seconds after the last
CHECKPOINT_SECONDS = 60.0
#: config fields a resumed run may change: where things are, not what is computed
RESUME_FREE_FIELDS = ("name", "out", "data_dir")


@dataclass
class Split:
    """The data of one run: normalized features and labels, with their dataset indices."""

    X_train: np.ndarray  # (n_train, features) in the network's dtype
    y_train: np.ndarray  # (n_train,) int64
    X_test: np.ndarray  # (n_test, features)
    y_test: np.ndarray  # (n_test,)
    train_idx: np.ndarray  # (n_train,) indices into the dataset
    test_idx: np.ndarray  # (n_test,)
    class_names: tuple[str, ...]
    image_shape: tuple[int, ...]
    pixel_max: float
    source: str
    X_val: np.ndarray | None = None  # held out of training for early stopping
    y_val: np.ndarray | None = None
    val_idx: np.ndarray | None = None


@dataclass
class RunResult:
    """What a finished (or failed) run reports back."""

    run_dir: Path
    status: str  # "completed", "diverged" or "interrupted"
    epochs_completed: int
    accuracy: float | None = None
    final_loss: float | None = None
    train_seconds: float = 0.0
    message: str | None = None
    metrics: dict[str, Any] = field(default_factory=dict)


def split_indices(cfg: RunConfig, dataset: Any) -> tuple[np.ndarray, np.ndarray]:
    """Train and test indices into ``dataset`` as the config asks."""
    from handprop.data import original_split, standard_split

    if cfg.split == "standard":
        train_idx, test_idx = standard_split(dataset)
        if cfg.train is not None:
            train_idx = train_idx[: cfg.train]
        if cfg.test is not None:
            test_idx = test_idx[: cfg.test]
        return train_idx, test_idx
    return original_split(len(dataset.labels), cfg.total, cfg.train, cfg.test, cfg.seed)


def carve_validation(cfg: RunConfig, train_idx: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Split ``cfg.validation`` of the training indices off, at random from the seed."""
    n_val = round(cfg.validation * len(train_idx))
    if cfg.validation and not 1 <= n_val < len(train_idx):
        raise ConfigError(
            f"validation = {cfg.validation} of {len(train_idx)} training samples leaves "
            f"{n_val} for validation and {len(train_idx) - n_val} for training; both need >= 1"
        )
    order = np.random.default_rng([cfg.seed, 1]).permutation(len(train_idx))
    return np.sort(train_idx[order[n_val:]]), np.sort(train_idx[order[:n_val]])


def load_split(cfg: RunConfig, progress: bool = True) -> Split:
    """Load the config's dataset, split it, and normalize only the samples used."""
    from handprop.data import load_dataset, normalize

    ds = load_dataset(cfg.dataset, cfg.data_dir, progress=progress)
    train_idx, test_idx = split_indices(cfg, ds)
    train_idx, test_idx = np.asarray(train_idx, np.int64), np.asarray(test_idx, np.int64)
    val_idx = None
    if cfg.validation:
        train_idx, val_idx = carve_validation(cfg, train_idx)
    dtype = nn.network.resolve_dtype(cfg.dtype)

    def features(idx: np.ndarray | None) -> np.ndarray | None:
        return None if idx is None else normalize(ds.images[idx], ds.pixel_max, dtype=dtype)

    def labels(idx: np.ndarray | None) -> np.ndarray | None:
        return None if idx is None else ds.labels[idx].astype(np.int64)

    return Split(
        X_train=features(train_idx),
        y_train=labels(train_idx),
        X_test=features(test_idx),
        y_test=labels(test_idx),
        train_idx=train_idx,
        test_idx=test_idx,
        class_names=tuple(ds.class_names),
        image_shape=tuple(ds.image_shape),
        pixel_max=float(ds.pixel_max),
        source=str(ds.source),
        X_val=features(val_idx),
        y_val=labels(val_idx),
        val_idx=val_idx,
    )


def build_network(cfg: RunConfig, data: Split) -> nn.Network:
    """The network the config describes, sized for the data, initialised from the seed."""
    meta = {
        "dataset": cfg.dataset,
        "class_names": list(data.class_names),
        "image_shape": list(data.image_shape),
        "pixel_max": data.pixel_max,
    }
    if cfg.layers is not None:
        return nn.Network.from_layers(
            cfg.layers,
            (1, *data.image_shape),  # grayscale images: one channel
            len(data.class_names),
            loss=cfg.loss,
            init=cfg.init,
            dtype=cfg.dtype,
            rng=np.random.default_rng(cfg.seed),
            meta=meta,
        )
    spec = [data.X_train.shape[1], *cfg.hidden, len(data.class_names)]
    return nn.Network.from_spec(
        spec,
        activation=list(cfg.activation),
        loss=cfg.loss,
        init=cfg.init,
        dtype=cfg.dtype,
        rng=np.random.default_rng(cfg.seed),
        meta=meta,
        dropout=list(cfg.dropout),
    )


def build_optimizer(cfg: RunConfig, net: nn.Network) -> nn.Optimizer:
    """The config's optimizer over ``net``'s flat vectors; weight decay spares biases."""
    kwargs: dict[str, Any] = {"weight_decay": cfg.weight_decay}
    if cfg.weight_decay:
        kwargs["decay_mask"] = net.layout.mask(("W",))
    if cfg.optimizer in ("momentum", "nesterov"):
        kwargs["momentum"] = cfg.momentum
    elif cfg.optimizer == "adam":
        kwargs.update(beta1=cfg.beta1, beta2=cfg.beta2, eps=cfg.eps)
    elif cfg.optimizer == "rmsprop":
        kwargs.update(rho=cfg.rho, eps=cfg.eps)
    return nn.OPTIMIZERS[cfg.optimizer](cfg.learning_rate, **kwargs)


def build_schedule(cfg: RunConfig) -> nn.Schedule:
    return nn.Schedule(
        cfg.schedule, cfg.epochs, gamma=cfg.gamma, step_size=cfg.step_size, warmup=cfg.warmup
    )


# -- run folder files ------------------------------------------------------------------


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


def split_description(cfg: RunConfig, data: Split) -> dict[str, Any]:
    return {
        "kind": cfg.split,
        "total": cfg.total,
        "train": len(data.y_train),
        "test": len(data.y_test),
        "validation": 0 if data.y_val is None else len(data.y_val),
        "seed": cfg.seed,
    }


# -- the loop --------------------------------------------------------------------------


class Trainer:
    """One run: data, network, optimizer, history, and the folder they are written to.

    Each epoch draws its randomness (the mini-batch order, the dropout masks) from a
    generator seeded by (seed, epoch), so that a run resumed from a checkpoint draws
    exactly what the uninterrupted run would have.

    ``checkpoint_seconds``: a checkpoint is written at the first epoch boundary at least
    this long after the last one (None: only when interrupted), so that a ``kill -9``,
    an out-of-memory kill or a power cut loses at most that much training.
    """

    def __init__(
        self,
        cfg: RunConfig,
        run_dir: Path,
        progress: bool = True,
        checkpoint_seconds: float | None = CHECKPOINT_SECONDS,
    ) -> None:
        self.cfg = cfg
        self.run_dir = Path(run_dir)
        self.progress = progress
        self.checkpoint_seconds = checkpoint_seconds
        self._last_checkpoint = time.monotonic()
        self.data = load_split(cfg, progress=progress)
        self.net = build_network(cfg, self.data)
        self.shape_inputs()
        self.opt = build_optimizer(cfg, self.net)
        # a network, batch or optimizer too large for memory: refused before any file
        n = len(self.data.y_train)
        batch = n if cfg.batch_size is None else min(cfg.batch_size, n)
        self.net.check_memory(batch, training=True, state_vectors=len(self.opt.state_names))
        self.schedule = build_schedule(cfg)
        self.history: list[dict[str, Any]] = []
        self.epoch = 0  # epochs completed
        self.seconds = 0.0  # training time so far (evaluation included)
        # early stopping: the best parameters seen on the validation set
        self.best_params: np.ndarray | None = None
        self.best_val_loss = math.inf
        self.best_epoch = 0
        self.bad_evals = 0  # evaluations since the best one
        self.stopped_early = False
        self._snapshot: dict[str, np.ndarray] | None = None  # state at the last epoch end
        self._snapshot_epoch = -1  # the epoch count that state belongs to

    def shape_inputs(self) -> None:
        """Give the feature rows the network's input shape ((n, 784) or (n, 1, 28, 28));
        a reshape of a contiguous array is a view, so nothing is copied."""
        d, shape = self.data, self.net.input_shape
        for name in ("X_train", "X_test", "X_val"):
            X = getattr(d, name)
            if X is not None:
                setattr(d, name, X.reshape(len(X), *shape))

    def augment(self, X: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        """A mini-batch with random shifts and rotations, as the config asks."""
        from handprop.augment import shift_rotate

        images = X.reshape(len(X), 1, *self.data.image_shape)
        out = shift_rotate(images, rng, self.cfg.augment_shift, self.cfg.augment_rotate)
        return out.reshape(X.shape)

    @property
    def columns(self) -> tuple[str, ...]:
        if self.data.y_val is None:
            return HISTORY_COLUMNS
        return (*HISTORY_COLUMNS, "val_loss", "val_acc")

    # -- checkpoints

    def snapshot(self) -> None:
        """Copy the parameters and optimizer state at an epoch boundary.

        Ctrl-C can land in the middle of an epoch, after some of its mini-batch steps;
        the checkpoint must hold the state at the end of the last whole epoch, or the
        resumed run would take those steps twice.
        """
        state = {"params": self.net.params, **self.opt.state_dict()}
        if self._snapshot is None or self._snapshot.keys() != state.keys():
            # state vectors appear on the first step: (re)allocate when they do
            self._snapshot = {k: np.array(v, copy=True) for k, v in state.items()}
        else:
            for k, v in state.items():
                np.copyto(self._snapshot[k], v)
        self._snapshot_epoch = self.epoch

    def save_checkpoint(self, live: bool = False) -> None:
        """Write checkpoint.npz: the state at the end of epoch ``self.epoch``.

        ``live``: take the state as it is now (at an epoch boundary) rather than the
        snapshot taken when the current epoch began. The history is written first, so
        that the checkpoint never names an epoch the history has not reached.
        """
        if live or self._snapshot_epoch != self.epoch:
            # at an epoch boundary (Ctrl-C may land between the epoch count going up
            # and the next snapshot): the live state is that epoch's end
            saved = {"params": self.net.params, **self.opt.state_dict()}
        else:
            saved = self._snapshot
        state = {f"opt_{k}": np.asarray(v) for k, v in saved.items() if k != "params"}
        if self.best_params is not None:
            state["best_params"] = self.best_params
        self.write_history()
        save_npz(
            self.run_dir / CHECKPOINT_FILE,
            params=saved["params"],
            epoch=np.array(self.epoch),
            seconds=np.array(self.seconds),
            best=np.array([self.best_val_loss, self.best_epoch, self.bad_evals]),
            config=np.array(to_toml(self.cfg)),  # what the saved state was trained with
            **state,
        )
        self._last_checkpoint = time.monotonic()

    def checkpoint_due(self) -> bool:
        """Whether the periodic checkpoint is due at this epoch boundary."""
        return (
            self.checkpoint_seconds is not None
            and self.epoch < self.cfg.epochs
            and time.monotonic() - self._last_checkpoint >= self.checkpoint_seconds
        )

    def load_checkpoint(self) -> None:
        """Restore the state of checkpoint.npz, refusing one that this run cannot use.

        Raises
        ------
        ConfigError
            The file is truncated or not a checkpoint, holds Python objects, names an
            impossible epoch, or its arrays do not fit the network and optimizer.
        """
        from handprop.runs import read_history

        path = self.run_dir / CHECKPOINT_FILE
        try:
            with np.load(path, allow_pickle=False) as ck:
                self._restore({name: ck[name] for name in ck.files})
        except ValueError as exc:
            why = str(exc)
            if "allow_pickle" in why:  # numpy's advice to unpickle is not ours to give
                why = "it holds Python objects, which handprop never loads"
            raise ConfigError(f"{path}: not a usable checkpoint: {why}") from None
        except (OSError, EOFError, zipfile.BadZipFile, zlib.error) as exc:
            why = exc.strerror if isinstance(exc, OSError) and exc.strerror else exc
            raise ConfigError(
                f"{path}: not a usable checkpoint (truncated or not a .npz file: {why})"
            ) from None
        columns = read_history(self.run_dir / HISTORY_FILE)
        self.history = [
            {c: None if np.isnan(v[i]) else float(v[i]) for c, v in columns.items()}
            for i in range(len(columns["epoch"]))
            if columns["epoch"][i] <= self.epoch
        ]
        for row in self.history:
            row["epoch"] = int(row["epoch"])
        if len(self.history) != self.epoch:
            raise ConfigError(
                f"{self.run_dir / HISTORY_FILE}: has {len(self.history)} epochs up to the "
                f"checkpoint's epoch {self.epoch}; the run folder was changed by hand"
            )

    def _restore(self, ck: dict[str, np.ndarray]) -> None:
        """Check every array of a checkpoint, then load them (ValueError names the first
        that does not fit)."""
        missing = [k for k in ("params", "epoch", "seconds", "best") if k not in ck]
        if missing:
            raise ValueError(f"it has no {missing[0]!r} array")
        params, net = ck["params"], self.net
        if params.shape != net.params.shape or params.dtype != net.params.dtype:
            raise ValueError(
                f"its parameters are {params.dtype}{list(params.shape)}, but the run's "
                f"network has {net.params.dtype}{list(net.params.shape)}"
            )
        if not np.isfinite(params).all():
            raise ValueError("its parameters are not all finite")
        epoch, seconds, best = ck["epoch"], ck["seconds"], ck["best"]
        if epoch.shape != () or epoch.dtype.kind not in "iu" or epoch < 0:
            raise ValueError(f"epoch must be an integer >= 0, got {epoch.tolist()!r}")
        if epoch > self.cfg.epochs:
            raise ValueError(
                f"it has trained {int(epoch)} epochs already, more than the "
                f"{self.cfg.epochs} asked for"
            )
        if seconds.shape != () or not (np.isfinite(seconds) and seconds >= 0):
            raise ValueError(f"seconds must be a number >= 0, got {seconds.tolist()!r}")
        if best.shape != (3,) or np.isnan(best).any():
            raise ValueError(f"'best' must hold 3 numbers, got {best.tolist()!r}")
        best_params = ck.get("best_params")
        if best_params is not None and (
            best_params.shape != params.shape or best_params.dtype != params.dtype
        ):
            raise ValueError("its best_params do not match its parameters")
        self.opt.load_state_dict(
            {k[4:]: v for k, v in ck.items() if k.startswith("opt_")}, net.params
        )
        net.params[...] = params
        self.epoch, self.seconds = int(epoch), float(seconds)
        self.best_val_loss, best_epoch, bad_evals = best.tolist()
        self.best_epoch, self.bad_evals = int(best_epoch), int(bad_evals)
        self.best_params = None if best_params is None else np.array(best_params)

    def write_history(self) -> None:
        atomic_write_text(self.run_dir / HISTORY_FILE, history_csv(self.history, self.columns))

    # -- training

    def accuracy(self, X: np.ndarray, y: np.ndarray) -> float:
        return float((self.net.predict(X) == y).mean()) if len(y) else float("nan")

    def train_epoch(self, epoch: int) -> tuple[float, float | None]:
        """One pass over the training set; returns the mean loss and, when it comes
        for free (full batch, no dropout), the training accuracy before the update."""
        cfg, net, opt = self.cfg, self.net, self.opt
        X, y = self.data.X_train, self.data.y_train
        n = len(y)
        rng = np.random.default_rng([cfg.seed, epoch])
        net.set_rng(rng)
        opt.lr = cfg.learning_rate * self.schedule.factor(epoch)
        batch = n if cfg.batch_size is None else min(cfg.batch_size, n)
        total = 0.0
        train_acc = None
        if batch == n:
            # full batch: the original's gradient descent, no shuffling needed
            loss, out = net.train_pass(X, y)
            self.check_loss(loss, epoch)
            if not any(isinstance(layer, nn.Dropout) for layer in net.layers):
                train_acc = float((out.argmax(axis=1) == y).mean())
            opt.step(net.params, net.grads)
            return loss, train_acc
        order = rng.permutation(n)
        augmenting = bool(cfg.augment_shift or cfg.augment_rotate)
        Xb = np.empty((batch, *X.shape[1:]), dtype=X.dtype)
        for start in range(0, n, batch):
            idx = order[start : start + batch]
            xb = Xb[: len(idx)]
            np.take(X, idx, axis=0, out=xb)  # into a reused buffer: no allocation
            if augmenting:
                xb = self.augment(xb, rng)
            yb = y[idx]
            loss, _ = net.train_pass(xb, yb)
            self.check_loss(loss, epoch)
            opt.step(net.params, net.grads)
            total += loss * len(idx)
        return total / n, train_acc

    def check_loss(self, loss: float, epoch: int) -> None:
        if not math.isfinite(loss):
            lr = self.cfg.learning_rate
            raise DivergenceError(
                f"the loss became {loss} at epoch {epoch} with learning rate {lr:g}; "
                f"try a smaller learning rate (e.g. {lr / 10:g})",
                epoch=epoch,
            )

    def evaluate(self, row: dict[str, Any], train_acc: float | None) -> None:
        """Accuracies (and validation loss) into ``row``; early-stopping bookkeeping."""
        data, net = self.data, self.net
        row["train_acc"] = (
            train_acc if train_acc is not None else self.accuracy(data.X_train, data.y_train)
        )
        row["test_acc"] = self.accuracy(data.X_test, data.y_test)
        if data.y_val is None:
            return
        out = net.forward(net.check_input(data.X_val))
        row["val_loss"] = val_loss = net.loss.value(out, data.y_val)
        row["val_acc"] = float((out.argmax(axis=1) == data.y_val).mean())
        if val_loss < self.best_val_loss:
            self.best_val_loss, self.best_epoch, self.bad_evals = val_loss, row["epoch"], 0
            if self.best_params is None:
                self.best_params = np.empty_like(net.params)
            self.best_params[...] = net.params
        else:
            self.bad_evals += 1
            if self.cfg.patience is not None and self.bad_evals >= self.cfg.patience:
                self.stopped_early = True

    def run(self) -> None:
        """Train from ``self.epoch`` to ``cfg.epochs``; Ctrl-C checkpoints and re-raises."""
        from tqdm import tqdm

        cfg = self.cfg
        bar = tqdm(
            total=cfg.epochs,
            initial=self.epoch,
            desc="train",
            unit="epoch",
            disable=not self.progress,
            dynamic_ncols=True,
            leave=False,
        )
        postfix: dict[str, str] = {}
        try:
            # overflow on the way to a NaN loss is reported by check_loss, by epoch
            with np.errstate(over="ignore", invalid="ignore"):
                while self.epoch < cfg.epochs and not self.stopped_early:
                    epoch = self.epoch + 1
                    self.snapshot()
                    start = time.perf_counter()
                    loss, train_acc = self.train_epoch(epoch)
                    row: dict[str, Any] = {"epoch": epoch, "loss": loss}
                    evaluated = epoch % cfg.eval_every == 0 or epoch == cfg.epochs
                    if evaluated:
                        self.evaluate(row, train_acc)
                    self.seconds += time.perf_counter() - start
                    row["seconds"] = self.seconds
                    self.history.append(row)
                    self.epoch = epoch
                    if self.checkpoint_due():
                        self.save_checkpoint(live=True)  # writes the history too
                    elif evaluated:
                        self.write_history()  # so a long run can be followed as it goes
                    postfix["loss"] = f"{loss:.4f}"
                    for key in ("train_acc", "test_acc", "val_acc"):
                        if row.get(key) is not None:
                            postfix[key.removesuffix("_acc")] = f"{row[key]:.4f}"
                    bar.set_postfix(postfix, refresh=False)
                    bar.update(1)
        finally:
            bar.close()
        if self.best_params is not None:
            # early stopping ends on the best validated parameters, not the last ones
            self.net.params[...] = self.best_params

    # -- results

    def finish(self) -> RunResult:
        """Write model, predictions, history and metrics of a completed run."""
        d, data, net = self.run_dir, self.data, self.net
        P = net.predict_proba(data.X_test)
        metrics = classification_metrics(data.y_test, P.argmax(axis=1), data.class_names)
        final_loss = self.history[-1]["loss"] if self.history else None
        metrics.update(self.summary_fields("completed", None, final_loss))
        nn.save(net, d / MODEL_FILE)
        atomic_write_text(d / PREDICTIONS_FILE, predictions_csv(data.test_idx, data.y_test, P))
        self.write_history()
        write_json(d / METRICS_FILE, metrics)
        (d / CHECKPOINT_FILE).unlink(missing_ok=True)
        return RunResult(
            d, "completed", self.epoch, metrics["accuracy"], final_loss, self.seconds, None, metrics
        )

    def fail(self, status: str, message: str) -> RunResult:
        """Record a run that did not complete (diverged, failed or interrupted): its
        history and metrics.json, and for an interrupted one its checkpoint."""
        final_loss = self.history[-1]["loss"] if self.history else None
        metrics = self.summary_fields(status, message, final_loss)
        if status == "interrupted":
            self.save_checkpoint()
        else:
            self.write_history()
        write_json(self.run_dir / METRICS_FILE, metrics)
        return RunResult(
            self.run_dir, status, self.epoch, None, final_loss, self.seconds, message, metrics
        )

    def summary_fields(self, status: str, message: str | None, final_loss: float | None) -> dict:
        fields = {
            "status": status,
            "message": message,
            "train_seconds": round(self.seconds, 4),
            "epochs_completed": self.epoch,
            "final_loss": final_loss,
            "n_params": self.net.n_params,
            "dataset": self.cfg.dataset,
            "data_source": self.data.source,
            "split": split_description(self.cfg, self.data),
        }
        if self.data.y_val is not None:
            fields["early_stopping"] = {
                "best_epoch": self.best_epoch,
                "best_val_loss": self.best_val_loss,
                "stopped_early": self.stopped_early,
            }
        return fields


def train_run(
    cfg: RunConfig,
    run_dir: str | Path | None = None,
    *,
    default_name: str = "run",
    progress: bool = True,
    checkpoint_seconds: float | None = CHECKPOINT_SECONDS,
) -> RunResult:
    """Train one config into a run folder and return how it ended.

    ``run_dir``: a folder handprop made for this run (a grid row's, see
    :func:`handprop.rundir.make_or_adopt`); by default a new one is made under
    ``cfg.out``, named ``cfg.name`` or ``default_name`` (``-2``, ``-3``, ... when taken).

    A diverged run is recorded in its folder and returned with status "diverged"; a
    Ctrl-C (or SIGTERM) is recorded with a checkpoint and re-raised as
    KeyboardInterrupt after the folder is consistent, so :func:`resume_run` can
    continue it; so can a run killed outright, from its last periodic checkpoint.
    """
    # the data and the network are checked (and sized) before any folder is made
    trainer = Trainer(cfg, Path(run_dir or "."), progress, checkpoint_seconds)
    if run_dir is None:
        run_dir = make_folder(cfg.out, cfg.name or default_name)
    trainer.run_dir = run_dir = Path(run_dir)
    with FolderLock(run_dir):
        _start(trainer)
        return _run(trainer)


def _start(trainer: Trainer) -> None:
    """The files a run writes before its first epoch: its config and its split."""
    run_dir, data = trainer.run_dir, trainer.data
    atomic_write_text(run_dir / CONFIG_FILE, to_toml(trainer.cfg))
    indices = {"train_idx": data.train_idx, "test_idx": data.test_idx}
    if data.val_idx is not None:
        indices["val_idx"] = data.val_idx
    save_npz(run_dir / SPLIT_FILE, **indices)


def resume_run(
    run_dir: str | Path,
    progress: bool = True,
    *,
    epochs: int | None = None,
    checkpoint_seconds: float | None = CHECKPOINT_SECONDS,
) -> RunResult:
    """Continue an interrupted or killed run to the result it would have reached.

    From the last checkpoint when there is one; a run killed before its first
    checkpoint starts again in its own folder. ``epochs`` changes the number of epochs
    (the one change that keeps the epochs already trained valid, unless the schedule
    depends on it).

    Raises
    ------
    ConfigError
        The folder is not an unfinished run handprop made, its config.toml was changed
        since the checkpoint (naming the field), or the checkpoint is unusable.
    OutputError
        Another handprop process is training in the folder now.
    """
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        what = "not found" if not run_dir.exists() else "not a folder"
        raise ConfigError(f"{run_dir}: {what}; --resume needs a run folder")
    if not is_owned(run_dir):
        raise ConfigError(
            f"{run_dir}: not a run folder made by handprop (no .handprop-run inside); "
            "nothing to resume"
        )
    with FolderLock(run_dir):
        remove_stale_temporaries(run_dir, RUN_FILES)  # left by a kill -9 mid-write
        checkpoint = run_dir / CHECKPOINT_FILE
        if not checkpoint.is_file() and is_complete(run_dir):
            raise ConfigError(f"{run_dir}: this run is already complete; nothing to resume")
        cfg = load_config(run_dir / CONFIG_FILE)
        if checkpoint.is_file():
            check_unchanged(saved_config(checkpoint), cfg, run_dir / CONFIG_FILE)
        if epochs is not None and epochs != cfg.epochs:
            cfg = _with_epochs(cfg, epochs)
        trainer = Trainer(cfg, run_dir, progress, checkpoint_seconds)
        if checkpoint.is_file():
            trainer.load_checkpoint()
        else:
            # killed before its first checkpoint: nothing to keep but the folder
            remove_own_files(run_dir, RUN_FILES)
        _start(trainer)
        return _run(trainer)


def saved_config(checkpoint: Path) -> RunConfig | None:
    """The config a checkpoint was trained with (None for one that does not say, or that
    cannot be read: :meth:`Trainer.load_checkpoint` reports that)."""
    try:
        with np.load(checkpoint, allow_pickle=False) as ck:
            if "config" not in ck.files:
                return None
            text = str(ck["config"])
    except (OSError, EOFError, ValueError, zipfile.BadZipFile, zlib.error):
        return None
    try:
        return parse_toml_config(text, f"{checkpoint} (its config)")
    except HandpropError:
        return None


def check_unchanged(saved: RunConfig | None, now: RunConfig, path: Path) -> None:
    """Refuse a config.toml edited since the checkpoint in a field that alters the result.

    Raises
    ------
    ConfigError
        Naming the first such field, its value then and now.
    """
    if saved is None:
        return
    before, after = saved.to_dict(), now.to_dict()
    for name, value in before.items():
        if name not in RESUME_FREE_FIELDS and after.get(name) != value:
            hint = " (to change the number of epochs, use --epochs N)" if name == "epochs" else ""
            raise ConfigError(
                f"{path}: {name} was {value!r} when the checkpoint was written, now "
                f"{after.get(name)!r}; a resumed run continues with the config it began "
                f"with: put it back{hint}"
            )


def _with_epochs(cfg: RunConfig, epochs: int) -> RunConfig:
    if cfg.schedule == "cosine":
        raise ConfigError(
            f"--epochs {epochs}: the cosine schedule is shaped by the number of epochs "
            f"({cfg.epochs}), so the epochs already trained would not fit another number"
        )
    return cfg.replace(epochs=epochs)


def _run(trainer: Trainer) -> RunResult:
    try:
        trainer.run()
    except DivergenceError as exc:
        return trainer.fail("diverged", str(exc))
    except MemoryError:
        return trainer.fail(
            "failed",
            f"ran out of memory in epoch {trainer.epoch + 1}; a smaller batch_size or "
            "network needs less",
        )
    except KeyboardInterrupt as exc:
        result = trainer.fail(
            "interrupted",
            f"interrupted after epoch {trainer.epoch}; continue with "
            f"`handprop train --resume {trainer.run_dir}`",
        )
        exc.result = result  # for the command line to say where the checkpoint is
        raise
    return trainer.finish()


def is_complete(run_dir: Path) -> bool:
    """True when the folder holds a completed run (metrics.json says so)."""
    try:
        return json.loads((run_dir / METRICS_FILE).read_text())["status"] == "completed"
    except (OSError, ValueError, KeyError, TypeError):
        return False


__all__ = [
    "RunResult",
    "Split",
    "Trainer",
    "build_network",
    "is_complete",
    "load_split",
    "resume_run",
    "train_run",
]
