"""handprop as a scikit-learn estimator: :class:`HandpropClassifier`.

The same engine as ``handprop train``: the estimator's parameters become one
:class:`~handprop.config.RunConfig` (validated there, once, in ``fit``), the network
and optimizer come from :mod:`handprop.run.build`'s builders, and each epoch is
:func:`handprop.run.fit.run_epoch` with the epoch's generator seeded by
(``random_state``, epoch), as in :func:`handprop.run.fit.fit`. So one ``fit`` on a
run's training set, with its config and seed, gives the run's parameters bit for bit
(``tests/test_sklearn.py``).

scikit-learn's conventions: parameters stored as given in ``__init__``, validated in
``fit``; input checked by :func:`sklearn.utils.validation.validate_data` (its messages
for NaN, wrong shapes, sparse input); labels of any kind mapped to 0..k-1 through
``np.unique`` (``classes_``).

Defaults differ from the command line's (the original's full-batch gradient descent
with sigmoid units): they are :class:`sklearn.neural_network.MLPClassifier`'s
(ReLU, Adam at 0.001, mini-batches of 200), which a notebook user expects.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
from sklearn.base import BaseEstimator, ClassifierMixin
from sklearn.utils import check_random_state
from sklearn.utils.multiclass import check_classification_targets
from sklearn.utils.validation import check_is_fitted, validate_data

from handprop import nn
from handprop.config import RunConfig
from handprop.errors import ConfigError
from handprop.nn import backend
from handprop.run.build import Split, build_network, build_optimizer, carve_validation
from handprop.run.callbacks import EarlyStopping
from handprop.run.fit import check_loss, check_params, run_epoch
from handprop.scale.parallel import DataParallel

__all__ = ["HandpropClassifier"]


class HandpropClassifier(ClassifierMixin, BaseEstimator):
    """A handprop network trained by ``fit(X, y)``.

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
    random_state : int, RandomState or None    the run's seed
    threads : int or None   handprop's threads (None: as it is)
    device : str       "cpu" or "cuda"

    Attributes
    ----------
    classes_ : ndarray of shape (k,)     the labels, sorted; column j of predict_proba
    n_features_in_, feature_names_in_ : as in scikit-learn
    network_ : handprop.nn.Network
    n_iter_ : int        epochs trained
    loss_curve_ : list of float   each epoch's mean training loss
    best_loss_ : float   the lowest of ``loss_curve_`` (None with early stopping)
    validation_scores_ : list of float   validation accuracies (early stopping only)
    best_validation_score_ : float   (early stopping only)
    """

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
        init: str = "uniform",
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
        (as ValueError, scikit-learn's type for a bad parameter)."""
        rs = self.random_state
        seed = rs if isinstance(rs, int | np.integer) and rs >= 0 else None
        if seed is None:  # None or a RandomState: one seed drawn from it
            seed = int(check_random_state(rs).randint(np.iinfo(np.int32).max))
        hidden = self.hidden_layer_sizes
        hidden = (hidden,) if isinstance(hidden, int | np.integer) else tuple(hidden)
        try:
            return RunConfig(
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
                init=self.init,
                seed=int(seed),
                dtype=np.dtype(dtype).name,
                device=self.device,
                eval_every=1,
                split="standard",  # no split made here: the data are the caller's
            )
        except ConfigError as e:
            raise ValueError(f"{type(self).__name__}: {e}") from e

    # -- input ----------------------------------------------------------------------------

    def _check_X(self, X: Any, y: Any = "no_validation", reset: bool = True) -> Any:
        """X (and y) through scikit-learn's checks; X as float32 (kept) or float64.

        Images (n, h, w) or (n, 1, h, w) are flattened first (``n_features_in_`` is
        h w, whichever shape comes). Returns validate_data's result and the images'
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
        return validate_data(self, X, y, dtype=[np.float64, np.float32], reset=reset), images

    def _images(self, X: np.ndarray, images: tuple[int, int] | None) -> tuple[int, ...]:
        """The images' shape (h, w) for a CNN (``images``: X's own), or (d,) for a
        dense network."""
        if self.layers is None:
            return (X.shape[1],)
        shape = images or self.image_shape
        if shape is None:
            raise ValueError(
                "layers (a CNN) needs images: X of shape (n, h, w) or (n, 1, h, w), "
                f"or flat X with image_shape; got X of shape {X.shape}"
            )
        if math.prod(shape) != X.shape[1]:
            raise ValueError(f"image_shape {tuple(shape)} does not hold {X.shape[1]} features")
        return tuple(shape)

    def _shaped(self, X: np.ndarray) -> np.ndarray:
        return np.ascontiguousarray(X).reshape(len(X), *self.network_.input_shape)

    # -- training ---------------------------------------------------------------------------

    def fit(self, X: Any, y: Any) -> HandpropClassifier:
        """Train a new network on (X, y) for ``epochs`` epochs (or until early stopping)."""
        (X, y), images = self._check_X(X, y)
        check_classification_targets(y)
        self._start(X, np.unique(y), images)
        self._train(X, self._encode(y), self.cfg_.epochs)
        return self

    def partial_fit(self, X: Any, y: Any, classes: Any = None) -> HandpropClassifier:
        """One epoch on (X, y); the first call builds the network for ``classes``."""
        first = not hasattr(self, "network_")
        (X, y), images = self._check_X(X, y, reset=first)
        check_classification_targets(y)
        if first:
            if classes is None:
                raise ValueError("classes must be passed on the first call to partial_fit")
            self._start(X, np.unique(classes), images)
        self._train(X, self._encode(y), 1)
        return self

    def _encode(self, y: np.ndarray) -> np.ndarray:
        ids = np.searchsorted(self.classes_, y)
        ids = np.minimum(ids, len(self.classes_) - 1)
        unknown = self.classes_[ids] != y
        if unknown.any():
            raise ValueError(
                f"y holds labels not in classes_ {self.classes_.tolist()}: "
                f"{np.unique(y[unknown]).tolist()[:5]}"
            )
        return ids.astype(np.int64)

    def _start(self, X: np.ndarray, classes: np.ndarray, images: tuple[int, int] | None) -> None:
        """Config, network, optimizer: what one run's builders make."""
        if len(classes) < 2:
            raise ValueError(
                f"{type(self).__name__} needs at least 2 classes in y, got 1 class: {classes}"
            )
        cfg = self._config(X.dtype)
        if self.threads is not None:
            nn.set_threads(self.threads)
        xp = backend.device_namespace(cfg.device)
        shape = self._images(X, images)
        # the builders read the split's classes, image shape and feature count
        data = Split(
            X_train=X.reshape(len(X), -1),
            y_train=np.empty(0, np.int64),
            X_test=X[:0],
            y_test=np.empty(0, np.int64),
            train_idx=np.empty(0, np.int64),
            test_idx=np.empty(0, np.int64),
            class_names=tuple(str(c) for c in classes),
            image_shape=shape,
            pixel_max=1.0,
            source="fit",
        )
        net = build_network(cfg, data)
        # the model file's facts: no dataset, and image_shape only for images
        hw = shape if len(shape) == 2 else images or self.image_shape
        net.meta = {"class_names": list(data.class_names), "pixel_max": 1.0}
        if hw is not None and math.prod(hw) == X.shape[1]:
            net.meta["image_shape"] = [int(s) for s in hw]
        net.to(xp)
        self.cfg_, self.classes_, self.network_ = cfg, classes, net
        self.optimizer_ = build_optimizer(cfg, net)
        self._model = DataParallel(net)
        self._stopping = EarlyStopping(cfg.patience)
        self.n_iter_, self.loss_curve_ = 0, []
        self.best_loss_ = None if cfg.validation else math.inf
        if cfg.validation:
            self.validation_scores_, self.best_validation_score_ = [], -math.inf

    def _train(self, X: np.ndarray, y: np.ndarray, epochs: int) -> None:
        """``epochs`` more epochs, as :func:`handprop.run.fit.fit` runs them."""
        cfg, net, opt, model = self.cfg_, self.network_, self.optimizer_, self._model
        X = self._shaped(X)
        X_val = y_val = None
        if cfg.validation:  # the CLI's carving of the validation part
            fit_idx, val_idx = carve_validation(cfg, np.arange(len(y)))
            X, y, X_val, y_val = X[fit_idx], y[fit_idx], X[val_idx], y[val_idx]
        batch = len(y) if cfg.batch_size is None else min(cfg.batch_size, len(y))
        model.check_memory(batch, state_vectors=len(opt.state_names))  # as build_run does
        with np.errstate(over="ignore", invalid="ignore"):
            for _ in range(epochs):
                if self._stopping.stopped:
                    break
                epoch = self.n_iter_ + 1
                rng = np.random.default_rng([cfg.seed, epoch])  # the epoch's draws
                net.set_rng(rng)
                opt.set_epoch(epoch)
                loss, _ = run_epoch(
                    model, opt, X, y, batch, rng, lambda v, e=epoch: check_loss(v, e, cfg)
                )
                check_params(net, epoch, cfg)
                self.n_iter_ = epoch
                self.loss_curve_.append(float(loss))
                if X_val is None:
                    self.best_loss_ = min(self.best_loss_, float(loss))
                    continue
                val_loss = model.loss_value(backend.asarray(X_val, net.xp), y_val_on(y_val, net))
                score = model.accuracy(X_val, y_val)
                self.validation_scores_.append(score)
                self.best_validation_score_ = max(self.best_validation_score_, score)
                self._stopping.update(epoch, val_loss, backend.to_host(net.params))
        if self._stopping.best_params is not None:
            backend.copyto(net.params, backend.asarray(self._stopping.best_params, net.xp))

    # -- prediction -------------------------------------------------------------------------

    def predict_proba(self, X: Any) -> np.ndarray:
        """Class probabilities (n, k), columns in the order of ``classes_``."""
        check_is_fitted(self, "network_")
        X, _ = self._check_X(X, reset=False)
        return self._model.predict_proba(self._shaped(X.astype(self.network_.dtype, copy=False)))

    def predict_log_proba(self, X: Any) -> np.ndarray:
        with np.errstate(divide="ignore"):
            return np.log(self.predict_proba(X))

    def predict(self, X: Any) -> np.ndarray:
        """The most probable label of each row."""
        P = self.predict_proba(X)  # checks that the estimator is fitted
        return self.classes_[P.argmax(axis=1)]

    # -- pickle (scikit-learn's convention; handprop's model files stay pickle-free) ----

    def __getstate__(self) -> dict[str, Any]:
        """The network as its architecture and host parameters, the optimizer as its
        state: a network holds its array namespace (a module), which pickle refuses."""
        state = self.__dict__.copy()
        state.pop("_model", None)  # thread shards: rebuilt on loading
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
        net.to(backend.device_namespace(self.cfg_.device))
        self.network_, self.optimizer_ = net, build_optimizer(self.cfg_, net)
        self.optimizer_.load_state_dict(optimizer, net.params)
        self._model = DataParallel(net)


def y_val_on(y: np.ndarray, net: nn.Network) -> Any:
    return backend.asarray(y, net.xp, dtype=net.xp.int64)
