"""Layer specs: the text items of a config ("conv 32 3 pad=1", "dense 128", "relu")
and the layer dicts of a model file, turned into layer objects.

One registry, :data:`LAYERS`, resolves both (never ``getattr`` on a module); a model
file is untrusted input, so :func:`check_architecture` checks every value's type
before a layer is built from it.
"""

from __future__ import annotations

import inspect
import math
import numbers
from collections.abc import Sequence
from typing import Any

from handprop.errors import HandpropError, ShapeError
from handprop.nn.activations import ACTIVATIONS
from handprop.nn.batchnorm import BatchNorm
from handprop.nn.conv import AvgPool2D, Conv2D, MaxPool2D
from handprop.nn.layers import Dense, Dropout, Flatten, Layer
from handprop.nn.losses import LOSSES

#: layer kind -> class; model files resolve through it (never through getattr)
LAYERS: dict[str, type[Layer]] = {
    "dense": Dense,
    "flatten": Flatten,
    "dropout": Dropout,
    "conv2d": Conv2D,
    "maxpool2d": MaxPool2D,
    "avgpool2d": AvgPool2D,
    "batchnorm": BatchNorm,
    **ACTIVATIONS,
}

#: layer settings that are real numbers (every other setting is an integer)
FLOAT_SETTINGS = frozenset({"p", "momentum", "eps"})


def parse_spec(spec: str | Sequence[int]) -> list[int]:
    """Layer sizes from "784-100-10" (or a sequence of ints); at least input and output."""
    if isinstance(spec, str):
        parts = spec.replace(",", "-").split("-")
        try:
            sizes = [int(p) for p in parts]
        except ValueError:
            raise ShapeError(
                f"network spec must be sizes joined by '-', like '784-100-10', got {spec!r}"
            ) from None
    else:
        sizes = [int(s) for s in spec]
    if len(sizes) < 2 or any(s < 1 for s in sizes):
        raise ShapeError(f"network spec needs an input and an output size, all >= 1, got {spec!r}")
    return sizes


#: layer-spec words -> (layer kind, positional argument names, their types)
LAYER_WORDS: dict[str, tuple[str, tuple[str, ...]]] = {
    "conv": ("conv2d", ("c_out", "k", "stride", "pad")),
    "maxpool": ("maxpool2d", ("k", "stride")),
    "avgpool": ("avgpool2d", ("k", "stride")),
    "dense": ("dense", ("d_out",)),
    "dropout": ("dropout", ("p",)),
    "batchnorm": ("batchnorm", ("momentum", "eps")),
    "flatten": ("flatten", ()),
    **{name: (name, ()) for name in ACTIVATIONS},
}


def parse_layer_item(item: str) -> tuple[str, dict[str, float]]:
    """One layer-spec item, e.g. "conv 32 3 pad=1", "maxpool 2", "relu", "dropout 0.5",
    "batchnorm" (or "batchnorm momentum=0.1 eps=1e-5").

    Returns the layer kind and its arguments by name (input sizes are left out: they
    follow from the shapes, so a spec never repeats them).
    """
    words = item.replace(":", " ").split()
    if not words or words[0].lower() not in LAYER_WORDS:
        raise ShapeError(
            f"unknown layer {item!r}; known: {', '.join(LAYER_WORDS)} "
            "(e.g. 'conv 32 3 pad=1', 'maxpool 2', 'dense 128', 'dropout 0.5', 'batchnorm', "
            "'relu')"
        )
    kind, names = LAYER_WORDS[words[0].lower()]
    args: dict[str, float] = {}
    positional = [w for w in words[1:] if "=" not in w]
    if len(positional) > len(names):
        raise ShapeError(f"layer {item!r} takes at most {len(names)} values ({', '.join(names)})")
    pairs = list(zip(names, positional, strict=False))
    pairs += [tuple(w.split("=", 1)) for w in words[1:] if "=" in w]
    for name, text in pairs:
        if name not in names:
            raise ShapeError(f"layer {item!r}: unknown setting {name!r}; known: {', '.join(names)}")
        try:
            args[name] = float(text) if name in FLOAT_SETTINGS else int(text)
        except ValueError:
            raise ShapeError(f"layer {item!r}: {name} must be a number, got {text!r}") from None
    required = {"conv2d": 2, "maxpool2d": 1, "avgpool2d": 1, "dense": 1, "dropout": 1}
    missing = [n for n in names[: required.get(kind, 0)] if n not in args]
    if missing:
        raise ShapeError(f"layer {item!r} needs {', '.join(missing)}")
    return kind, args


def build_layers(
    items: Sequence[str], input_shape: Sequence[int], n_classes: int, loss: str
) -> list[Layer]:
    """Layers from a spec list; Flatten goes in before the first dense layer on images,
    and the output layer (dense to ``n_classes``, then the loss's output activation)
    is appended."""
    layers: list[Layer] = []
    shape = tuple(int(s) for s in input_shape)
    for item in items:
        kind, args = parse_layer_item(item)
        if kind == "dense" and len(shape) > 1:
            layers.append(Flatten())
            shape = layers[-1].output_shape(shape)
        if kind == "conv2d" and len(shape) != 3:
            raise ShapeError(f"layer {item!r} needs image inputs (c, h, w), got {shape}")
        try:
            if kind == "conv2d":
                layer: Layer = Conv2D(shape[0], **args)
            elif kind == "dense":
                layer = Dense(shape[0], **args)
            elif kind == "batchnorm":  # per feature (n, d) or per channel (n, c, h, w)
                layer = BatchNorm(shape[0], **args)
            else:
                layer = LAYERS[kind](**args)
            shape = layer.output_shape(shape)
        except HandpropError as exc:  # "dense needs sizes >= 1, ...": say which item
            raise ShapeError(f"layer {item!r}: {exc}") from None
        layers.append(layer)
    if len(shape) > 1:
        layers.append(Flatten())
        shape = layers[-1].output_shape(shape)
    layers.append(Dense(shape[0], n_classes))
    out_act = LOSSES[loss].output_activation if loss in LOSSES else None
    if out_act is not None:
        layers.append(ACTIVATIONS[out_act]())
    return layers


def layer_words(layer: Layer) -> str:
    """A layer as a layer-spec item ("dense 100", "conv 32 3 pad=1"), for messages."""
    if isinstance(layer, Dense):
        return f"dense {layer.d_out}"
    if isinstance(layer, Conv2D):
        extra = (f" stride={layer.stride}" if layer.stride != 1 else "") + (
            f" pad={layer.pad}" if layer.pad else ""
        )
        return f"conv {layer.c_out} {layer.k}{extra}"
    if isinstance(layer, (MaxPool2D, AvgPool2D)):
        name = layer.kind.removesuffix("2d")
        return f"{name} {layer.k}" + (f" stride={layer.stride}" if layer.stride != layer.k else "")
    if isinstance(layer, Dropout):
        return f"dropout {layer.p:g}"
    if isinstance(layer, BatchNorm):
        extra = (f" momentum={layer.momentum:g}" if layer.momentum != 0.1 else "") + (
            f" eps={layer.eps:g}" if layer.eps != 1e-5 else ""
        )
        return "batchnorm" + extra
    return layer.kind


#: the most layers a model file may describe (the deepest handprop net has a few dozen)
MAX_LAYERS = 10_000


def is_int(value: Any) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def check_architecture(arch: Any) -> None:
    """Types and names of an architecture dict; ShapeError names the first bad value."""
    if not isinstance(arch, dict):
        raise ShapeError(f"the architecture must be a JSON object, got {type(arch).__name__}")
    for key in ("input_shape", "loss", "dtype", "layers"):
        if key not in arch:
            raise ShapeError(f"the architecture has no {key!r}")
    shape = arch["input_shape"]
    if (
        not isinstance(shape, list)
        or not 1 <= len(shape) <= 3
        or not all(is_int(s) and s >= 1 for s in shape)
    ):
        raise ShapeError(f"input_shape must be a list of 1 to 3 integers >= 1, got {shape!r:.80}")
    if not isinstance(arch["loss"], str) or arch["loss"] not in LOSSES:
        raise ShapeError(f"unknown loss {arch['loss']!r:.80}; known: {', '.join(LOSSES)}")
    if not isinstance(arch["dtype"], str) or arch["dtype"] not in ("float32", "float64"):
        raise ShapeError(f"dtype must be float32 or float64, got {arch['dtype']!r:.80}")
    if not isinstance(arch.get("meta") or {}, dict):
        raise ShapeError(f"meta must be a JSON object, got {arch['meta']!r:.80}")
    layers = arch["layers"]
    if not isinstance(layers, list) or not layers:
        raise ShapeError("layers must be a non-empty list")
    if len(layers) > MAX_LAYERS:
        raise ShapeError(f"{len(layers):,} layers, more than the {MAX_LAYERS:,} handprop reads")
    for i, spec in enumerate(layers):
        kind = spec.get("type") if isinstance(spec, dict) else None
        if not isinstance(spec, dict) or not isinstance(kind, str):
            raise ShapeError(f"layer {i} must be an object with a 'type', got {spec!r:.80}")
        if kind not in LAYERS:
            raise ShapeError(f"layer {i} has unknown type {kind!r:.80}; known: {', '.join(LAYERS)}")
        params = inspect.signature(LAYERS[kind]).parameters
        for name, value in spec.items():
            if name == "type":
                continue
            if name not in params:
                raise ShapeError(f"layer {i} ({kind}) has unknown setting {name!r:.80}")
            number = is_int(value) or (
                name in FLOAT_SETTINGS and isinstance(value, float) and math.isfinite(value)
            )
            if not number:
                raise ShapeError(f"layer {i} ({kind}): {name} must be a number, got {value!r:.80}")
        missing = [
            n for n, p in params.items() if p.default is inspect.Parameter.empty and n not in spec
        ]
        if missing:
            raise ShapeError(f"layer {i} ({kind}) needs {', '.join(missing)}")


def architecture_layers(arch: dict[str, Any]) -> list[Layer]:
    """The layer objects of a checked architecture (no parameters are allocated)."""
    return [
        LAYERS[spec["type"]](**{k: v for k, v in spec.items() if k != "type"})
        for spec in arch["layers"]
    ]
