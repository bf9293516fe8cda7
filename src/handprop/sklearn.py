"""handprop as scikit-learn estimators: :class:`HandpropClassifier`, :class:`HandpropRegressor`.

The same engine as ``handprop train``: the estimator's parameters become one
:class:`~handprop.config.RunConfig` (validated there, once, in ``fit``), the network,
optimizer and augmentation come from :mod:`handprop.run.build`'s builders, and each
epoch is :func:`handprop.run.fit.train_epoch`, as in :func:`handprop.run.fit.fit`. So
one ``fit`` on a run's training set, with its config and seed, gives the run's
parameters bit for bit (``tests/test_sklearn.py``).

The two estimators differ only in their targets. The classifier maps labels of any kind
to 0..k-1 through ``np.unique`` (``classes_``) under softmax cross-entropy; the
regressor takes real values, y of shape (n,) or (n, t), under squared error on linear
outputs (:class:`handprop.nn.losses.SquaredError`), and predicts in y's shape.

scikit-learn's conventions: parameters stored as given in ``__init__``, validated in
``fit``; input checked by :func:`sklearn.utils.validation.validate_data` (its messages
for NaN, wrong shapes, sparse input). ``warm_start`` continues the current network, its
optimizer's state and its epoch count (epoch e draws from the generator of (seed, e)):
two fits of k epochs give the parameters of one fit of 2k. ``threads`` holds
handprop's threads and BLAS's to that many during ``fit`` and ``predict``, and restores
them after; None leaves them as they are, but for 1 each inside a joblib worker
(``GridSearchCV(n_jobs=2)``), whose siblings share the cores (:func:`limit_threads`,
:func:`in_joblib_worker`; BLAS's only in a process's main thread, as loky's workers run).

Defaults differ from the command line's (the original's full-batch gradient descent
with sigmoid units): they are :class:`sklearn.neural_network.MLPClassifier`'s
(ReLU, Adam at 0.001, mini-batches of 200), which a notebook user expects.
"""

from __future__ import annotations

import contextlib
import math
import threading
from collections.abc import Callable, Iterator
from typing import Any, ClassVar

import numpy as np
from joblib.parallel import get_active_backend
from sklearn.base import BaseEstimator, ClassifierMixin, RegressorMixin
from sklearn.metrics import r2_score
from sklearn.utils import check_random_state
from sklearn.utils.multiclass import check_classification_targets
from sklearn.utils.validation import check_is_fitted, validate_data
from threadpoolctl import threadpool_info, threadpool_limits

from handprop import nn
from handprop.config import RunConfig
from handprop.errors import ConfigError
from handprop.nn import backend
from handprop.run.build import (
    Split,
    build_network,
    build_optimizer,
    carve_validation,
    make_augment,
    on_device,
)
from handprop.run.callbacks import EarlyStopping
from handprop.run.fit import train_epoch
from handprop.scale.parallel import DataParallel

__all__ = ["HandpropClassifier", "HandpropEstimator", "HandpropRegressor", "limit_threads"]


class HandpropEstimator(BaseEstimator):
    """What :class:`HandpropClassifier` and :class:`HandpropRegressor` share: the
    parameters, the input, the network's training. A subclass names its loss and
    encodes its targets.

    Parameters
    ----------
    hidden_layer_sizes : int or tuple of int       hidden units per dense layer
    layers : list of str or None     handprop layer items ("conv 8 3", "relu", "maxpool
        2", ...) for a CNN (replaces ``hidden_layer_sizes``; the output layer is appended)
    image_shape : tuple (h, w) or None   the images' shape when X is flat; X of shape
        (n, h, w) or (n, 1, h, w) gives it
    activation : str or tuple of str   "relu", "sigmoid", "tanh", "identity"
    optimizer : str    "gd", "sgd", "momentum", "nesterov", "adam", "rmsprop"
    learning_rate : float > 0
    schedule : str     the learning-rate schedule ("constant", "step", "cosine", ...)
    batch_size : int or None   rows per step; None: the full batch
    epochs : int >= 1  passes over the training set in ``fit``
    dropout : float or tuple of float   per hidden layer
    weight_decay : float >= 0   L2 decay of the weights (biases spared)
    early_stopping : bool   hold ``validation_fraction`` of the training set out and keep
        the parameters of the lowest validation loss, stopping after ``n_iter_no_change``
        epochs without a lower one
    warm_start : bool   ``fit`` continues the current network (its parameters, the
        optimizer's state, the epoch count) when the parameters and data build the same
        one (features, dtype, architecture, classes, device); else it starts a new one.
        The schedule then spans ``n_iter_ + epochs`` epochs: fits of k and k epochs give
        one fit of 2k's parameters for the schedules that ignore the span (constant,
        step, exponential, warm-up), not for cosine or onecycle.
    augment_shift, augment_rotate, augment_scale, augment_elastic_alpha, augment_elastic_sigma :
        the command line's random shifts (pixels), rotations (degrees), changes of size
        (a fraction) and elastic distortions of each mini-batch of images (needs
        ``batch_size`` and images: X of shape (n, h, w), or ``image_shape``)
    init : str         the weights' initialisation ("glorot_uniform", as MLPClassifier;
        "uniform", the original's; "he_normal", ...)
    random_state : int, RandomState or None    the run's seed
    threads : int >= 1 or None   handprop's and BLAS's threads in fit and predict (None:
        as they are; 1 each in a joblib worker; see :func:`limit_threads`)
    device : str       "cpu" or "cuda"
    """

    #: the network's loss (a name in ``nn.LOSSES``)
    _loss = ""
    #: validate_data's options for y
    _y_checks: ClassVar[dict[str, Any]] = {}

    def __init__(
        self,
        hidden_layer_sizes: int | tuple[int, ...] = (100,),
        *,
        layers: list[str] | tuple[str, ...] | None = None,
        image_shape: tuple[int, int] | None = None,
        activation: str | tuple[str, ...] = "relu",
        optimizer: str = "adam",
        learning_rate: float = 0.001,
        schedule: str = "constant",
        batch_size: int | None = 200,
        epochs: int = 200,
        dropout: float | tuple[float, ...] = 0.0,
        weight_decay: float = 0.0,
        early_stopping: bool = False,
        validation_fraction: float = 0.1,
        n_iter_no_change: int = 10,
        warm_start: bool = False,
        augment_shift: int = 0,
        augment_rotate: float = 0.0,
        augment_scale: float = 0.0,
        augment_elastic_alpha: float = 0.0,
        augment_elastic_sigma: float = 4.0,
        init: str = "glorot_uniform",
        random_state: int | np.random.RandomState | None = None,
        threads: int | None = None,
        device: str = "cpu",
    ) -> None:
        self.hidden_layer_sizes = hidden_layer_sizes
        self.layers = layers
        self.image_shape = image_shape
        self.activation = activation
        self.optimizer = optimizer
        self.learning_rate = learning_rate
        self.schedule = schedule
        self.batch_size = batch_size
        self.epochs = epochs
        self.dropout = dropout
        self.weight_decay = weight_decay
        self.early_stopping = early_stopping
        self.validation_fraction = validation_fraction
        self.n_iter_no_change = n_iter_no_change
        self.warm_start = warm_start
        self.augment_shift = augment_shift
        self.augment_rotate = augment_rotate
        self.augment_scale = augment_scale
        self.augment_elastic_alpha = augment_elastic_alpha
        self.augment_elastic_sigma = augment_elastic_sigma
        self.init = init
        self.random_state = random_state
        self.threads = threads
        self.device = device

    def __sklearn_tags__(self) -> Any:
        tags = super().__sklearn_tags__()
        tags.input_tags.three_d_array = self.layers is not None or self.image_shape is not None
        tags.non_deterministic = self.random_state is None
        return tags

    # -- the parameters, as a run's config ----------------------------------------------

    def _config(self, dtype: np.dtype) -> RunConfig:
        """The estimator's parameters as a RunConfig: validated there, with its messages
        (ConfigError: made a ValueError, scikit-learn's type for a bad parameter, by
        :meth:`_errors`). Private: its ``loss`` is a run's, where the network is built
        with the estimator's own (``_loss``)."""
        rs = self.random_state
        seed = rs if isinstance(rs, int | np.integer) and rs >= 0 else None
        if seed is None:  # None or a RandomState: one seed drawn from it
            seed = int(check_random_state(rs).randint(np.iinfo(np.int32).max))
        hidden = self.hidden_layer_sizes
        hidden = (hidden,) if isinstance(hidden, int | np.integer) else tuple(hidden)
        return RunConfig(
            dataset="X",  # the augmentation's messages name "the 8x8 images of X"
            hidden=hidden,
            layers=None if self.layers is None else tuple(self.layers),
            activation=self.activation,
            optimizer=self.optimizer,
            learning_rate=self.learning_rate,
            schedule=self.schedule,
            batch_size=self.batch_size,
            epochs=self.epochs,
            dropout=self.dropout,
            weight_decay=self.weight_decay,
            validation=self.validation_fraction if self.early_stopping else 0.0,
            patience=self.n_iter_no_change if self.early_stopping else None,
            augment_shift=self.augment_shift,
            augment_rotate=self.augment_rotate,
            augment_scale=self.augment_scale,
            augment_elastic_alpha=self.augment_elastic_alpha,
            augment_elastic_sigma=self.augment_elastic_sigma,
            init=self.init,
            seed=int(seed),
            dtype=np.dtype(dtype).name,
            device=self.device,
            eval_every=1,
            split="standard",  # no split made here: the data are the caller's
        )

    @contextlib.contextmanager
    def _errors(self) -> Iterator[None]:
        """A ConfigError (the config's, the augmentation's, the validation part's) as
        a ValueError naming the estimator."""
        try:
            yield
        except ConfigError as e:
            raise ValueError(f"{type(self).__name__}: {e}") from e

    def _thread_count(self) -> int | None:
        """The threads of fit and predict: ``threads``, else 1 in a joblib worker, else
        None (as they are)."""
        n = self.threads
        if n is None:
            return 1 if in_joblib_worker() else None
        if isinstance(n, bool) or not isinstance(n, int | np.integer) or n < 1:
            raise ValueError(f"threads must be an integer >= 1 or None, got {n!r}")
        return int(n)

    # -- input ----------------------------------------------------------------------------

    def _validate(
        self, X: Any, y: Any = "no_validation", reset: bool = True
    ) -> tuple[np.ndarray, Any, tuple[int, int] | None]:
        """X (and y) through scikit-learn's checks: X as float32 (kept) or float64.

        Images (n, h, w) or (n, 1, h, w) are flattened first (``n_features_in_`` is
        h w, whichever shape comes). Returns X, y (None without one) and the images'
        (h, w), or None for flat X."""
        if isinstance(X, list | tuple):
            X = np.asarray(X)
        shape, images = tuple(getattr(X, "shape", ())), None
        if len(shape) > 2:
            if len(shape) > 4 or (len(shape) == 4 and shape[1] != 1):
                raise ValueError(
                    "images must be (n, h, w) or (n, 1, h, w) (one channel), "
                    f"got X of shape {shape}"
                )
            images = tuple(shape[-2:])
            X = np.asarray(X).reshape(shape[0], -1)
        dtype = [np.float64, np.float32]
        if isinstance(y, str) and y == "no_validation":
            return validate_data(self, X, dtype=dtype, reset=reset), None, images
        X, y = validate_data(self, X, y, dtype=dtype, reset=reset, **self._y_checks)
        return X, y, images

    def _image_hw(self, X: np.ndarray, images: tuple[int, int] | None) -> tuple[int, int] | None:
        """The images' (h, w): X's own, else ``image_shape`` (checked against the
        features); None for data that are no images."""
        hw = images or self.image_shape
        if hw is None:
            return None
        hw = tuple(int(s) for s in hw)
        if len(hw) != 2 or math.prod(hw) != X.shape[1]:
            raise ValueError(f"image_shape {hw} does not hold {X.shape[1]} features")
        return hw

    def _shaped(self, X: np.ndarray) -> np.ndarray:
        return np.ascontiguousarray(X).reshape(len(X), *self.network_.input_shape)

    # -- what a subclass defines ------------------------------------------------------------

    def _targets(self, y: np.ndarray) -> Any:
        """What the outputs are, from y: the classes, or the targets' shape."""
        raise NotImplementedError

    def _output_names(self, targets: Any) -> tuple[str, ...]:
        """One name per network output."""
        raise NotImplementedError

    def _set_targets(self, targets: Any) -> None:
        """Keep ``targets`` as fitted attributes (``classes_``, ``n_outputs_``)."""
        raise NotImplementedError

    def _same_targets(self, targets: Any) -> bool:
        """Whether the current network's outputs mean ``targets`` (warm start)."""
        return True

    def _encode(self, y: np.ndarray) -> np.ndarray:
        """y as the loss takes it."""
        raise NotImplementedError

    def _score_part(self, X: np.ndarray, Y: np.ndarray) -> float:
        """The validation part's score (early stopping): accuracy, or R^2."""
        raise NotImplementedError

    # -- training ---------------------------------------------------------------------------

    def fit(self, X: Any, y: Any) -> HandpropEstimator:
        """Train on (X, y) for ``epochs`` epochs (or until early stopping): a new
        network, or with ``warm_start`` the current one, continued."""
        X, y, images = self._validate(X, y)
        with limit_threads(self._thread_count()), self._errors():
            self._start(X, self._targets(y), images, warm=self.warm_start)
            self._train(X, self._encode(y), self._cfg.epochs)
        return self

    def _partial_fit(self, X: Any, y: Any, targets: Callable[[np.ndarray], Any]) -> None:
        """One epoch on (X, y); the first call builds the network for ``targets(y)``."""
        first = not hasattr(self, "network_")
        X, y, images = self._validate(X, y, reset=first)
        with limit_threads(self._thread_count()), self._errors():
            if first:
                self._start(X, targets(y), images)
            self._train(X, self._encode(y), 1, keep_workers=True)

    def _start(
        self, X: np.ndarray, targets: Any, images: tuple[int, int] | None, warm: bool = False
    ) -> None:
        """Config, network, optimizer: what one run's builders make. With ``warm``, the
        current network and its optimizer's state are kept when the builders would make
        the same network (training then continues its epoch count)."""
        cfg = self._config(X.dtype)
        xp = backend.device_namespace(cfg.device)
        hw = self._image_hw(X, images)
        if self.layers is not None and hw is None:
            raise ValueError(
                "layers (a CNN) needs images: X of shape (n, h, w) or (n, 1, h, w), "
                f"or flat X with image_shape; got X of shape {X.shape}"
            )
        if hw is None and cfg.augments:
            raise ValueError(
                "augmentation needs images: X of shape (n, h, w) or (n, 1, h, w), or flat "
                f"X with image_shape; got X of shape {X.shape}"
            )
        # the builders read the split's output names, image shape and feature count
        data = Split(
            X_train=X,
            y_train=np.empty(0, np.int64),
            X_test=X[:0],
            y_test=np.empty(0, np.int64),
            train_idx=np.empty(0, np.int64),
            test_idx=np.empty(0, np.int64),
            class_names=self._output_names(targets),
            image_shape=(X.shape[1],) if self.layers is None else hw,
            pixel_max=1.0,
            source="fit",
        )
        # the model file's facts: no dataset, and image_shape only for images
        meta: dict[str, Any] = {"pixel_max": 1.0}
        if nn.LOSSES[self._loss].classifies:
            meta["class_names"] = list(data.class_names)
        if hw is not None:
            meta["image_shape"] = list(hw)
        net = build_network(cfg, data, loss=self._loss, meta=meta)
        keep = (
            warm
            and hasattr(self, "network_")
            and cfg.device == self._cfg.device
            and self._same_targets(targets)
            and same_network(net, self.network_)
        )
        if keep:
            net, state = self.network_, self.optimizer_
            self._horizon = self.n_iter_ + cfg.epochs  # the schedule's epochs
        else:
            net.to(xp)
            if hasattr(self, "_model"):  # partial_fit's workers, if any, end here
                self._model.close()
            self._model, state = DataParallel(net), None
            self._horizon = cfg.epochs
            self.n_iter_, self.loss_curve_ = 0, []
        self._cfg, self.network_ = cfg, net
        self._set_targets(targets)
        self.optimizer_ = self._optimizer()
        if state is not None and state.kind == self.optimizer_.kind:
            self.optimizer_.load_state_dict(state.state_dict(), net.params)
        self._stopping = EarlyStopping(cfg.patience)
        if cfg.validation:
            self.best_loss_ = None
            if not keep or self.validation_scores_ is None:
                self.validation_scores_, self.best_validation_score_ = [], -math.inf
        else:
            self.best_loss_ = min(self.loss_curve_, default=math.inf)
            self.validation_scores_ = self.best_validation_score_ = None

    def _optimizer(self) -> nn.Optimizer:
        """The config's optimizer, its schedule over ``_horizon`` epochs."""
        cfg = self._cfg
        if self._horizon != cfg.epochs:
            cfg = cfg.replace(epochs=self._horizon)
        return build_optimizer(cfg, self.network_)

    def _train(self, X: np.ndarray, Y: np.ndarray, epochs: int, keep_workers: bool = False) -> None:
        """``epochs`` more epochs, as :func:`handprop.run.fit.fit` runs them.
        ``keep_workers``: for ``partial_fit``, which is called again (see
        :func:`_workers_kept`)."""
        cfg, net, opt, model = self._cfg, self.network_, self.optimizer_, self._model
        self.n_threads_ = {"handprop": nn.get_threads(), "blas": blas_threads()}
        X = self._shaped(X)
        hw = net.meta.get("image_shape")
        augment = None if hw is None else make_augment(cfg, tuple(hw))
        X_val = Y_val = None
        if cfg.validation:  # the CLI's carving of the validation part
            fit_idx, val_idx = carve_validation(cfg, np.arange(len(Y)))
            X, Y, X_val, Y_val = X[fit_idx], Y[fit_idx], X[val_idx], Y[val_idx]
        batch = len(Y) if cfg.batch_size is None else min(cfg.batch_size, len(Y))
        model.check_memory(batch, state_vectors=len(opt.state_names))  # as build_run does
        with _workers_kept(model, keep_workers), np.errstate(over="ignore", invalid="ignore"):
            for _ in range(epochs):
                if self._stopping.stopped:
                    break
                epoch = self.n_iter_ + 1
                loss, _ = train_epoch(model, opt, X, Y, batch, epoch, cfg, augment)
                self.n_iter_ = epoch
                self.loss_curve_.append(float(loss))
                if X_val is None:
                    self.best_loss_ = min(self.best_loss_, float(loss))
                    continue
                val_loss = model.loss_value(
                    backend.asarray(X_val, net.xp),
                    on_device(Y_val, net.xp, labels=net.loss.classifies),
                )
                score = self._score_part(X_val, Y_val)
                self.validation_scores_.append(score)
                self.best_validation_score_ = max(self.best_validation_score_, score)
                self._stopping.update(epoch, val_loss, backend.to_host(net.params))
        if self._stopping.best_params is not None:
            backend.copyto(net.params, backend.asarray(self._stopping.best_params, net.xp))

    # -- prediction -------------------------------------------------------------------------

    def _outputs(self, X: Any) -> np.ndarray:
        """The network's outputs (n, k) for X (the loss's probabilities: for squared
        error, the outputs themselves)."""
        check_is_fitted(self, "network_")
        X, _, _ = self._validate(X, reset=False)
        X = self._shaped(X.astype(self.network_.dtype, copy=False))
        with limit_threads(self._thread_count()):
            return self._model.predict_proba(X)

    # -- pickle (scikit-learn's convention; handprop's model files stay pickle-free) ----

    def __getstate__(self) -> dict[str, Any]:
        """The network as its architecture and host parameters, the optimizer as its
        state: a network holds its array namespace (a module), which pickle refuses."""
        state = self.__dict__.copy()
        state.pop("_model", None)  # its threads and worker processes: made anew on loading
        if "network_" in state:
            net = state.pop("network_")
            state["_network"] = (net.architecture(), backend.to_host(net.params))
            state["_optimizer"] = state.pop("optimizer_").state_dict()
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        network, optimizer = state.pop("_network", None), state.pop("_optimizer", None)
        self.__dict__.update(state)
        if network is None:
            return
        arch, params = network
        net = nn.Network.from_architecture(arch)
        net.params[...] = params
        net.to(backend.device_namespace(self._cfg.device))
        self.network_ = net
        self.optimizer_ = self._optimizer()
        self.optimizer_.load_state_dict(optimizer, net.params)
        self._model = DataParallel(net)


class HandpropClassifier(ClassifierMixin, HandpropEstimator):
    """A handprop network trained by ``fit(X, y)`` on class labels of any kind, under
    softmax cross-entropy. Parameters: :class:`HandpropEstimator`'s.

    Attributes
    ----------
    classes_ : ndarray of shape (k,)     the labels, sorted; column j of predict_proba
    n_features_in_, feature_names_in_ : as in scikit-learn
    network_ : handprop.nn.Network
    n_iter_ : int        epochs trained
    loss_curve_ : list of float   each epoch's mean training loss
    best_loss_ : float   the lowest of ``loss_curve_`` (None with early stopping)
    validation_scores_ : list of float   validation accuracies (None without early stopping)
    best_validation_score_ : float   (None without early stopping)
    n_threads_ : dict    {"handprop": ..., "blas": ...}: the threads the last fit ran on
    """

    _loss = "cross_entropy"

    def partial_fit(self, X: Any, y: Any, classes: Any = None) -> HandpropClassifier:
        """One epoch on (X, y); the first call builds the network for ``classes``."""

        def targets(y: np.ndarray) -> np.ndarray:
            if classes is None:
                raise ValueError("classes must be passed on the first call to partial_fit")
            return self._targets(np.asarray(classes))

        self._partial_fit(X, y, targets)
        return self

    def _targets(self, y: np.ndarray) -> np.ndarray:
        check_classification_targets(y)
        classes = np.unique(y)
        if len(classes) < 2:
            raise ValueError(
                f"{type(self).__name__} needs at least 2 classes in y, got 1 class: {classes}"
            )
        return classes

    def _output_names(self, classes: np.ndarray) -> tuple[str, ...]:
        return tuple(str(c) for c in classes)

    def _set_targets(self, classes: np.ndarray) -> None:
        self.classes_ = classes

    def _same_targets(self, classes: np.ndarray) -> bool:
        return np.array_equal(classes, self.classes_)

    def _encode(self, y: np.ndarray) -> np.ndarray:
        check_classification_targets(y)
        ids = np.searchsorted(self.classes_, y)
        ids = np.minimum(ids, len(self.classes_) - 1)
        unknown = self.classes_[ids] != y
        if unknown.any():
            raise ValueError(
                f"y holds labels not in classes_ {self.classes_.tolist()}: "
                f"{np.unique(y[unknown]).tolist()[:5]}"
            )
        return ids.astype(np.int64)

    def _score_part(self, X: np.ndarray, y: np.ndarray) -> float:
        return self._model.accuracy(X, y)

    def predict_proba(self, X: Any) -> np.ndarray:
        """Class probabilities (n, k), columns in the order of ``classes_``."""
        return self._outputs(X)

    def predict_log_proba(self, X: Any) -> np.ndarray:
        with np.errstate(divide="ignore"):
            return np.log(self.predict_proba(X))

    def predict(self, X: Any) -> np.ndarray:
        """The most probable label of each row."""
        P = self.predict_proba(X)  # checks that the estimator is fitted
        return self.classes_[P.argmax(axis=1)]


class HandpropRegressor(RegressorMixin, HandpropEstimator):
    """A handprop network trained by ``fit(X, y)`` on real-valued targets y of shape
    (n,) or (n, t): linear outputs under squared error,
    L = 1/(2n) sum_i sum_k (out_ik - y_ik)^2. Parameters: :class:`HandpropEstimator`'s.

    Attributes
    ----------
    n_outputs_ : int     t, the targets per row
    n_features_in_, feature_names_in_ : as in scikit-learn
    network_ : handprop.nn.Network
    n_iter_, loss_curve_, best_loss_, n_threads_ : as :class:`HandpropClassifier`'s
    validation_scores_ : list of float   validation R^2 (None without early stopping)
    best_validation_score_ : float   (None without early stopping)
    """

    _loss = "squared_error"
    _y_checks: ClassVar[dict[str, Any]] = {"multi_output": True, "y_numeric": True}

    def __sklearn_tags__(self) -> Any:
        tags = super().__sklearn_tags__()
        tags.target_tags.multi_output = True
        return tags

    def partial_fit(self, X: Any, y: Any) -> HandpropRegressor:
        """One epoch on (X, y); the first call builds the network."""
        self._partial_fit(X, y, self._targets)
        return self

    def _targets(self, y: np.ndarray) -> tuple[int, ...]:
        return tuple(y.shape[1:])  # () for y (n,), (t,) for (n, t)

    def _output_names(self, shape: tuple[int, ...]) -> tuple[str, ...]:
        return tuple(str(j) for j in range(math.prod(shape)))

    def _set_targets(self, shape: tuple[int, ...]) -> None:
        self.n_outputs_, self._y_shape = math.prod(shape), shape

    def _encode(self, y: np.ndarray) -> np.ndarray:
        Y = np.asarray(y, dtype=self.network_.dtype).reshape(len(y), -1)  # (n, t)
        if Y.shape[1] != self.n_outputs_:
            raise ValueError(
                f"y has {Y.shape[1]} targets per row, the fitted network {self.n_outputs_}"
            )
        return Y

    def _score_part(self, X: np.ndarray, Y: np.ndarray) -> float:
        return float(r2_score(Y, self._model.predict_proba(X)))

    def predict(self, X: Any) -> np.ndarray:
        """The targets' estimates, (n,) or (n, t) as y was in ``fit``."""
        out = self._outputs(X)
        return out.reshape(len(out), *self._y_shape)


@contextlib.contextmanager
def _workers_kept(model: DataParallel, kept: bool) -> Iterator[None]:
    """The model's worker processes, if any, end with the training (``fit``: the next
    fit starts them again), or, when ``kept`` (``partial_fit``), only if the training
    fails: the next call steps on the same ones, and they end with the estimator."""
    try:
        yield
    except BaseException:
        model.close()  # a step cut short: no worker is left halfway through it
        raise
    if not kept:
        model.close()


# -- threads ----------------------------------------------------------------------------


def in_joblib_worker() -> bool:
    """Whether this thread runs a task of joblib's ``Parallel`` with n_jobs > 1, in a
    loky worker process or a thread of the pool (GridSearchCV, cross_val_score):
    joblib runs each such task under its nested backend, nesting level >= 1; the
    caller's own code, and n_jobs=1, run at level 0."""
    return bool(getattr(get_active_backend()[0], "nesting_level", 0))


def blas_threads() -> int:
    """The threads the loaded BLAS libraries use (the most of them; 0 for none)."""
    return max(
        (lib["num_threads"] for lib in threadpool_info() if lib["user_api"] == "blas"), default=0
    )


_lock = threading.Lock()
_held = [0, 0]  # blocks of limit_threads running in this process, handprop's threads before


@contextlib.contextmanager
def limit_threads(n: int | None) -> Iterator[None]:
    """Hold handprop's threads (:func:`handprop.nn.set_threads`) to ``n`` for the
    block, and BLAS's (threadpoolctl) too in a process's main thread; None: leave them.

    The counts are process-wide: handprop's are restored when the last of the blocks
    side by side in threads of one process (a joblib thread pool) ends. BLAS's are left
    alone in other threads: OpenBLAS (0.3.30 measured) ignores a change made while
    another live thread has changed them, so a thread could not restore them. A loky
    worker runs its tasks in its main thread."""
    if n is None:
        yield
        return
    main = threading.current_thread() is threading.main_thread()
    with _lock:
        if _held[0] == 0:
            _held[1] = nn.get_threads()
        _held[0] += 1
        nn.set_threads(n)
    try:
        with threadpool_limits(n, user_api="blas") if main else contextlib.nullcontext():
            yield
    finally:
        with _lock:
            _held[0] -= 1
            if _held[0] == 0:
                nn.set_threads(_held[1])


def same_network(a: nn.Network, b: nn.Network) -> bool:
    """Whether ``a`` and ``b`` have the same architecture (layers, input, loss, dtype)."""
    arch_a, arch_b = a.architecture(), b.architecture()
    return {k: v for k, v in arch_a.items() if k != "meta"} == {
        k: v for k, v in arch_b.items() if k != "meta"
    }
