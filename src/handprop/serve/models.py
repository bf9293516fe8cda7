"""The models ``handprop serve`` offers, and what it shows of each answer.

A model is found from a model file, a run folder, or a folder of runs (an ``--out``
folder such as ``runs/``, or an experiment grid, one level of grids deep). Every model
is loaded at start-up, so that a broken file is refused before the server listens.

:meth:`ServedModel.explain` answers one prepared image: the class probabilities (the
same numbers as ``handprop predict``), a saliency map — the gradient of the top class's
score with respect to the input pixels, from the network's own hand-written backward
pass — and the first layer's activity (the most active hidden units of a dense layer
with their weight images, or a convolution's feature maps).
"""

from __future__ import annotations

import math
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from handprop.errors import ConfigError, HandpropError
from handprop.images import IMAGE_PREPS, image_prep
from handprop.nn import Network
from handprop.predict import MODEL_FILE, load_model

#: the most pixels an image sent to the server may have (Pillow's own limit is 89 M)
MAX_PIXELS = 10_000_000
#: the most models one server loads (a folder of runs)
MAX_MODELS = 200
#: hidden units shown for a dense first layer
TOP_UNITS = 8
#: feature maps shown for a convolutional first layer
MAX_MAPS = 32
#: the first layer's view (``Layer.first_layer_view``) -> the API's "kind" of it
#: (docs/api.md), and the picker's kind of the model
VIEW_KINDS = {"units": "dense", "maps": "conv"}
MODEL_KINDS = {"units": "mlp", "maps": "cnn"}


@dataclass
class ServedModel:
    """A loaded network and what the picker shows of it.

    Attributes
    ----------
    id : str                     the name the API knows it by (a run's folder name)
    net : Network
    path : Path                  the model file
    dataset : str or None
    accuracy : float or None     test accuracy from the run's metrics.json
    classes : list of str        class names (Fashion-MNIST's clothes, or "0".."9")
    image_shape : (H, W)         the images the network reads
    image_prep : str             how a picture becomes one (handprop.images.IMAGE_PREPS)
    """

    id: str
    net: Network
    path: Path
    dataset: str | None = None
    accuracy: float | None = None
    classes: list[str] = field(default_factory=list)
    image_shape: tuple[int, int] = (28, 28)
    image_prep: str = "mnist"
    # one request at a time per network: a training-mode pass keeps arrays on the layers
    lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def info(self) -> dict[str, Any]:
        """The JSON the picker (``GET /api/models``) shows."""
        first = self.net.layers[_first_param_layer(self.net)]
        return {
            "id": self.id,
            "name": self.id,
            "dataset": self.dataset,
            "accuracy": self.accuracy,
            "classes": self.classes,
            "image_shape": list(self.image_shape),
            "image_prep": self.image_prep,
            "preparation": IMAGE_PREPS[self.image_prep],
            "kind": MODEL_KINDS.get(first.first_layer_view, "mlp"),
            "description": self.net.describe(),
            "n_params": self.net.n_params,
        }

    def explain(self, image: np.ndarray) -> dict[str, Any]:
        """Probabilities, saliency and first-layer activity for one prepared image.

        Parameters
        ----------
        image : ndarray of shape (H, W)   pixels in [0, 1], white digit on black, as
                                          :func:`handprop.images.prepare_image` gives

        Returns
        -------
        dict, JSON-able: see docs/api.md for every field.
        """
        net = self.net
        H, W = self.image_shape
        X = image.reshape(1, *net.input_shape).astype(net.dtype)
        with self.lock:
            P = net.predict_proba(X)[0].astype(np.float64)
            top = int(P.argmax())
            # saliency: d score_top / dX through the network's own backward pass. The
            # score is the network's output for the top class (the logit, for
            # softmax + cross-entropy); G = e_top is dScore/dOutput. A training pass,
            # so that the layers keep what backward needs, without dropout masks: every
            # unit is kept, as at inference.
            ctx = net.context(training=True)
            out = net.forward(X, ctx=ctx)
            G = np.zeros_like(out)
            G[0, top] = 1
            dX = np.array(net.backward(G, input_grad=True, ctx=ctx), dtype=np.float64)
            first = _first_layer(net, X)
        g = dX.reshape(H, W)
        scale = float(np.abs(g).max())
        return {
            "model": self.id,
            "classes": self.classes,
            "probabilities": [round(float(p), 6) for p in P],
            "prediction": top,
            "label": self.classes[top],
            "input": np.round(image, 4).tolist(),
            "saliency": np.round(g / scale if scale > 0 else g, 4).tolist(),
            "saliency_scale": scale,
            "first_layer": first,
        }


def _first_param_layer(net: Network) -> int:
    return next((i for i, layer in enumerate(net.layers) if layer.param_shapes()), 0)


def _first_layer(net: Network, X: np.ndarray) -> dict[str, Any] | None:
    """The first layer with parameters, after its activation: top units or feature maps."""
    i = _first_param_layer(net)
    layer = net.layers[i]
    last = i + 1 if i + 1 < len(net.layers) and net.layers[i + 1].is_activation else i
    A = net.layer_input(X)
    for step in net.layers[: last + 1]:
        A = step.forward(A)  # inference: nothing is kept on the layers
    A = np.asarray(net.sample_first(A)[0], dtype=np.float64)
    activation = net.layers[last].kind if last != i else "identity"
    view = layer.first_layer_view
    if view == "units":  # the most active outputs, each with its input weights
        order = np.argsort(-A, kind="stable")[:TOP_UNITS]
        images = (layer.weight_images(X.shape[1:]) or (None, ""))[0]  # None: not images
        units = []
        for u in order:
            w = np.zeros(0) if images is None else np.asarray(images[u], np.float64).ravel()
            top = float(np.abs(w).max(initial=0))
            units.append(
                {
                    "unit": int(u),
                    "value": round(float(A[u]), 5),
                    # weights as integers in [-127, 127], scaled by the unit's largest
                    "weights": np.round(w / top * 127).astype(int).tolist() if top > 0 else None,
                }
            )
        kind = VIEW_KINDS[view]
        return {"kind": kind, "activation": activation, "n_units": len(A), "units": units}
    if view == "maps":  # the output feature maps
        maps = A[:MAX_MAPS]
        top = float(np.abs(maps).max())
        q = np.round(maps / top * 255) if top > 0 else np.zeros_like(maps)
        return {
            "kind": VIEW_KINDS[view],
            "activation": activation,
            "n_maps": len(A),
            "shape": list(maps.shape[1:]),
            "scale": top,
            # each map row-major, as integers in [-255, 255] on one shared scale
            "maps": q.astype(int).reshape(len(maps), -1).tolist(),
        }
    return None


# -- finding and loading ---------------------------------------------------------------


def image_shape_of(net: Network, path: Path) -> tuple[int, int]:
    """The (H, W) of the grayscale images the network reads; ConfigError otherwise."""
    shape = net.meta.get("image_shape")
    if shape and len(shape) == 2:
        H, W = int(shape[0]), int(shape[1])
    elif len(net.input_shape) == 3 and net.input_shape[0] == 1:
        H, W = net.input_shape[1:]
    elif len(net.input_shape) == 1 and math.isqrt(net.input_shape[0]) ** 2 == net.input_shape[0]:
        H = W = math.isqrt(net.input_shape[0])
    else:
        raise ConfigError(
            f"{path}: the model reads inputs of shape {net.input_shape}, not grayscale "
            "images; handprop serve shows image models only"
        )
    if math.prod(net.input_shape) != H * W:
        raise ConfigError(
            f"{path}: image_shape {H}x{W} does not match the input shape {net.input_shape}"
        )
    return H, W


def load_served(path: Path, model_id: str, run: Path | None) -> ServedModel:
    """One model, loaded and checked; its run folder (if any) gives dataset and accuracy."""
    net = load_model(path)
    image_shape = image_shape_of(net, path)
    names = net.meta.get("class_names") or [str(i) for i in range(net.n_classes)]
    dataset, accuracy = net.meta.get("dataset"), None
    if run is not None:
        from handprop.run.reader import RunFolder

        try:
            folder = RunFolder(run)
            dataset = folder.dataset or dataset
            value = folder.metrics.get("accuracy")
            if isinstance(value, (int, float)) and math.isfinite(value):
                accuracy = float(value)
        except HandpropError:
            pass  # a run's unreadable metrics only leave the picker without its accuracy
    return ServedModel(
        id=model_id,
        net=net,
        path=path,
        dataset=str(dataset) if dataset is not None else None,
        accuracy=accuracy,
        classes=[str(n) for n in names],
        image_shape=image_shape,
        image_prep=image_prep(net.meta),
    )


def _visible_dirs(folder: Path) -> list[Path]:
    try:
        return sorted(p for p in folder.iterdir() if p.is_dir() and not p.name.startswith("."))
    except OSError as exc:
        raise ConfigError(f"{folder}: cannot list the folder ({exc.strerror or exc})") from None


def find_models(source: str | Path) -> list[ServedModel]:
    """Every model under ``source``: a model file, a run folder, or a folder of runs
    (run folders inside it, and inside the experiment grids inside it), each loaded.

    Raises ConfigError when there is none, ModelFileError naming the first model file
    that cannot be loaded.
    """
    source = Path(source)
    if not source.exists():
        raise ConfigError(f"{source}: no such model file, run folder or folder of runs")
    if source.is_file():
        run = source.parent if source.name == MODEL_FILE else None
        return [load_served(source, source.stem if run is None else run.name, run)]
    if (source / MODEL_FILE).is_file():
        return [load_served(source / MODEL_FILE, source.name, source)]
    found: list[tuple[str, Path]] = []
    for sub in _visible_dirs(source):
        if (sub / MODEL_FILE).is_file():
            found.append((sub.name, sub))
            continue
        for run in _visible_dirs(sub):
            if (run / MODEL_FILE).is_file():
                found.append((f"{sub.name}/{run.name}", run))
    if not found:
        raise ConfigError(
            f"{source}: no {MODEL_FILE} in it nor in the run folders inside; "
            "train a model first (handprop train CONFIG)"
        )
    if len(found) > MAX_MODELS:
        raise ConfigError(
            f"{source}: holds {len(found):,} models, more than the {MAX_MODELS} handprop "
            "serve loads; give one experiment grid or run folder"
        )
    return [load_served(run / MODEL_FILE, model_id, run) for model_id, run in found]
