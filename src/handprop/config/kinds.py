"""The kinds of value a config field takes, and the names the registries must know.

Each :class:`Kind` parses a raw value (from a TOML value, a line of the seed format or a
CSV cell) into the field's Python value, or says what was expected; the field table in
:mod:`handprop.config` gives every field its kind.
"""

from __future__ import annotations

import difflib
import math
import numbers
import os
import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

#: names the network's registries must know (a test cross-checks them)
ACTIVATION_NAMES: tuple[str, ...] = ("sigmoid", "tanh", "relu", "identity")
#: "cross_entropy": softmax outputs + cross-entropy; "mse": sigmoid outputs + mean squared
#: error, the original's first version
LOSS_NAMES: tuple[str, ...] = ("cross_entropy", "mse")
INIT_NAMES: tuple[str, ...] = (
    "uniform",
    "glorot_uniform",
    "glorot_normal",
    "he_uniform",
    "he_normal",
    "pytorch",  # PyTorch's default: weights AND biases U(+-1/sqrt(fan_in)) (run/build.py)
)
DTYPE_NAMES: tuple[str, ...] = ("float32", "float64")
#: where the network computes: "cpu" (NumPy) or "cuda" (CuPy on an NVIDIA GPU); the
#: same tuple as ``handprop.nn.backend.DEVICES`` (a test cross-checks them)
DEVICE_NAMES: tuple[str, ...] = ("cpu", "cuda")
#: "auto": on a GPU, a training step whose batch has the shape of the step before it is
#: one CUDA graph, captured once and replayed; "off": every kernel launched on its own
#: (the same tuple as ``handprop.scale.graphs.GRAPH_MODES``; a test cross-checks them)
GRAPH_NAMES: tuple[str, ...] = ("auto", "off")
#: "original": the first ``total`` samples, permuted by ``split_seed`` (by default
#: ``seed``), cut into train and test;
#: "standard": the dataset's official training and test parts
SPLIT_NAMES: tuple[str, ...] = ("original", "standard")
#: fields with one value per hidden layer (a single value is broadcast)
PER_LAYER_FIELDS: tuple[str, ...] = ("activation", "dropout")
#: "gd" on full batches is the original's gradient descent; with batch_size it is SGD
OPTIMIZER_NAMES: tuple[str, ...] = ("gd", "sgd", "momentum", "nesterov", "adam", "rmsprop")
SCHEDULE_NAMES: tuple[str, ...] = ("constant", "step", "exponential", "cosine", "onecycle")
#: batchnorm at inference: "running": the running averages of training (PyTorch's
#: way); "recalibrate": re-estimated after the last epoch on the clean (not augmented)
#: training images, exact averages over every batch
BATCHNORM_STATS_NAMES: tuple[str, ...] = ("running", "recalibrate")


# --- value kinds -------------------------------------------------------------------------


class _BadValueError(Exception):
    """Raised by a parser; the caller turns it into a ConfigError naming the location.

    ``wrong_type`` says the value has the wrong type (not merely a bad value), so the
    message can name the type a TOML user wrote; ``hint`` is appended to the message.
    """

    def __init__(self, *, wrong_type: bool = False, hint: str = "") -> None:
        super().__init__(hint)
        self.wrong_type = wrong_type
        self.hint = hint


@dataclass(frozen=True)
class Kind:
    """How one field's values are read.

    Attributes
    ----------
    expect : str
        The rule in words, completing "... must be": ``"a positive integer"``.
    parse : callable
        A native value (TOML value, Python object) -> the normalized value; raises
        ``_BadValueError``. It must accept its own output: RunConfig re-validates on creation.
    from_text : callable or None
        A text cell (seed line, CSV cell) -> a native value for ``parse``; it returns
        the text unchanged when it cannot convert it, so that ``parse`` rejects it with
        the field's own rule. None: text is already the value (string fields).
    """

    expect: str
    parse: Callable[[Any], Any]
    from_text: Callable[[str], Any] | None = None


def _is_int(value: Any) -> bool:
    # bool is an int subclass, but `epochs = true` is a mistake, not 1
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def _is_real(value: Any) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


def _text_int(text: str) -> Any:
    try:
        return int(text.strip())
    except ValueError:
        return text


def _text_float(text: str) -> Any:
    try:
        return float(text.strip())
    except ValueError:
        return text


#: the largest integer any field takes (NumPy's int64; sizes and counts go there)
MAX_INT = 2**63 - 1


def _integer(minimum: int) -> Kind:
    expect = "a positive integer" if minimum == 1 else f"an integer >= {minimum}"

    def parse(value: Any) -> int:
        if not _is_int(value):
            raise _BadValueError(wrong_type=True)
        if value < minimum:
            raise _BadValueError()
        if value > MAX_INT:
            raise _BadValueError(hint=f"at most {MAX_INT}")
        return int(value)

    return Kind(expect, parse, _text_int)


def _positive_real() -> Kind:
    def parse(value: Any) -> float:
        if not _is_real(value):
            raise _BadValueError(wrong_type=True)
        value = float(value)
        # NaN fails every comparison, so test finiteness explicitly
        if not math.isfinite(value) or value <= 0:
            raise _BadValueError()
        return value

    return Kind("a finite number > 0", parse, _text_float)


def _real(low: float, high: float, *, low_open: bool = False, high_open: bool = True) -> Kind:
    """A finite number in an interval: [low, high) by default."""
    left, right = "(" if low_open else "[", ")" if high_open else "]"

    def parse(value: Any) -> float:
        if not _is_real(value):
            raise _BadValueError(wrong_type=True)
        value = float(value)
        above = value > low if low_open else value >= low
        below = value < high if high_open else value <= high
        if not (math.isfinite(value) and above and below):
            raise _BadValueError()
        return value

    bounds = f"{left}{low:g}, {high:g}{right}" if math.isfinite(high) else f">= {low:g}"
    expect = f"a number in {bounds}" if math.isfinite(high) else f"a finite number {bounds}"
    return Kind(expect, parse, _text_float)


def _per_layer_reals(one: Kind) -> Kind:
    """One number for every hidden layer, or a list with one per hidden layer."""

    def parse(value: Any) -> float | tuple[float, ...]:
        if isinstance(value, (list, tuple)):
            return tuple(one.parse(v) for v in value)
        return one.parse(value)

    def from_text(text: str) -> Any:
        parts = [p for p in re.split(r"[\s,;]+", text.strip().strip("[]()")) if p]
        values = [_text_float(p) for p in parts]
        return values[0] if len(values) == 1 else values

    return Kind(one.expect + ", or a list of them", parse, from_text)


def _layer_items() -> Kind:
    """A network as a list of layer items ("conv 32 3", "relu", "maxpool 2", ...)."""

    def parse(value: Any) -> tuple[str, ...]:
        if not isinstance(value, (list, tuple)):
            raise _BadValueError(wrong_type=True)
        if not value or not all(isinstance(v, str) and v.strip() for v in value):
            raise _BadValueError()
        return tuple(v.strip() for v in value)

    def from_text(text: str) -> Any:
        # a CSV cell: "conv 32 3; relu; maxpool 2" (commas work too inside quotes)
        return [p.strip() for p in re.split(r"[;,]", text.strip().strip("[]")) if p.strip()]

    return Kind("a non-empty list of layer items such as 'conv 32 3'", parse, from_text)


def _optional(kind: Kind) -> Kind:
    """``kind`` or None (TOML cannot write None: a missing key or an empty cell is None)."""

    def parse(value: Any) -> Any:
        return None if value is None else kind.parse(value)

    return Kind(kind.expect, parse, kind.from_text)


def _suggest(word: str, known: tuple[str, ...] | list[str]) -> str:
    close = difflib.get_close_matches(word, known, n=1, cutoff=0.6)
    return f"did you mean {close[0]!r}?" if close else ""


def _check_name(value: Any, names: tuple[str, ...]) -> str:
    if not isinstance(value, str):
        raise _BadValueError(wrong_type=True)
    if value not in names:
        raise _BadValueError(hint=_suggest(value, names))
    return value


def _choice(names: tuple[str, ...]) -> Kind:
    return Kind(
        "one of " + ", ".join(names),
        lambda value: _check_name(value, names),
        lambda text: text.strip(),
    )


def device_hint(value: Any) -> str:
    """The hint for a device that is not one: "did you mean 'cuda'?" for a GPU asked
    for by another word ("gpu", "cuda:0"), else the closest device name, if any."""
    if not isinstance(value, str):
        return ""
    word = value.strip().lower()
    if word.startswith(("gpu", "cuda", "cupy", "nvidia")) and word != "cuda":
        return "did you mean 'cuda'?"
    return _suggest(word, DEVICE_NAMES)


def _device() -> Kind:
    def parse(value: Any) -> str:
        if not isinstance(value, str):
            raise _BadValueError(wrong_type=True)
        if value not in DEVICE_NAMES:
            raise _BadValueError(hint=device_hint(value))
        return value

    return Kind("one of " + ", ".join(DEVICE_NAMES), parse, lambda text: text.strip())


#: the most UTF-8 bytes of a run name: a folder name may have 255, and a clash adds "-2"
MAX_RUN_NAME_BYTES = 200
#: names handprop writes next to the run folders of a grid (compared case-insensitively)
RESERVED_RUN_NAMES = ("summary.csv", "summary.md", "report.html", "figures")


def run_name_problem(name: str) -> str | None:
    """Why ``name`` cannot be a run folder's name, or None when it can.

    A run name becomes a folder under ``out`` and a row of a grid's summary.md: it must
    not climb out of ``out`` ('/', '\\', '.', '..'), hold a NUL or other control
    character (a newline breaks the summary), hold '|' (a Markdown table's separator),
    start or end with a space, take the name of a file the grid writes next to its run
    folders (summary.csv, ...), or be longer than a folder name may be.
    """
    if not name.strip():
        return "it is empty"
    if name in (".", ".."):
        return f"{name!r} is not a folder of its own"
    bad = sorted({c for c in name if c in "/\\|" or ord(c) < 0x20 or ord(c) == 0x7F})
    if bad:
        return "it holds " + ", ".join(repr(c) for c in bad)
    if name != name.strip():
        return "it starts or ends with a space"
    if name.startswith("."):
        return "it starts with '.' (hidden, like the markers handprop keeps in its folders)"
    if name.lower() in RESERVED_RUN_NAMES:
        return f"{name!r} is a file handprop writes next to the run folders"
    size = len(name.encode("utf-8", "surrogatepass"))
    if size > MAX_RUN_NAME_BYTES:
        return f"it is {size} bytes long; at most {MAX_RUN_NAME_BYTES}"
    return None


def _string(*, path: bool = False, folder_name: bool = False) -> Kind:
    def parse(value: Any) -> str:
        if path and isinstance(value, os.PathLike):
            value = os.fspath(value)
        if not isinstance(value, str):
            raise _BadValueError(wrong_type=True)
        if not value.strip():
            raise _BadValueError()
        if path and "\0" in value:
            raise _BadValueError(hint="a path cannot hold a NUL character")
        # a run name becomes a folder under `out`: it must not climb out of it
        problem = run_name_problem(value) if folder_name else None
        if problem:
            raise _BadValueError(hint=problem)
        return value

    if folder_name:
        expect = "a folder name (no '/', '\\', '|' or control characters)"
    elif path:
        expect = "a non-empty path"
    else:
        expect = "a non-empty string"
    return Kind(expect, parse, lambda text: text.strip())


def _hidden_sizes() -> Kind:
    def parse(value: Any) -> tuple[int, ...]:
        if _is_int(value):
            value = [value]
        if not isinstance(value, (list, tuple)):
            raise _BadValueError(wrong_type=True)
        for size in value:
            if not _is_int(size):
                raise _BadValueError(wrong_type=True)
            if size < 1:
                raise _BadValueError()
        return tuple(int(size) for size in value)

    def from_text(text: str) -> Any:
        # "100", "800-800", "800,800", "[800, 800]"; "none" or "[]": no hidden layer
        inner = text.strip().strip("[]()").strip()
        if inner.lower() == "none" or (not inner and text.strip()):
            return []
        if re.fullmatch(r"[+-]?\d+", inner):
            return int(inner)
        parts = re.split(r"\s*[,-]\s*|\s+", inner)
        if parts and all(re.fullmatch(r"\d+", p) for p in parts):
            return [int(p) for p in parts]
        return text

    return Kind("a positive integer or a list of positive integers", parse, from_text)


def _one_hidden_size() -> Kind:
    """Line 4 of the seed format: exactly one size m, read as (m,)."""
    size = _integer(1)
    return Kind(size.expect, lambda value: (size.parse(value),), _text_int)


def _activations() -> Kind:
    def parse(value: Any) -> str | tuple[str, ...]:
        # one name is kept as a str and broadcast over the hidden layers once they are known
        if isinstance(value, str):
            return _check_name(value, ACTIVATION_NAMES)
        if not isinstance(value, (list, tuple)):
            raise _BadValueError(wrong_type=True)
        return tuple(_check_name(name, ACTIVATION_NAMES) for name in value)

    def from_text(text: str) -> Any:
        parts = [p for p in re.split(r"[\s,-]+", text.strip()) if p]
        return parts[0] if len(parts) == 1 else parts

    expect = "one of " + ", ".join(ACTIVATION_NAMES) + ", or a list of them"
    return Kind(expect, parse, from_text)
