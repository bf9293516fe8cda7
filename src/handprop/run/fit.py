"""The training loop: :func:`fit` runs :func:`run_epoch` epoch after epoch and calls the
callbacks at each epoch's end.

Each epoch draws its randomness (the mini-batch order, the dropout masks, the
augmentation) from a generator seeded by (seed, epoch), so that a resumed run, and
every MPI rank, draws exactly what one uninterrupted process would have. Each batch
goes through :class:`~handprop.scale.DataParallel`: over this process's threads and,
under ``mpiexec``, over the ranks (:mod:`handprop.scale.mpi`), each rank running this
same loop on the same data, rank 0 alone writing.

The divergence guard: every step's loss, a scalar computed anyway, is checked
(:func:`check_loss`): parameters made NaN or infinite by a step make the next step's
loss so. The parameters themselves are checked in one pass at the end of every epoch
(:func:`check_params`), which sees the update of an epoch's last step, whose loss comes
only with the next epoch, or never; and the test set's outputs before any result is
written (:func:`handprop.run.train.finish`), which sees parameters still finite but so
large that the forward pass overflows.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from handprop import nn
from handprop.config import RunConfig
from handprop.errors import DivergenceError
from handprop.nn import backend
from handprop.run.build import Run, on_device
from handprop.run.callbacks import Callback, loss_value
from handprop.scale.graphs import TrainingStep
from handprop.scale.parallel import DataParallel


def fit(run: Run, evaluations: Sequence[Callback], records: Sequence[Callback]) -> None:
    """Train ``run`` from ``run.epoch`` to ``cfg.epochs`` (or until early stopping).

    At each epoch's end, the weight average's update (``cfg.average_from``), on
    evaluated epochs (every ``eval_every``, and the last) the validation part's loss and
    the early-stopping decision on it (timed as training),
    then the ``evaluations`` (accuracies, diagnostics: reports, not training, so not
    timed), then on every epoch the ``records`` (history, checkpoint, progress bar).
    """
    cfg, net, opt = run.cfg, run.net, run.opt
    try:
        # overflow on the way to a NaN loss is reported by check_loss, by epoch
        with np.errstate(over="ignore", invalid="ignore"):
            while run.epoch < cfg.epochs and not run.stopping.stopped:
                epoch = run.epoch + 1
                start = time.perf_counter()
                loss, train_acc = train_epoch(
                    run.model,
                    opt,
                    run.X_fit,
                    run.y_fit,
                    run.batch,
                    epoch,
                    cfg,
                    run.augment,
                    run.before_last_step,
                    run.step,
                )
                evaluated = epoch % cfg.eval_every == 0 or epoch == cfg.epochs
                run.begin_epoch(epoch, loss, train_acc, evaluated)
                run.average.on_epoch_end(run)
                if evaluated and run.data.y_val is not None:
                    validate(run)
                    run.stopping.on_epoch_end(run)
                run.add_seconds(time.perf_counter() - start)
                run.record(seconds=run.seconds)
                for callback in evaluations if evaluated else ():
                    callback.on_epoch_end(run)
                run.end_epoch()
                for callback in records:
                    callback.on_epoch_end(run)
    finally:
        for callback in (*evaluations, *records):
            callback.close()
    if run.stopping.best_params is not None:
        # early stopping ends on the best validated parameters, not the last ones
        backend.copyto(net.params, backend.asarray(run.stopping.best_params, net.xp))
    if run.average.mean is not None:
        # weight averaging ends on the mean of the averaged epochs' parameters (the
        # history's accuracies are each epoch's own)
        backend.copyto(net.params, run.average.mean)
    if cfg.batchnorm_stats == "recalibrate":
        start = time.perf_counter()
        recalibrate_batchnorm(net, run.data.X_train, cfg.batch_size or 256)
        run.add_seconds(time.perf_counter() - start)  # part of the training time
        check_params(net, run.epoch, cfg)


def validate(run: Run) -> None:
    """The validation part's loss and accuracy into the epoch's row."""
    data = run.data
    run.record(
        val_loss=loss_value(run, data.X_val, data.y_val),
        val_acc=run.model.accuracy(data.X_val, data.y_val),
    )


# -- one epoch ----------------------------------------------------------------------------


def train_epoch(
    model: DataParallel,
    opt: nn.Optimizer,
    X: np.ndarray,
    y: np.ndarray,
    batch: int,
    epoch: int,
    cfg: RunConfig,
    augment: Callable[[np.ndarray, np.random.Generator], np.ndarray] | None = None,
    before_last_step: Callable[[Any], None] | None = None,
    step: TrainingStep | None = None,
) -> tuple[float, float | None]:
    """Epoch ``epoch`` (counted from 1) of a run of ``cfg``: :func:`run_epoch` with the
    epoch's draws (batch order, dropout's masks, augmentation) from a generator seeded
    by (seed, epoch), the schedule's rate for it, and the parameters checked after it
    (:func:`fit`'s epochs, and ``handprop.sklearn``'s)."""
    rng = np.random.default_rng([cfg.seed, epoch])  # the epoch's draws
    model.net.set_rng(rng)  # dropout's masks
    opt.set_epoch(epoch, steps=math.ceil(y.shape[0] / batch))
    result = run_epoch(
        model,
        opt,
        X,
        y,
        batch,
        rng,
        lambda loss: check_loss(loss, epoch, cfg),
        augment,
        before_last_step,
        step,
    )
    check_params(model.net, epoch, cfg)  # the last step's update has no loss yet
    return result


def run_epoch(
    model: DataParallel,
    opt: nn.Optimizer,
    X: np.ndarray,
    y: np.ndarray,
    batch: int,
    rng: np.random.Generator,
    check_loss: Callable[[float], None],
    augment: Callable[[np.ndarray, np.random.Generator], np.ndarray] | None = None,
    before_last_step: Callable[[Any], None] | None = None,
    step: TrainingStep | None = None,
) -> tuple[float, float | None]:
    """One pass over (X, y): a gradient step per batch of ``batch`` rows.

    The full batch is the original's gradient descent (no shuffling); mini-batches
    come in the order ``rng`` draws, each ``augment``-ed when given. ``check_loss``
    sees every batch's loss (and raises on a non-finite one); ``before_last_step``, if
    given, sees the parameters just before the epoch's last step. Returns the epoch's mean
    loss and, when it comes for free (full batch, no dropout or batchnorm, class
    labels), the training accuracy before the update.

    X and y are NumPy arrays, or, for a network on a device, arrays already there (the
    training set moved once); host arrays go to the device batch by batch. The order is
    drawn on the host either way, so every device sees the same batches. On a device
    the batches' losses are added up there and ``check_loss`` sees their mean once, at
    the end of the epoch: reading a loss makes the host wait for the device, which
    would otherwise run behind it, a step's kernels queued while the next is prepared.

    Each step is ``step``'s (:class:`~handprop.scale.graphs.TrainingStep`: on a GPU,
    CUDA graphs of its passes when the run's ``graph`` is "auto"); by default the
    model's eager ``train_pass`` and ``opt.step``.
    """
    step = TrainingStep(model, opt) if step is None else step
    n = y.shape[0]
    xp = model.net.xp
    labels = model.net.loss.classifies  # class ids, else real-valued targets
    if batch >= n:
        X, y = on_device(X, xp), on_device(y, xp, labels=labels)
        loss, out = step.train_pass(X, y)
        loss = float(loss)  # on a device: waits for it, once per epoch
        check_loss(loss)
        train_acc = None
        # dropout's masks and batchnorm's batch statistics: not the inference outputs
        layers = model.net.layers
        if labels and not any(isinstance(layer, (nn.Dropout, nn.BatchNorm)) for layer in layers):
            train_acc = model.count_correct(out, y) / n
        if before_last_step is not None:
            before_last_step(model.params)
        step.update()
        return loss, train_acc
    order = rng.permutation(n)
    on_host = backend.is_numpy(xp)
    # rows of data already on the device are gathered there, with the batch's indices
    # moved there; host rows are gathered into a reused buffer (no allocation) and moved
    host_X, host_y = isinstance(X, np.ndarray), isinstance(y, np.ndarray)
    Xb = np.empty((batch, *X.shape[1:]), dtype=X.dtype) if host_X else None
    total = 0.0
    for start in range(0, n, batch):
        idx = order[start : start + batch]
        idx_there = None if host_X and host_y else backend.asarray(idx, xp)
        if host_X:
            xb = Xb[: len(idx)]
            np.take(X, idx, axis=0, out=xb)
        else:
            xb = xp.take(X, idx_there, axis=0)
        if augment is not None:  # on the host, on the batch
            xb = augment(backend.to_host(xb), rng)
        yb = y[idx] if host_y else xp.take(y, idx_there, axis=0)
        if not on_host:
            xb, yb = on_device(xb, xp), on_device(yb, xp, labels=labels)
        loss, _ = step.train_pass(xb, yb)
        if on_host:
            check_loss(loss)  # names the step; a device's losses are read once, below
        if before_last_step is not None and start + batch >= n:
            before_last_step(model.params)
        step.update()
        total = total + loss * len(idx)  # on a device: added up there, no wait per step
    if not on_host:
        total = float(total)
        check_loss(total / n)  # NaN or inf in any batch's loss makes the sum so
    return total / n, None


# -- the divergence guard -----------------------------------------------------------------


def check_loss(loss: float, epoch: int, cfg: RunConfig) -> None:
    if not math.isfinite(loss):
        raise diverged(f"the loss became {loss}", epoch, cfg)


def check_params(net: nn.Network, epoch: int, cfg: RunConfig) -> None:
    """Raise DivergenceError when a parameter is NaN or infinite (one pass over the
    flat vector, once per epoch: a check per mini-batch step would cost a pass per
    step)."""
    xp, params = net.xp, net.params
    if bool(xp.all(xp.isfinite(params))):
        return
    raise diverged(f"the parameters became {nonfinite(params)}", epoch, cfg)


def diverged(what: str, epoch: int, cfg: RunConfig) -> DivergenceError:
    """The error of a run in which ``what`` ("the loss became nan") happened in epoch
    ``epoch``, naming the learning rate (and the weight decay, when there is one) and
    suggesting a tenth of it."""
    lr, decay = cfg.learning_rate, cfg.weight_decay
    rates = f"learning rate {lr:g}" + (f" and weight_decay {decay:g}" if decay else "")
    hint = f"a smaller learning rate (e.g. {lr / 10:g})"
    if decay:
        hint += f" or weight_decay (e.g. {decay / 10:g})"
    return DivergenceError(f"{what} at epoch {epoch} with {rates}; try {hint}", epoch=epoch)


def nonfinite(a: Any) -> str:
    """What is wrong with an array (of any namespace) known not to be all finite:
    "nan" when it holds a NaN, else "inf" or "-inf"."""
    a = backend.to_host(a)
    if np.isnan(a).any():
        return "nan"
    return "inf" if np.isposinf(a).any() else "-inf"


# -- after the last epoch -------------------------------------------------------------------


def recalibrate_batchnorm(net: nn.Network, X: np.ndarray, batch: int) -> None:
    """Re-estimate every batchnorm layer's running mean and variance on X (the clean
    training images), as the exact average of their batch statistics over every batch
    of ``batch`` rows (momentum 1 / k for the k-th batch; PyTorch's momentum=None).

    The running averages of training follow the augmented batches, whose statistics
    differ from clean images' (elastic distortions and rotations most); inference sees
    clean images. Dropout is held off meanwhile, as at inference. Deterministic: the
    other parameters and X alone decide the result (a resumed run gets the same).
    """
    if not any(isinstance(layer, nn.BatchNorm) for layer in net.layers):
        return
    for k, start in enumerate(range(0, len(X), batch)):
        # (issue 28: the pass says it, no layer is written) a training pass without
        # dropout masks, so every unit is kept, in which the batch weighs 1 / (k + 1) in
        # the running averages: the first batch replaces, then averages
        ctx = net.context(training=True, momentum=1.0 / (k + 1))
        # X is on the host: each batch goes to the network's device (NumPy: as is)
        net.forward(backend.asarray(X[start : start + batch], net.xp), ctx=ctx)
