"""Layer specs: the text items of a config ("conv 32 3 pad=1", "dense 128", "relu")
and the layer dicts of a model file, turned into layer objects, and back.

One registry, :data:`LAYERS`, resolves both (never ``getattr`` on a module). It is built
from the classes: each layer kind declares its item (:class:`ItemSpec`: its word, its
settings with their types, which size the input gives), and one parser, one formatter
and one model-file check here read those declarations. A model file is untrusted input,
so :func:`check_architecture` checks every value's type before a layer is built from it.
"""

from __future__ import annotations

import inspect
import math
import numbers
from collections.abc import Sequence
from typing import Any

from handprop.errors import HandpropError, ShapeError
from handprop.nn import activations, batchnorm, conv  # noqa: F401 (their kinds join LAYERS)
from handprop.nn.layers import LAYERS, Dense, Flatten, Layer
from handprop.nn.losses import LOSSES


def listed() -> list[type[Layer]]:
    """The registry's classes as "known:" lists name them: activations last."""
    return sorted(LAYERS.values(), key=lambda cls: cls.is_activation)


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


def parse_layer_item(item: str) -> tuple[str, dict[str, float]]:
    """One layer-spec item, e.g. "conv 32 3 pad=1", "maxpool 2", "relu", "dropout 0.5",
    "batchnorm" (or "batchnorm momentum=0.1 eps=1e-5").

    Returns the layer kind and its arguments by name (input sizes are left out: they
    follow from the shapes, so a spec never repeats them).
    """
    words = item.replace(":", " ").split()
    by_word = {cls.spec.word: cls for cls in listed()}
    if not words or words[0].lower() not in by_word:
        raise ShapeError(
            f"unknown layer {item!r}; known: {', '.join(by_word)} "
            "(e.g. 'conv 32 3 pad=1', 'maxpool 2', 'dense 128', 'dropout 0.5', 'batchnorm', "
            "'relu')"
        )
    cls = by_word[words[0].lower()]
    settings = {s.name: s for s in cls.spec.settings}
    names = tuple(settings)
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
            args[name] = settings[name].type(text)
        except ValueError:
            raise ShapeError(f"layer {item!r}: {name} must be a number, got {text!r}") from None
    missing = [n for n, s in settings.items() if s.required and n not in args]
    if missing:
        raise ShapeError(f"layer {item!r} needs {', '.join(missing)}")
    return cls.kind, args


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
        spec = LAYERS[kind].spec
        if spec.flat_input and len(shape) > 1:
            layers.append(Flatten())
            shape = layers[-1].output_shape(shape)
        if spec.image_input and len(shape) != 3:
            raise ShapeError(f"layer {item!r} needs image inputs (c, h, w), got {shape}")
        if spec.input_size:  # dense's d_in, conv's c_in, batchnorm's features or channels
            args = {spec.input_size: shape[0], **args}
        try:
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
        layers.append(LAYERS[out_act]())
    return layers


def layer_words(layer: Layer) -> str:
    """A layer as a layer-spec item ("dense 100", "conv 32 3 pad=1"), for messages: its
    required settings positionally, the others as name=value where not the default."""
    spec, config = type(layer).spec, layer.get_config()
    defaults = inspect.signature(type(layer)).parameters
    words = [spec.word]
    for s in spec.settings:
        value = config[s.name]
        text = f"{value:g}" if s.type is float else str(value)
        if s.required:
            words.append(text)
            continue
        default = config[s.default_from] if s.default_from else defaults[s.name].default
        if value != default:
            words.append(f"{s.name}={text}")
    return " ".join(words)


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
            known = ", ".join(cls.kind for cls in listed())
            raise ShapeError(f"layer {i} has unknown type {kind!r:.80}; known: {known}")
        params = inspect.signature(LAYERS[kind]).parameters
        reals = {s.name for s in LAYERS[kind].spec.settings if s.type is float}
        for name, value in spec.items():
            if name == "type":
                continue
            if name not in params:
                raise ShapeError(f"layer {i} ({kind}) has unknown setting {name!r:.80}")
            number = is_int(value) or (
                name in reals and isinstance(value, float) and math.isfinite(value)
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
