"""The training loop.

``train_run`` turns one validated :class:`~handprop.config.RunConfig` into a run folder
(see ``docs/formats.md``): it loads and splits the data, builds the network, and runs
:func:`run_epoch` until the last epoch, with a live progress bar, a divergence guard,
early stopping (:class:`EarlyStopping`), checkpoints at epoch boundaries (every
``checkpoint_seconds``, and on Ctrl-C or SIGTERM), and the run's files written by a
:class:`~handprop.runfolder.RunWriter`. The run folder is made exclusively and locked
while training (:mod:`handprop.rundir`).

Each batch goes through :class:`~handprop.scale.DataParallel`: over this process's threads,
and, when ``world`` is an MPI communicator's (:mod:`handprop.scale.mpi`), over the
ranks, each rank running this same loop on the same data with the same random draws,
rank 0 alone writing.

On a device (``device = "cuda"``: CuPy; or any array API namespace) the network is
built and initialised on the host and then moved (:meth:`~handprop.nn.Network.to`);
the training set goes to the device once when it fits (:func:`fits_on_device`), else
batch by batch, and always batch by batch when augmentation (which runs on the host)
is on. The batches are drawn on the host by the same generator whatever the device,
and every file is written from host arrays, so a run on a GPU reaches the CPU's
parameters to float rounding, and its model and checkpoints load anywhere.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from handprop import nn
from handprop.config import RunConfig, load_config, to_toml
from handprop.diagnostics import Diagnostics
from handprop.errors import ConfigError, DivergenceError
from handprop.metrics import classification_metrics
from handprop.nn import backend
from handprop.nn.modelfile import model_bytes
from handprop.rundir import (
    FolderLock,
    is_owned,
    make_folder,
    remove_own_files,
    remove_stale_temporaries,
)
from handprop.runfolder import (
    CHECKPOINT_FILE,
    CONFIG_FILE,
    HISTORY_COLUMNS,
    METRICS_FILE,
    MODEL_FILE,
    RESUME_FREE_FIELDS,
    RUN_FILES,
    SPLIT_FILE,
    RunWriter,
    check_unchanged,
    is_complete,
    predictions_csv,
    saved_config,
)
from handprop.scale.parallel import DataParallel, OneProcess, World

#: a checkpoint is written at the first epoch boundary this many seconds after the last
CHECKPOINT_SECONDS = 60.0
#: the training set goes to the device once when it, and the estimate of what training
#: needs besides, take at most this share of the device's free memory
DEVICE_MEMORY_SHARE = 0.9


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
    image_prep: str = "mnist"  # how a picture becomes one of the images (the registry's)


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
    seed = cfg.resolved_split_seed  # not cfg.seed: runs over several seeds share a split
    return original_split(len(dataset.labels), cfg.total, cfg.train, cfg.test, seed)


def carve_validation(cfg: RunConfig, train_idx: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Split ``cfg.validation`` of the training indices off, at random from the split's
    seed (``split_seed``, by default ``seed``)."""
    n_val = round(cfg.validation * len(train_idx))
    if cfg.validation and not 1 <= n_val < len(train_idx):
        raise ConfigError(
            f"validation = {cfg.validation} of {len(train_idx)} training samples leaves "
            f"{n_val} for validation and {len(train_idx) - n_val} for training; both need >= 1"
        )
    order = np.random.default_rng([cfg.resolved_split_seed, 1]).permutation(len(train_idx))
    return np.sort(train_idx[order[n_val:]]), np.sort(train_idx[order[:n_val]])


def load_split(cfg: RunConfig, progress: bool = True) -> Split:
    """Load the config's dataset, split it, and normalize only the samples used."""
    from handprop.data import get_spec, load_dataset, normalize

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
        image_prep=get_spec(cfg.dataset).image_prep,
    )


def build_network(cfg: RunConfig, data: Split) -> nn.Network:
    """The network the config describes, sized for the data, initialised from the seed."""
    meta = {
        "dataset": cfg.dataset,
        "class_names": list(data.class_names),
        "image_shape": list(data.image_shape),
        "pixel_max": data.pixel_max,
        "image_prep": data.image_prep,
    }
    init = "he_uniform" if cfg.init == "pytorch" else cfg.init  # pytorch: redrawn below
    if cfg.layers is not None:
        net = nn.Network.from_layers(
            cfg.layers,
            (1, *data.image_shape),  # grayscale images: one channel
            len(data.class_names),
            loss=cfg.loss,
            init=init,
            dtype=cfg.dtype,
            rng=np.random.default_rng(cfg.seed),
            meta=meta,
        )
    else:
        spec = [data.X_train.shape[1], *cfg.hidden, len(data.class_names)]
        net = nn.Network.from_spec(
            spec,
            activation=list(cfg.activation),
            loss=cfg.loss,
            init=init,
            dtype=cfg.dtype,
            rng=np.random.default_rng(cfg.seed),
            meta=meta,
            dropout=list(cfg.dropout),
        )
    if cfg.init == "pytorch":
        init_like_pytorch(net, np.random.default_rng(cfg.seed))
    return net


def init_like_pytorch(net: nn.Network, rng: np.random.Generator) -> None:
    """PyTorch's default initialisation of Linear and Conv2d, weights AND biases:
    U(-1/sqrt(fan_in), 1/sqrt(fan_in)) (kaiming_uniform with a = sqrt(5) for the
    weights, its bound for the biases). fan_in is d_in for a dense layer, c_in k k for
    a convolution; layers without W and b (batchnorm: gamma 1, beta 0) keep theirs."""
    for layer in net.layers:
        shapes = layer.param_shapes()
        if "W" not in shapes or "b" not in shapes:
            continue
        W, b = layer.W, layer.b
        # Dense stores W (d_in, d_out), Conv2D (c_out, c_in, k, k)
        fan_in = W.shape[0] if W.ndim == 2 else math.prod(W.shape[1:])
        bound = 1.0 / math.sqrt(fan_in)
        W[...] = rng.uniform(-bound, bound, size=W.shape)
        b[...] = rng.uniform(-bound, bound, size=b.shape)


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
    schedule = nn.Schedule(
        cfg.schedule, cfg.epochs, gamma=cfg.gamma, step_size=cfg.step_size, warmup=cfg.warmup
    )
    return nn.OPTIMIZERS[cfg.optimizer](cfg.learning_rate, schedule=schedule, **kwargs)


def split_description(cfg: RunConfig, data: Split) -> dict[str, Any]:
    return {
        "kind": cfg.split,
        "total": cfg.total,
        "train": len(data.y_train),
        "test": len(data.y_test),
        "validation": 0 if data.y_val is None else len(data.y_val),
        "seed": cfg.resolved_split_seed,  # the split's seed, not the initialisation's
    }


# -- the device ---------------------------------------------------------------------------


def device_free_bytes(xp: Any) -> int | None:
    """Free memory, in bytes, of the device namespace ``xp`` computes on; None when
    unknown (a namespace other than CuPy's: array-api-strict in the tests, say)."""
    if backend.device_name(xp) != "cuda":
        return None
    import cupy

    free, _ = cupy.cuda.Device().mem_info
    # blocks CuPy's pool keeps for reuse are free to handprop too, not to the driver
    return int(free) + int(cupy.get_default_memory_pool().free_bytes())


def fits_on_device(nbytes: int, xp: Any, reserve: int = 0) -> bool:
    """Whether ``nbytes`` of data fit on ``xp``'s device beside ``reserve`` bytes that
    training needs there (parameters, optimizer state, work arrays): at most
    :data:`DEVICE_MEMORY_SHARE` of its free memory. True for the host (NumPy: the data
    are there already) and for a namespace whose free memory is unknown."""
    if backend.is_numpy(xp):
        return True
    free = device_free_bytes(xp)
    return free is None or nbytes + reserve <= DEVICE_MEMORY_SHARE * free


def on_device(a: np.ndarray | Any, xp: Any, labels: bool = False) -> Any:
    """``a`` as an array of namespace ``xp``: a host array is copied there (labels as
    int64), an array already there is returned as it is."""
    if not isinstance(a, np.ndarray):
        return a
    return backend.asarray(a, xp, dtype=xp.int64 if labels else None)


# -- one epoch ----------------------------------------------------------------------------


def run_epoch(
    model: DataParallel,
    opt: nn.Optimizer,
    X: np.ndarray,
    y: np.ndarray,
    batch: int,
    rng: np.random.Generator,
    check_loss: Callable[[float], None],
    augment: Callable[[np.ndarray, np.random.Generator], np.ndarray] | None = None,
) -> tuple[float, float | None]:
    """One pass over (X, y): a gradient step per batch of ``batch`` rows.

    The full batch is the original's gradient descent (no shuffling); mini-batches
    come in the order ``rng`` draws, each ``augment``-ed when given. ``check_loss``
    sees every batch's loss (and raises on a non-finite one). Returns the epoch's mean
    loss and, when it comes for free (full batch, no dropout or batchnorm), the
    training accuracy before the update.

    X and y are NumPy arrays, or, for a network on a device, arrays already there (the
    training set moved once); host arrays go to the device batch by batch. The order is
    drawn on the host either way, so every device sees the same batches. On a device
    the batches' losses are added up there and ``check_loss`` sees their mean once, at
    the end of the epoch: reading a loss makes the host wait for the device, which
    would otherwise run behind it, a step's kernels queued while the next is prepared.
    """
    n = y.shape[0]
    xp = model.net.xp
    if batch >= n:
        X, y = on_device(X, xp), on_device(y, xp, labels=True)
        loss, out = model.train_pass(X, y)
        loss = float(loss)  # on a device: waits for it, once per epoch
        check_loss(loss)
        train_acc = None
        # dropout's masks and batchnorm's batch statistics: not the inference outputs
        if not any(isinstance(layer, (nn.Dropout, nn.BatchNorm)) for layer in model.net.layers):
            train_acc = model.count_correct(out, y) / n
        opt.step(model.params, model.grads)
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
            xb, yb = on_device(xb, xp), on_device(yb, xp, labels=True)
        loss, _ = model.train_pass(xb, yb)
        if on_host:
            check_loss(loss)  # names the step; a device's losses are read once, below
        opt.step(model.params, model.grads)
        total = total + loss * len(idx)  # on a device: added up there, no wait per step
    if not on_host:
        total = float(total)
        check_loss(total / n)  # NaN or inf in any batch's loss makes the sum so
    return total / n, None


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


# -- the loop ---------------------------------------------------------------------------


class Trainer:
    """One run: data, network, optimizer, history, and the writer of its folder.

    Each epoch draws its randomness (the mini-batch order, the dropout masks, the
    augmentation) from a generator seeded by (seed, epoch), so that a resumed run, and
    every MPI rank, draws exactly what one uninterrupted process would have.

    ``checkpoint_seconds``: a checkpoint is written at the first epoch boundary at least
    this long after the last one (None: only when interrupted), so that a ``kill -9``,
    an out-of-memory kill or a power cut loses at most that much training.

    ``cfg.device`` is checked first (a GPU asked for and not usable is one
    :class:`~handprop.nn.backend.DeviceError` line, before any data is read or file
    written); the network, built on the host, is then moved there, and ``X_fit`` and
    ``y_fit`` are the training set as :func:`run_epoch` takes it: on the device when it
    fits there, else the host's arrays (``data`` always holds the host's).
    """

    def __init__(
        self,
        cfg: RunConfig,
        run_dir: Path,
        progress: bool = True,
        checkpoint_seconds: float | None = CHECKPOINT_SECONDS,
        world: World | None = None,
    ) -> None:
        self.cfg = cfg
        xp = backend.device_namespace(cfg.device)  # no GPU, no CuPy: refused now
        self.world = world or OneProcess()
        self.progress = progress and self.world.rank == 0
        self.checkpoint_seconds = checkpoint_seconds
        self.data = load_split(cfg, progress=self.progress)
        if self.augmented:  # the settings against the images' size, known from now on
            from handprop.data.augment import check_augment

            check_augment(
                self.data.image_shape,
                cfg.augment_shift,
                cfg.augment_rotate,
                cfg.augment_elastic_alpha,
                cfg.augment_elastic_sigma,
                dataset=cfg.dataset,
            )
        if self.world.size > 1:
            self.check_same_on_every_rank()
        self.net = build_network(cfg, self.data)  # built and initialised on the host
        self.shape_inputs()
        self.net.to(xp)
        self.model = DataParallel(self.net, self.world)
        self.opt = build_optimizer(cfg, self.net)
        # a network, batch or optimizer too large for memory: refused before any file
        n = len(self.data.y_train)
        self.batch = n if cfg.batch_size is None else min(cfg.batch_size, n)
        self.model.check_memory(self.batch, state_vectors=len(self.opt.state_names))
        self.X_fit, self.y_fit = self.place_training_data()
        columns = (
            HISTORY_COLUMNS
            if self.data.y_val is None
            else (*HISTORY_COLUMNS, "val_loss", "val_acc")
        )
        self.writer = RunWriter(run_dir, columns, writes=self.world.rank == 0)
        self.diagnostics = Diagnostics(self.net, self.opt, steps_per_epoch=-(-n // self.batch))
        self.stopping = EarlyStopping(cfg.patience)
        self.history: list[dict[str, Any]] = []
        self.epoch = 0  # epochs completed
        self.seconds = 0.0  # training time so far (evaluation included)
        self._last_checkpoint = time.monotonic()
        self._snapshot: dict[str, np.ndarray] | None = None  # state at the last epoch end
        self._snapshot_epoch = -1  # the epoch count that state belongs to

    @property
    def run_dir(self) -> Path:
        return self.writer.run_dir

    @run_dir.setter
    def run_dir(self, path: Path) -> None:
        self.writer.run_dir = Path(path)

    def check_same_on_every_rank(self) -> None:
        """Refuse, on every rank, a config or data that differ from rank 0's."""
        d = self.data
        fields = sorted(
            (k, v) for k, v in self.cfg.to_dict().items() if k not in RESUME_FREE_FIELDS
        )
        self.world.check_same("config", [repr(fields).encode()])
        self.world.check_same("data", [d.train_idx, d.test_idx, d.X_train, d.y_train])

    @property
    def augmented(self) -> bool:
        cfg = self.cfg
        return bool(cfg.augment_shift or cfg.augment_rotate or cfg.augment_elastic_alpha)

    def place_training_data(self) -> tuple[Any, Any]:
        """The training set as :func:`run_epoch` takes it: moved to the network's device
        once when it fits beside what training needs there, else left on the host
        (moved batch by batch); left on the host too when augmentation, which works on
        host batches, is on."""
        X, y, net = self.data.X_train, self.data.y_train, self.net
        xp = net.xp
        if backend.is_numpy(xp) or self.augmented:
            return X, y
        vectors = 2 + len(self.opt.state_names)  # params, grads, optimizer state
        reserve = (
            vectors * net.n_params * net.dtype.itemsize
            + net.work_bytes(self.batch)  # a training pass's arrays
            + net.work_bytes(net.inference_batch(), training=False)  # an evaluation's
        )
        if not fits_on_device(X.nbytes + y.nbytes, xp, reserve):
            return X, y
        return on_device(X, xp), on_device(y, xp, labels=True)

    def shape_inputs(self) -> None:
        """Give the feature rows the network's input shape ((n, 784) or (n, 1, 28, 28));
        a reshape of a contiguous array is a view, so nothing is copied."""
        d, shape = self.data, self.net.input_shape
        for name in ("X_train", "X_test", "X_val"):
            X = getattr(d, name)
            if X is not None:
                setattr(d, name, X.reshape(len(X), *shape))

    def augment(self, X: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        """A mini-batch with random shifts, rotations and elastic distortions, as the
        config asks."""
        from handprop.data.augment import augment

        cfg = self.cfg
        images = X.reshape(len(X), 1, *self.data.image_shape)
        out = augment(
            images,
            rng,
            cfg.augment_shift,
            cfg.augment_rotate,
            cfg.augment_elastic_alpha,
            cfg.augment_elastic_sigma,
        )
        return out.reshape(X.shape)

    # -- the loop

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
        augment = self.augment if self.augmented else None
        try:
            # overflow on the way to a NaN loss is reported by check_loss, by epoch
            with np.errstate(over="ignore", invalid="ignore"):
                while self.epoch < cfg.epochs and not self.stopping.stopped:
                    epoch = self.epoch + 1
                    self.snapshot()
                    start = time.perf_counter()
                    rng = np.random.default_rng([cfg.seed, epoch])
                    self.net.set_rng(rng)
                    self.opt.set_epoch(epoch)
                    loss, train_acc = run_epoch(
                        self.model,
                        self.opt,
                        self.X_fit,
                        self.y_fit,
                        self.batch,
                        rng,
                        lambda loss, epoch=epoch: self.check_loss(loss, epoch),
                        augment,
                    )
                    self.check_params(epoch)  # the last step's update has no loss yet
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
                        self.writer.history(self.history)  # a long run can be followed
                    bar.set_postfix(progress_fields(row), refresh=False)
                    bar.update(1)
        finally:
            bar.close()
        if self.stopping.best_params is not None:
            # early stopping ends on the best validated parameters, not the last ones
            backend.copyto(self.net.params, backend.asarray(self.stopping.best_params, self.net.xp))
        if cfg.batchnorm_stats == "recalibrate":
            start = time.perf_counter()
            recalibrate_batchnorm(self.net, self.data.X_train, cfg.batch_size or 256)
            self.seconds += time.perf_counter() - start  # part of the training time
            self.check_params(self.epoch)

    # -- the divergence guard
    #
    # Every step's loss, a scalar computed anyway, is checked (check_loss): parameters
    # made NaN or infinite by a step make the next step's loss so. The parameters
    # themselves are checked in one pass at the end of every epoch (check_params; for
    # full-batch gradient descent, after every step), which sees the update of an
    # epoch's last step, whose loss comes only with the next epoch, or never; and the
    # test set's outputs before any result is written (finish), which sees parameters
    # still finite but so large that the forward pass overflows.

    def check_loss(self, loss: float, epoch: int) -> None:
        if not math.isfinite(loss):
            raise self.diverged(f"the loss became {loss}", epoch)

    def check_params(self, epoch: int) -> None:
        """Raise DivergenceError when a parameter is NaN or infinite (one pass over the
        flat vector, once per epoch: a check per mini-batch step would cost a pass per
        step)."""
        xp, params = self.net.xp, self.net.params
        if bool(xp.all(xp.isfinite(params))):
            return
        raise self.diverged(f"the parameters became {nonfinite(params)}", epoch)

    def diverged(self, what: str, epoch: int) -> DivergenceError:
        """The error of a run in which ``what`` ("the loss became nan") happened in
        epoch ``epoch``, naming the learning rate (and the weight decay, when there is
        one) and suggesting a tenth of it."""
        lr, decay = self.cfg.learning_rate, self.cfg.weight_decay
        rates = f"learning rate {lr:g}" + (f" and weight_decay {decay:g}" if decay else "")
        hint = f"a smaller learning rate (e.g. {lr / 10:g})"
        if decay:
            hint += f" or weight_decay (e.g. {decay / 10:g})"
        return DivergenceError(f"{what} at epoch {epoch} with {rates}; try {hint}", epoch=epoch)

    def evaluate(self, row: dict[str, Any], train_acc: float | None) -> None:
        """Accuracies (and validation loss) into ``row``; early-stopping bookkeeping."""
        data, model = self.data, self.model
        if self.writer.writes:  # per-layer norms and unit health: diagnostics.csv
            self.diagnostics.record(row["epoch"], data.X_train, self.run_dir)
            self.writer.diagnostics(self.diagnostics.rows)
        # evaluation reads host arrays: predict_proba moves them batch by batch
        if train_acc is None:
            train_acc = model.accuracy(data.X_train, data.y_train)
        row["train_acc"] = train_acc
        row["test_acc"] = model.accuracy(data.X_test, data.y_test)
        if data.y_val is not None:
            row["val_loss"] = self.loss_value(data.X_val, data.y_val)
            row["val_acc"] = model.accuracy(data.X_val, data.y_val)
            self.stopping.update(row["epoch"], row["val_loss"], backend.to_host(self.net.params))

    def loss_value(self, X: np.ndarray, y: np.ndarray) -> float:
        """The inference loss over the host arrays (X, y): at once on the host; on a
        device, batch by batch (each moved there), weighted by the batches' sizes."""
        xp, n = self.net.xp, len(y)
        if backend.is_numpy(xp):
            return self.model.loss_value(X, y)
        step, total = self.net.inference_batch(), 0.0
        for start in range(0, n, step):
            xb, yb = X[start : start + step], y[start : start + step]
            loss = self.model.loss_value(on_device(xb, xp), on_device(yb, xp, labels=True))
            total += loss * len(yb)
        return total / max(n, 1)

    # -- checkpoints

    def snapshot(self) -> None:
        """Copy the parameters and optimizer state at an epoch boundary.

        Ctrl-C can land in the middle of an epoch, after some of its mini-batch steps;
        the checkpoint must hold the state at the end of the last whole epoch, or the
        resumed run would take those steps twice.
        """
        state = self.host_state()
        if self._snapshot is None or self._snapshot.keys() != state.keys():
            # state vectors appear on the first step: (re)allocate when they do
            self._snapshot = {k: np.array(v, copy=True) for k, v in state.items()}
        else:
            for k, v in state.items():
                np.copyto(self._snapshot[k], v)
        self._snapshot_epoch = self.epoch

    def host_state(self) -> dict[str, np.ndarray]:
        """The parameters and optimizer state as host arrays (NumPy's: the live ones;
        a device's: copies), for snapshots and checkpoints."""
        state = {"params": self.net.params, **self.opt.state_dict()}
        return {k: backend.to_host(v) for k, v in state.items()}

    def checkpoint_due(self) -> bool:
        """Whether the periodic checkpoint is due at this epoch boundary."""
        return (
            self.checkpoint_seconds is not None
            and self.epoch < self.cfg.epochs
            and time.monotonic() - self._last_checkpoint >= self.checkpoint_seconds
        )

    def save_checkpoint(self, live: bool = False) -> None:
        """Write checkpoint.npz: the state at the end of epoch ``self.epoch``.

        ``live``: take the state as it is now (at an epoch boundary) rather than the
        snapshot taken when the current epoch began.
        """
        # at an epoch boundary (Ctrl-C may land between the epoch count going up and the
        # next snapshot) the live state is that epoch's end
        live = live or self._snapshot_epoch != self.epoch
        saved = self.host_state() if live else self._snapshot
        self.writer.checkpoint(
            self.history,
            params=saved["params"],
            epoch=np.array(self.epoch),
            seconds=np.array(self.seconds),
            config=np.array(to_toml(self.cfg)),  # what the saved state was trained with
            **{f"opt_{k}": np.asarray(v) for k, v in saved.items() if k != "params"},
            **self.stopping.state(),
        )
        self._last_checkpoint = time.monotonic()

    def load_checkpoint(self) -> None:
        """Restore the state of checkpoint.npz, refusing one that this run cannot use.

        Raises
        ------
        ConfigError
            The file is truncated or not a checkpoint, holds Python objects, names an
            impossible epoch, or its arrays do not fit the network and optimizer.
        """
        path = self.run_dir / CHECKPOINT_FILE
        try:
            self._restore(self.writer.read_checkpoint())
        except ValueError as exc:
            raise ConfigError(f"{path}: not a usable checkpoint: {exc}") from None
        self.history = self.writer.read_history(self.epoch)

    def _restore(self, ck: dict[str, np.ndarray]) -> None:
        """Check every array of a checkpoint, then load them (ValueError names the first
        that does not fit)."""
        missing = [k for k in ("params", "epoch", "seconds", "best") if k not in ck]
        if missing:
            raise ValueError(f"it has no {missing[0]!r} array")
        params, net = ck["params"], self.net
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
        if epoch > self.cfg.epochs:
            raise ValueError(
                f"it has trained {int(epoch)} epochs already, more than the "
                f"{self.cfg.epochs} asked for"
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
        # NaN or inf in the state would be the resumed run's first step's result
        for name in sorted(k for k in ck if k == "best_params" or k.startswith("opt_")):
            value = ck[name]
            if value.dtype.kind == "f" and not np.isfinite(value).all():
                raise ValueError(f"its {name!r} is not all finite")
        self.opt.load_state_dict(
            {k[4:]: v for k, v in ck.items() if k.startswith("opt_")}, net.params
        )
        # read on the host, then moved to the network's device (NumPy: copied in place)
        backend.copyto(net.params, backend.asarray(params, net.xp))
        self.epoch, self.seconds = int(epoch), float(seconds)
        self.stopping.load(best, best_params)

    # -- results

    def finish(self) -> RunResult:
        """Write model, predictions, history and metrics of a completed run.

        Raises
        ------
        DivergenceError
            The test set's outputs are not all finite (nothing is written then).
        """
        data, net = self.data, self.net
        metrics: dict[str, Any] = {}
        final_loss = self.history[-1]["loss"] if self.history else None
        if self.writer.writes:
            with np.errstate(over="ignore", invalid="ignore"):  # reported just below
                P = self.model.predict_proba(data.X_test)
            if not np.isfinite(P).all():  # finite parameters whose outputs overflow
                raise self.diverged(f"the network's outputs became {nonfinite(P)}", self.epoch)
            metrics = classification_metrics(data.y_test, P.argmax(axis=1), data.class_names)
            metrics.update(self.summary_fields("completed", None, final_loss))
            self.writer.history(self.history)
            self.writer.results(
                model_bytes(net), predictions_csv(data.test_idx, data.y_test, P), metrics
            )
        return RunResult(
            self.run_dir,
            "completed",
            self.epoch,
            metrics.get("accuracy"),
            final_loss,
            self.seconds,
            None,
            metrics,
        )

    def fail(self, status: str, message: str) -> RunResult:
        """Record a run that did not complete (diverged, failed or interrupted): its
        history and metrics.json, and for an interrupted one its checkpoint."""
        final_loss = self.history[-1]["loss"] if self.history else None
        metrics = self.summary_fields(status, message, final_loss)
        if status == "interrupted":
            self.save_checkpoint()
        else:
            self.writer.history(self.history)
        self.writer.metrics(metrics)
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
            "device": self.net.device,
            "dataset": self.cfg.dataset,
            "data_source": self.data.source,
            "split": split_description(self.cfg, self.data),
        }
        if self.world.size > 1:
            fields["ranks"] = self.world.size
        if self.data.y_val is not None:
            fields["early_stopping"] = self.stopping.summary()
        return fields


def nonfinite(a: Any) -> str:
    """What is wrong with an array (of any namespace) known not to be all finite:
    "nan" when it holds a NaN, else "inf" or "-inf"."""
    a = backend.to_host(a)
    if np.isnan(a).any():
        return "nan"
    return "inf" if np.isposinf(a).any() else "-inf"


def progress_fields(row: dict[str, Any]) -> dict[str, str]:
    """The progress bar's loss and accuracies for an epoch's history row."""
    fields = {"loss": f"{row['loss']:.4f}"}
    for key in ("train_acc", "test_acc", "val_acc"):
        if row.get(key) is not None:
            fields[key.removesuffix("_acc")] = f"{row[key]:.4f}"
    return fields


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
    :func:`handprop.rundir.make_or_adopt`); by default a new one is made under
    ``cfg.out``, named ``cfg.name`` or ``default_name`` (``-2``, ``-3``, ... when taken).
    ``world``: the MPI ranks training together (rank 0 makes and writes the folder).

    A diverged run is recorded in its folder and returned with status "diverged"; a
    Ctrl-C (or SIGTERM) is recorded with a checkpoint and re-raised as
    KeyboardInterrupt after the folder is consistent, so :func:`resume_run` can
    continue it; so can a run killed outright, from its last periodic checkpoint.
    """
    world = world or OneProcess()
    if cfg.split_seed is None:  # config.toml records the split's seed, whatever seed becomes
        cfg = cfg.replace(split_seed=cfg.resolved_split_seed)
    # the data and the network are checked (and sized) before any folder is made
    trainer = Trainer(cfg, Path(run_dir or "."), progress, checkpoint_seconds, world)
    if run_dir is None and world.rank == 0:
        run_dir = make_folder(cfg.out, cfg.name or default_name)
    trainer.run_dir = run_dir = Path(_on_every_rank(world, run_dir))
    with _lock(world, run_dir):
        _start(trainer)
        return _run(trainer)


def _on_every_rank(world: World, value: Any) -> Any:
    """Rank 0's ``value``, on every rank."""
    return world.broadcast(value)


def _lock(world: World, run_dir: Path) -> Any:
    """The folder's lock, held by the rank that writes."""
    import contextlib

    return FolderLock(run_dir) if world.rank == 0 else contextlib.nullcontext()


def _start(trainer: Trainer) -> None:
    """The files a run writes before its first epoch: its config and its split."""
    data = trainer.data
    indices = {"train_idx": data.train_idx, "test_idx": data.test_idx}
    if data.val_idx is not None:
        indices["val_idx"] = data.val_idx
    trainer.writer.start(trainer.cfg, indices)


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
        trainer = Trainer(cfg, run_dir, progress, checkpoint_seconds, world)
        if checkpoint.is_file():
            trainer.load_checkpoint()
        elif world.rank == 0:
            # killed before its first checkpoint: nothing to keep but the folder
            remove_own_files(run_dir, RUN_FILES)
        _start(trainer)
        return _run(trainer)


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
    try:
        return trainer.finish()
    except DivergenceError as exc:  # no model of NaNs is ever a run's result
        return trainer.fail("diverged", str(exc))


__all__ = [
    "CHECKPOINT_FILE",
    "CONFIG_FILE",
    "METRICS_FILE",
    "MODEL_FILE",
    "SPLIT_FILE",
    "EarlyStopping",
    "RunResult",
    "Split",
    "Trainer",
    "build_network",
    "is_complete",
    "load_split",
    "resume_run",
    "run_epoch",
    "train_run",
]
