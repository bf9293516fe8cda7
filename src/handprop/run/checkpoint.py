"""Checkpoints: the state of a run at an epoch boundary, written to checkpoint.npz, and
read back to resume it bit for bit.

The file (``docs/formats.md``) holds ``params``, ``epoch``, ``seconds``, ``config``
(the config.toml it was trained with), the optimizer's state as ``opt_<name>``,
early stopping's ``best`` (and ``best_params``), and the weight average (``average``,
``averaged``) once there is one. :class:`Checkpoints` is the callback
that writes it every ``checkpoint_seconds`` at an epoch's end, and when a run is
interrupted; :func:`load_checkpoint` checks every array of one before it restores it.
"""

from __future__ import annotations

import math
import time
import zipfile
import zlib
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from handprop.config import RunConfig, parse_toml_config, to_toml
from handprop.errors import ConfigError, HandpropError
from handprop.nn import backend
from handprop.run.callbacks import Callback
from handprop.run.writer import CHECKPOINT_FILE, RESUME_FREE_FIELDS

if TYPE_CHECKING:
    from handprop.run.build import Run

#: a checkpoint is written at the first epoch boundary this many seconds after the last
CHECKPOINT_SECONDS = 60.0


class Checkpoints(Callback):
    """Keeps the state of the last epoch boundary, and writes it when due.

    Ctrl-C can land in the middle of an epoch, after some of its mini-batch steps; the
    checkpoint must hold the state at the end of the last whole epoch, or the resumed
    run would take those steps twice: so the state is copied at every epoch's end (and
    when training begins), and :meth:`save` writes that copy.

    ``seconds``: a checkpoint is written at the first epoch boundary at least this long
    after the last one (None: only when interrupted), so that a ``kill -9``, an
    out-of-memory kill or a power cut loses at most that much training.
    """

    def __init__(self, run: Run, seconds: float | None = CHECKPOINT_SECONDS) -> None:
        self.seconds = seconds
        self._last = time.monotonic()
        self._snapshot: dict[str, np.ndarray] | None = None
        self._snapshot_epoch = -1  # the epoch count that state belongs to
        self.snapshot(run)

    def on_epoch_end(self, run: Run) -> None:
        self.snapshot(run)
        due = self.seconds is not None and time.monotonic() - self._last >= self.seconds
        if due and run.epoch < run.cfg.epochs:
            self.save(run)  # writes the history too

    def snapshot(self, run: Run) -> None:
        """Copy the parameters and optimizer state, at an epoch boundary."""
        state = host_state(run)
        if self._snapshot is None or self._snapshot.keys() != state.keys():
            # state vectors appear on the first step: (re)allocate when they do
            self._snapshot = {k: np.array(v, copy=True) for k, v in state.items()}
        else:
            for k, v in state.items():
                np.copyto(self._snapshot[k], v)
        self._snapshot_epoch = run.epoch

    def save(self, run: Run) -> None:
        """Write checkpoint.npz (and the history): the state at the end of epoch
        ``run.epoch``."""
        # at an epoch boundary (Ctrl-C may land between the epoch count going up and the
        # snapshot) the live state is that epoch's end
        live = self._snapshot_epoch != run.epoch
        saved = host_state(run) if live else self._snapshot
        run.writer.checkpoint(
            run.history,
            epoch=np.array(run.epoch),
            seconds=np.array(run.seconds),
            config=np.array(to_toml(run.cfg)),  # what the saved state was trained with
            **saved,
            **run.stopping.state(),
        )
        self._last = time.monotonic()


def host_state(run: Run) -> dict[str, np.ndarray]:
    """The parameters, the optimizer state (``opt_<name>``) and the weight average as
    host arrays named as the checkpoint names them (NumPy's: the live ones; a device's:
    copies), for snapshots and checkpoints. The average is snapshotted with the
    parameters: a Ctrl-C after an epoch's update of the average, before the epoch counts
    as completed, saves both as they were at the end of the epoch before."""
    opt = {f"opt_{k}": v for k, v in run.opt.state_dict().items()}
    state = {"params": run.net.params, **opt, **run.average.state()}
    return {k: backend.to_host(v) for k, v in state.items()}


# -- resuming ------------------------------------------------------------------------------


def load_checkpoint(run: Run) -> None:
    """Restore the state of the run folder's checkpoint.npz, refusing one that this run
    cannot use.

    Raises
    ------
    ConfigError
        The file is truncated or not a checkpoint, holds Python objects, names an
        impossible epoch, or its arrays do not fit the network and optimizer.
    """
    path = run.run_dir / CHECKPOINT_FILE
    try:
        epoch, seconds = restore(run, read_checkpoint(path))
    except ValueError as exc:
        raise ConfigError(f"{path}: not a usable checkpoint: {exc}") from None
    run.resume_from(epoch, seconds)


def read_checkpoint(path: Path) -> dict[str, np.ndarray]:
    """The arrays of checkpoint.npz (read on every rank).

    Raises
    ------
    ConfigError
        Truncated, not a .npz, or holding Python objects (never unpickled).
    """
    from handprop.files import MAX_MODEL_BYTES, regular_file

    try:
        regular_file(path, "checkpoint", MAX_MODEL_BYTES, ConfigError)  # a FIFO would hang
        with np.load(path, allow_pickle=False) as ck:
            return {name: ck[name] for name in ck.files}
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


def restore(run: Run, ck: dict[str, np.ndarray]) -> tuple[int, float]:
    """Check every array of a checkpoint, then load the parameters and the optimizer's
    and early stopping's state (ValueError names the first array that does not fit);
    return the epochs and seconds it had trained."""
    missing = [k for k in ("params", "epoch", "seconds", "best") if k not in ck]
    if missing:
        raise ValueError(f"it has no {missing[0]!r} array")
    params, net = ck["params"], run.net
    if params.shape != (net.n_params,) or params.dtype != net.dtype:
        raise ValueError(
            f"its parameters are {params.dtype}{list(params.shape)}, but the run's "
            f"network has {net.dtype}{[net.n_params]}"
        )
    if not np.isfinite(params).all():
        raise ValueError("its parameters are not all finite")
    epoch, seconds, best = ck["epoch"], ck["seconds"], ck["best"]
    if epoch.shape != () or epoch.dtype.kind not in "iu" or epoch < 0:
        raise ValueError(f"epoch must be an integer >= 0, got {epoch.tolist()!r}")
    if epoch > run.cfg.epochs:
        raise ValueError(
            f"it has trained {int(epoch)} epochs already, more than the {run.cfg.epochs} asked for"
        )
    if (
        seconds.shape != ()
        or seconds.dtype.kind not in "iuf"
        or not (np.isfinite(seconds) and seconds >= 0)
    ):
        raise ValueError(f"seconds must be a number >= 0, got {seconds.tolist()!r}")
    # the best validation loss is inf before the first evaluation; its epoch and the
    # evaluations since are whole numbers >= 0
    if (
        best.shape != (3,)
        or best.dtype.kind not in "iuf"
        or np.isnan(best[0])
        or not all(math.isfinite(v) and v >= 0 and v == int(v) for v in best[1:].tolist())
    ):
        shown = best.tolist() if best.size <= 3 else f"{best.dtype}{list(best.shape)}"
        raise ValueError(f"'best' must hold a loss and two whole numbers >= 0, got {shown!r}")
    best_params = ck.get("best_params")
    if best_params is not None and (
        best_params.shape != params.shape or best_params.dtype != params.dtype
    ):
        raise ValueError("its best_params do not match its parameters")
    average, averaged = ck.get("average"), ck.get("averaged", np.array(0))
    if average is not None and (average.shape != params.shape or average.dtype != params.dtype):
        raise ValueError("its average does not match its parameters")
    if average is not None and run.cfg.average_from is None:
        raise ValueError("it holds a weight average, but the run's config has no average_from")
    if (
        averaged.shape != ()
        or averaged.dtype.kind not in "iu"
        or not 0 <= averaged <= epoch
        or (averaged > 0) != (average is not None)
    ):
        raise ValueError(
            f"'averaged' must count the epochs in its average (0 to {int(epoch)}), "
            f"got {averaged.tolist()!r}"
        )
    # NaN or inf in the state would be the resumed run's first step's result
    floats = ("best_params", "average")
    for name in sorted(k for k in ck if k in floats or k.startswith("opt_")):
        value = ck[name]
        if value.dtype.kind == "f" and not np.isfinite(value).all():
            raise ValueError(f"its {name!r} is not all finite")
    run.opt.load_state_dict({k[4:]: v for k, v in ck.items() if k.startswith("opt_")}, net.params)
    # read on the host, then moved to the network's device (NumPy: copied in place)
    backend.copyto(net.params, backend.asarray(params, net.xp))
    run.stopping.load(best, best_params)
    run.average.load(average, int(averaged), net.xp)
    return int(epoch), float(seconds)


def saved_config(checkpoint: Path) -> RunConfig | None:
    """The config a checkpoint was trained with (None for one that does not say, or that
    cannot be read: reading the checkpoint reports that)."""
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
