"""The entry points: :func:`train_run` turns one validated config into a run folder
(``docs/formats.md``), :func:`resume_run` continues one.

Both build the run (:func:`handprop.run.build.build_run`: config -> split, network,
optimizer), claim and lock its folder (:mod:`handprop.run.claim`), train it
(:func:`handprop.run.fit.fit`, with the callbacks of :mod:`handprop.run.callbacks` and
:class:`~handprop.run.checkpoint.Checkpoints`), and write its results
(:class:`~handprop.run.writer.RunWriter`, a no-op off MPI rank 0). A diverged run is
recorded and returned; a Ctrl-C (or SIGTERM) is recorded with a checkpoint and re-raised.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from handprop.config import RunConfig, load_config
from handprop.errors import ConfigError, DivergenceError, Interrupted
from handprop.metrics import classification_metrics
from handprop.nn.modelfile import model_bytes
from handprop.run.build import Run, build_run, split_description
from handprop.run.callbacks import Evaluate, Progress, RecordDiagnostics, WriteHistory
from handprop.run.checkpoint import (
    CHECKPOINT_SECONDS,
    Checkpoints,
    check_unchanged,
    load_checkpoint,
    saved_config,
)
from handprop.run.claim import (
    FolderLock,
    is_owned,
    make_folder,
    remove_own_files,
    remove_stale_temporaries,
)
from handprop.run.fit import diverged, fit, nonfinite
from handprop.run.writer import (
    CHECKPOINT_FILE,
    CONFIG_FILE,
    RUN_FILES,
    is_complete,
    predictions_csv,
)
from handprop.scale.parallel import OneProcess, World


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


def train_run(
    cfg: RunConfig,
    run_dir: str | Path | None = None,
    *,
    default_name: str = "run",
    progress: bool = True,
    checkpoint_seconds: float | None = CHECKPOINT_SECONDS,
    world: World | None = None,
) -> RunResult:
    """Train one config into a run folder and return how it ended.

    ``run_dir``: a folder handprop made for this run (a grid row's, see
    :func:`handprop.run.claim.make_or_adopt`); by default a new one is made under
    ``cfg.out``, named ``cfg.name`` or ``default_name`` (``-2``, ``-3``, ... when taken).
    ``world``: the MPI ranks training together (rank 0 makes and writes the folder).

    A diverged run is recorded in its folder and returned with status "diverged"; a
    Ctrl-C (or SIGTERM) is recorded with a checkpoint and raised again, as
    :class:`~handprop.errors.Interrupted` carrying the result (its ``outcome``: the
    checkpoint's message), after the folder is consistent, so :func:`resume_run` can
    continue it; so can a run killed outright, from its last periodic checkpoint.
    """
    world = world or OneProcess()
    if cfg.split_seed is None:  # config.toml records the split's seed, whatever seed becomes
        cfg = cfg.replace(split_seed=cfg.resolved_split_seed)

    def place() -> Path:  # asked once the data and the network are checked (and sized)
        made = run_dir
        if made is None and world.rank == 0:
            made = make_folder(cfg.out, cfg.name or default_name)
        return Path(world.broadcast(made))  # rank 0's, on every rank

    run = build_run(cfg, place, progress, world)
    with _lock(world, run.run_dir):
        return _train(run, checkpoint_seconds)


def resume_run(
    run_dir: str | Path,
    progress: bool = True,
    *,
    epochs: int | None = None,
    checkpoint_seconds: float | None = CHECKPOINT_SECONDS,
    world: World | None = None,
    device: str | None = None,
) -> RunResult:
    """Continue an interrupted or killed run to the result it would have reached.

    From the last checkpoint when there is one; a run killed before its first
    checkpoint starts again in its own folder. ``epochs`` changes the number of epochs
    (the one change that keeps the epochs already trained valid, unless the schedule
    depends on it); ``device`` where it goes on ("cpu", "cuda"; by default its
    config's): the checkpoint is read on the host and moved there. Under MPI every rank
    reads the folder; rank 0 writes.

    Raises
    ------
    ConfigError
        The folder is not an unfinished run handprop made, its config.toml was changed
        since the checkpoint (naming the field), or the checkpoint is unusable.
    OutputError
        Another handprop process is training in the folder now.
    """
    world = world or OneProcess()
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        what = "not found" if not run_dir.exists() else "not a folder"
        raise ConfigError(f"{run_dir}: {what}; --resume needs a run folder")
    if not is_owned(run_dir):
        raise ConfigError(
            f"{run_dir}: not a run folder made by handprop (no .handprop-run inside); "
            "nothing to resume"
        )
    with _lock(world, run_dir):
        if world.rank == 0:
            remove_stale_temporaries(run_dir, RUN_FILES)  # left by a kill -9 mid-write
        checkpoint = run_dir / CHECKPOINT_FILE
        if not checkpoint.is_file() and is_complete(run_dir):
            raise ConfigError(f"{run_dir}: this run is already complete; nothing to resume")
        cfg = load_config(run_dir / CONFIG_FILE)
        if checkpoint.is_file():
            check_unchanged(saved_config(checkpoint), cfg, run_dir / CONFIG_FILE)
        if epochs is not None and epochs != cfg.epochs:
            cfg = _with_epochs(cfg, epochs)
        if device is not None and device != cfg.device:
            cfg = cfg.replace(device=device)
        run = build_run(cfg, lambda: run_dir, progress, world)
        if checkpoint.is_file():
            load_checkpoint(run)
        elif world.rank == 0:
            # killed before its first checkpoint: nothing to keep but the folder
            remove_own_files(run_dir, RUN_FILES)
        return _train(run, checkpoint_seconds)


def _lock(world: World, run_dir: Path) -> Any:
    """The folder's lock, held by the rank that writes."""
    return FolderLock(run_dir) if world.rank == 0 else contextlib.nullcontext()


def _with_epochs(cfg: RunConfig, epochs: int) -> RunConfig:
    if cfg.schedule in ("cosine", "onecycle"):
        raise ConfigError(
            f"--epochs {epochs}: the {cfg.schedule} schedule is shaped by the number of epochs "
            f"({cfg.epochs}), so the epochs already trained would not fit another number"
        )
    return cfg.replace(epochs=epochs)


def _train(run: Run, checkpoint_seconds: float | None) -> RunResult:
    """Write the config and split, train, and write the results (or the failure)."""
    data = run.data
    indices = {"train_idx": data.train_idx, "test_idx": data.test_idx}
    if data.val_idx is not None:
        indices["val_idx"] = data.val_idx
    run.writer.start(run.cfg, indices)
    evaluations = [RecordDiagnostics(run), Evaluate()]
    checkpoints = Checkpoints(run, checkpoint_seconds)
    try:
        with contextlib.closing(run.model):  # its worker processes, if any, end with fit
            fit(run, evaluations, [WriteHistory(), checkpoints, Progress(run)])
    except DivergenceError as exc:
        return fail(run, checkpoints, "diverged", str(exc))
    except MemoryError:
        return fail(
            run,
            checkpoints,
            "failed",
            f"ran out of memory in epoch {run.epoch + 1}; a smaller batch_size or "
            "network needs less",
        )
    except KeyboardInterrupt as exc:
        result = fail(
            run,
            checkpoints,
            "interrupted",
            f"interrupted after epoch {run.epoch}; continue with "
            f"`handprop train --resume {run.run_dir}`",
        )
        # for the command line to say where the checkpoint is
        raise Interrupted.after(exc, result) from exc
    try:
        return finish(run)
    except DivergenceError as exc:  # no model of NaNs is ever a run's result
        return fail(run, checkpoints, "diverged", str(exc))


def finish(run: Run) -> RunResult:
    """Write model, predictions, history and metrics of a completed run.

    Raises
    ------
    DivergenceError
        The test set's outputs are not all finite (nothing is written then).
    """
    data, net = run.data, run.net
    metrics: dict[str, Any] = {}
    final_loss = run.history[-1]["loss"] if run.history else None
    if run.writer.writes:
        with np.errstate(over="ignore", invalid="ignore"):  # reported just below
            P = run.model.predict_proba(data.X_test)
        if not np.isfinite(P).all():  # finite parameters whose outputs overflow
            what = f"the network's outputs became {nonfinite(P)}"
            raise diverged(what, run.epoch, run.cfg)
        metrics = classification_metrics(data.y_test, P.argmax(axis=1), data.class_names)
        metrics.update(summary_fields(run, "completed", None, final_loss))
        run.writer.history(run.history)
        run.writer.results(
            model_bytes(net), predictions_csv(data.test_idx, data.y_test, P), metrics
        )
    return RunResult(
        run.run_dir,
        "completed",
        run.epoch,
        metrics.get("accuracy"),
        final_loss,
        run.seconds,
        None,
        metrics,
    )


def fail(run: Run, checkpoints: Checkpoints, status: str, message: str) -> RunResult:
    """Record a run that did not complete (diverged, failed or interrupted): its
    history and metrics.json, and for an interrupted one its checkpoint."""
    final_loss = run.history[-1]["loss"] if run.history else None
    metrics = summary_fields(run, status, message, final_loss)
    if status == "interrupted":
        checkpoints.save(run)
    else:
        run.writer.history(run.history)
    run.writer.metrics(metrics)
    return RunResult(
        run.run_dir, status, run.epoch, None, final_loss, run.seconds, message, metrics
    )


def summary_fields(
    run: Run, status: str, message: str | None, final_loss: float | None
) -> dict[str, Any]:
    fields = {
        "status": status,
        "message": message,
        "train_seconds": round(run.seconds, 4),
        "epochs_completed": run.epoch,
        "final_loss": final_loss,
        "n_params": run.net.n_params,
        "device": run.net.device,
        "dataset": run.cfg.dataset,
        "data_source": run.data.source,
        "split": split_description(run.cfg, run.data),
    }
    if run.world.size > 1:
        fields["ranks"] = run.world.size
    if run.data.y_val is not None:
        fields["early_stopping"] = run.stopping.summary()
    if run.average.count:
        fields["weight_average"] = {"from_epoch": run.average.start, "epochs": run.average.count}
    return fields
