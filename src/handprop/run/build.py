"""The builders of a run: config -> split, network, optimizer (with its schedule), and
the training set placed where the network computes.

:func:`build_run` calls them in order and returns a :class:`Run`, the state that
:func:`handprop.run.fit.fit` trains and the callbacks at epoch ends read. Everything
that can be refused (the device, the data, the augmentation's settings, a network or a
batch too large for memory, MPI ranks that disagree) is refused here, before any file
is written.

On a device (``device = "cuda"``: CuPy; or any array API namespace) the network is
built and initialised on the host and then moved (:meth:`~handprop.nn.Network.to`);
the training set goes to the device once when it fits (:func:`fits_on_device`), else
batch by batch, and always batch by batch when augmentation (which runs on the host)
is on.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from handprop import nn
from handprop.config import RunConfig
from handprop.errors import ConfigError
from handprop.nn import backend
from handprop.run.callbacks import EarlyStopping, WeightAverage
from handprop.run.writer import HISTORY_COLUMNS, RESUME_FREE_FIELDS, RunWriter
from handprop.scale.graphs import TrainingStep
from handprop.scale.parallel import DataParallel, World

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


def build_network(
    cfg: RunConfig, data: Split, loss: str | None = None, meta: dict[str, Any] | None = None
) -> nn.Network:
    """The network the config describes, sized for the data, initialised from the seed.

    One output per name in ``data.class_names``. ``loss``: a loss of ``nn.LOSSES`` in
    place of ``cfg.loss`` (``HandpropRegressor``'s "squared_error", whose real-valued
    targets a run's dataset never has; its outputs are the targets). ``meta``: the
    model file's facts in place of the run's (its dataset, class names, image shape and
    preparation; the estimator's data have no dataset)."""
    if loss is None:  # the config's, with its label smoothing (cross-entropy's alone)
        smoothed = cfg.label_smoothing > 0
        loss = nn.SoftmaxCrossEntropy(cfg.label_smoothing) if smoothed else cfg.loss
    if meta is None:
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
            loss=loss,
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
            loss=loss,
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
        cfg.schedule,
        cfg.epochs,
        gamma=cfg.gamma,
        step_size=cfg.step_size,
        warmup=cfg.warmup,
        peak=cfg.onecycle_peak,
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


# -- the device, and the training set on it -------------------------------------


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


def place_training_data(
    data: Split, net: nn.Network, opt: nn.Optimizer, batch: int, augmented: bool
) -> tuple[Any, Any]:
    """The training set as :func:`~handprop.run.fit.run_epoch` takes it: moved to the
    network's device once when it fits beside what training needs there, else left on
    the host (moved batch by batch); left on the host too when augmentation, which works
    on host batches, is on."""
    X, y, xp = data.X_train, data.y_train, net.xp
    if backend.is_numpy(xp) or augmented:
        return X, y
    vectors = 2 + len(opt.state_names)  # params, grads, optimizer state
    reserve = (
        vectors * net.n_params * net.dtype.itemsize
        + net.work_bytes(batch)  # a training pass's arrays
        + net.work_bytes(net.inference_batch(), training=False)  # an evaluation's
    )
    if not fits_on_device(X.nbytes + y.nbytes, xp, reserve):
        return X, y
    return on_device(X, xp), on_device(y, xp, labels=True)


# -- the run ------------------------------------------------------------------------------


@dataclass
class Run:
    """One run's state: what the builders made, and how far training has got.

    How far is written by the run's own methods alone: :func:`~handprop.run.fit.fit`
    opens each epoch's history row (``row``, :meth:`begin_epoch`), adds its time
    (:meth:`add_seconds`) and closes it into ``history`` (:meth:`end_epoch`); the
    callbacks read the run and :meth:`record` values into the row; a checkpoint's
    state comes back with :meth:`resume_from`.

    ``X_fit``, ``y_fit``: the training set as :func:`~handprop.run.fit.run_epoch` takes
    it (on the device when it fits there, else the host's arrays; ``data`` always holds
    the host's).
    """

    cfg: RunConfig
    world: World
    data: Split
    net: nn.Network
    model: DataParallel
    opt: nn.Optimizer
    batch: int  # rows per step (the training set's size for gradient descent)
    X_fit: Any
    y_fit: Any
    augment: Callable[[np.ndarray, np.random.Generator], np.ndarray] | None
    writer: RunWriter
    stopping: EarlyStopping
    average: WeightAverage  # the averaged parameters (cfg.average_from)
    progress: bool  # a progress bar (rank 0 only)
    epoch: int = 0  # epochs completed
    seconds: float = 0.0  # training time so far (evaluation included)
    history: list[dict[str, Any]] = field(default_factory=list)
    row: dict[str, Any] = field(default_factory=dict)  # the epoch's history row
    train_acc: float | None = None  # the epoch's, when it came for free
    evaluated: bool = False  # whether this epoch is evaluated
    # given the parameters just before each epoch's last step (the diagnostics')
    before_last_step: Callable[[Any], None] | None = None
    # each batch's passes and update: CUDA graphs of the passes on a GPU (cfg.graph)
    step: TrainingStep | None = None

    @property
    def run_dir(self) -> Path:
        return self.writer.run_dir

    def begin_epoch(
        self, epoch: int, loss: float, train_acc: float | None, evaluated: bool
    ) -> None:
        """Epoch ``epoch`` is trained, with mean loss ``loss``: a new row for it."""
        self.row = {"epoch": epoch, "loss": loss}
        self.train_acc, self.evaluated = train_acc, evaluated

    def record(self, **values: Any) -> None:
        """Values of the epoch's row: accuracies, the validation part's loss, ..."""
        self.row.update(values)

    def add_seconds(self, seconds: float) -> None:
        """Training time, into the total."""
        self.seconds += seconds

    def end_epoch(self) -> None:
        """The epoch's row joins the history; the epoch counts as completed."""
        self.history.append(self.row)
        self.epoch = self.row["epoch"]

    def resume_from(self, epoch: int, seconds: float) -> None:
        """A checkpoint's count of epochs and seconds, and the run folder's history of
        those epochs."""
        self.epoch, self.seconds = epoch, seconds
        self.history = self.writer.read_history(epoch)

    def watch_last_step(self, before_last_step: Callable[[Any], None]) -> None:
        """Have ``before_last_step`` see the parameters just before each epoch's last
        step (the diagnostics' update ratio)."""
        self.before_last_step = before_last_step


def build_run(cfg: RunConfig, place: Callable[[], Path], progress: bool, world: World) -> Run:
    """Config -> split, network, optimizer; checked and sized before any file is written.

    ``cfg.device`` is checked first (a GPU asked for and not usable is one
    :class:`~handprop.nn.backend.DeviceError` line, before any data is read).
    ``place()`` gives the run folder, asked once all is checked: a new folder is made
    only for a run that can start.
    """
    xp = backend.device_namespace(cfg.device)  # no GPU, no CuPy: refused now
    progress = progress and world.rank == 0
    data = load_split(cfg, progress=progress)
    augment = make_augment(cfg, data.image_shape)  # its settings checked against the images
    if world.size > 1:
        check_same_on_every_rank(cfg, data, world)
    net = build_network(cfg, data)  # built and initialised on the host
    shape_inputs(data, net.input_shape)
    net.to(xp)
    model = DataParallel(net, world)
    opt = build_optimizer(cfg, net)
    # a network, batch or optimizer too large for memory: refused before any file
    n = len(data.y_train)
    batch = n if cfg.batch_size is None else min(cfg.batch_size, n)
    model.check_memory(batch, state_vectors=len(opt.state_names))
    X_fit, y_fit = place_training_data(data, net, opt, batch, augment is not None)
    model.prepare(batch, X_fit)  # a CNN's worker processes start here, not in its first step
    columns = HISTORY_COLUMNS if data.y_val is None else (*HISTORY_COLUMNS, "val_loss", "val_acc")
    writer = RunWriter(place(), columns, writes=world.rank == 0)
    return Run(
        cfg,
        world,
        data,
        net,
        model,
        opt,
        batch,
        X_fit,
        y_fit,
        augment,
        writer,
        EarlyStopping(cfg.patience),
        WeightAverage(cfg.average_from),
        progress,
        step=TrainingStep(model, opt, cfg.graph),
    )


def check_same_on_every_rank(cfg: RunConfig, data: Split, world: World) -> None:
    """Refuse, on every rank, a config or data that differ from rank 0's."""
    fields = sorted((k, v) for k, v in cfg.to_dict().items() if k not in RESUME_FREE_FIELDS)
    world.check_same("config", [repr(fields).encode()])
    world.check_same("data", [data.train_idx, data.test_idx, data.X_train, data.y_train])


def shape_inputs(data: Split, shape: tuple[int, ...]) -> None:
    """Give the feature rows the network's input shape ((n, 784) or (n, 1, 28, 28));
    a reshape of a contiguous array is a view, so nothing is copied."""
    for name in ("X_train", "X_test", "X_val"):
        X = getattr(data, name)
        if X is not None:
            setattr(data, name, X.reshape(len(X), *shape))


def make_augment(
    cfg: RunConfig, image_shape: tuple[int, ...]
) -> Callable[[np.ndarray, np.random.Generator], np.ndarray] | None:
    """The mini-batch augmentation the config asks for (random shifts, rotations, changes
    of size and elastic distortions), its settings checked against the images' size;
    None for none."""
    if not cfg.augments:
        return None
    from handprop.data.augment import augment, check_augment

    settings = {
        "max_shift": cfg.augment_shift,
        "max_degrees": cfg.augment_rotate,
        "max_scale": cfg.augment_scale,
        "elastic_alpha": cfg.augment_elastic_alpha,
        "elastic_sigma": cfg.augment_elastic_sigma,
    }
    check_augment(image_shape, **settings, dataset=cfg.dataset)

    def augment_batch(X: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        images = X.reshape(len(X), 1, *image_shape)
        return augment(images, rng, **settings).reshape(X.shape)

    return augment_batch
