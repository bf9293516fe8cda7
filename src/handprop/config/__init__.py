"""The run config: the seed's 6-line text format and TOML, resolved to one ``RunConfig``.

The original system is driven by six plain-text lines, each a value and an optional
``# comment``::

    20000 # total samples to load
    18000 # training samples
    2000 # test samples
    100 # hidden layer size
    2.5 # learning rate
    1000 # epochs

A ``.toml`` file holds the same six fields under their names (``total``, ``train``,
``test``, ``hidden``, ``learning_rate``, ``epochs``) plus every other field of
:class:`RunConfig`, all at the top level. An experiment CSV row goes through
:func:`config_from_mapping`, which also accepts the original column names ``d``,
``dtrain``, ``dtest``, ``m`` and ``alpha`` and text cells such as ``"800-800"``.

All three resolve to one frozen, validated :class:`RunConfig`. Every malformed value
raises :class:`~handprop.errors.ConfigError` naming where it came from (``file line N``,
or whatever location the caller supplies), the rule, and the value.

The fields are data: each is declared once, in :class:`RunConfig`, with its default,
its parser, its words for messages, its CSV aliases and its line in the seed format
(see :func:`option`). Adding a field is adding one line there; the kinds of value
(the parsers, with their messages) are in :mod:`handprop.config.kinds`.
"""

from __future__ import annotations

import math
import re
import sys
from collections.abc import Callable, Mapping
from dataclasses import MISSING, dataclass, field, fields, replace
from pathlib import Path
from types import MappingProxyType
from typing import Any

from handprop.errors import ConfigError

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - exercised on Python 3.10 only
    import tomli as tomllib

__all__ = [
    "ACTIVATION_NAMES",
    "AUGMENT_MOVES",
    "DEVICE_NAMES",
    "DTYPE_NAMES",
    "INIT_NAMES",
    "LOSS_NAMES",
    "SEED_LINES",
    "SPLIT_NAMES",
    "FieldSpec",
    "Kind",
    "RunConfig",
    "config_from_mapping",
    "device_hint",
    "field_specs",
    "load_config",
    "option",
    "parse_seed_config",
    "parse_toml_config",
    "run_name_problem",
    "to_toml",
]

from handprop.config.kinds import (  # the value kinds, and the names the registries know
    ACTIVATION_NAMES,
    BATCHNORM_STATS_NAMES,
    DEVICE_NAMES,
    DTYPE_NAMES,
    GRAPH_NAMES,
    INIT_NAMES,
    LOSS_NAMES,
    OPTIMIZER_NAMES,
    PER_LAYER_FIELDS,
    SCHEDULE_NAMES,
    SPLIT_NAMES,
    Kind,
    _activations,
    _BadValueError,
    _choice,
    _device,
    _hidden_sizes,
    _integer,
    _is_int,
    _is_real,
    _layer_items,
    _one_hidden_size,
    _optional,
    _per_layer_reals,
    _positive_real,
    _real,
    _string,
    _suggest,
    device_hint,
    run_name_problem,
)

_SPEC_KEY = "handprop.config"

#: the augmentation fields that each turn a move of the images on (elastic sigma only
#: shapes the elastic one)
AUGMENT_MOVES = ("augment_shift", "augment_rotate", "augment_scale", "augment_elastic_alpha")

# --- the field table -----------------------------------------------------------------------


@dataclass(frozen=True)
class FieldSpec:
    """One field of :class:`RunConfig`: its kind and how messages and inputs name it.

    Attributes
    ----------
    kind : Kind
        How its values are parsed and checked.
    label : str
        The value in words, used by messages about the seed format.
    aliases : tuple of str
        Other keys accepted by :func:`config_from_mapping` (the original CSV columns).
    seed_line : int or None
        Its line (1-6) in the seed format.
    seed_kind : Kind or None
        A stricter kind for the seed line, where it differs.
    """

    kind: Kind
    label: str
    aliases: tuple[str, ...] = ()
    seed_line: int | None = None
    seed_kind: Kind | None = None


def option(
    default: Any,
    kind: Kind,
    label: str,
    *,
    aliases: tuple[str, ...] = (),
    seed_line: int | None = None,
    seed_kind: Kind | None = None,
) -> Any:
    """Declare a :class:`RunConfig` field; ``default=MISSING`` makes it required."""
    spec = FieldSpec(kind, label, aliases, seed_line, seed_kind)
    return field(default=default, metadata={_SPEC_KEY: spec})


@dataclass(frozen=True, kw_only=True)
class RunConfig:
    """One validated training run: data, split, network, training, output.

    Create it with :func:`load_config` or :func:`config_from_mapping`; direct construction
    is validated too (with no file location in its messages). ``activation`` may be given
    as one name and is stored as one name per hidden layer; ``hidden`` as an int or list
    and is stored as a tuple.
    """

    # the seed format's six lines, in order
    total: int | None = option(
        None, _optional(_integer(1)), "total samples to load", aliases=("d",), seed_line=1
    )
    train: int | None = option(
        None, _optional(_integer(1)), "training samples", aliases=("dtrain",), seed_line=2
    )
    test: int | None = option(
        None, _optional(_integer(1)), "test samples", aliases=("dtest",), seed_line=3
    )
    hidden: tuple[int, ...] = option(
        (100,),
        _hidden_sizes(),
        "hidden layer size",
        aliases=("m",),
        seed_line=4,
        seed_kind=_one_hidden_size(),
    )
    learning_rate: float = option(
        MISSING, _positive_real(), "learning rate", aliases=("alpha",), seed_line=5
    )
    epochs: int = option(MISSING, _integer(1), "epochs", seed_line=6)
    # the rest: TOML and CSV only
    dataset: str = option("mnist", _string(), "dataset name")
    data_dir: str | None = option(None, _optional(_string(path=True)), "data directory")
    seed: int = option(0, _integer(0), "seed")
    split: str = option("original", _choice(SPLIT_NAMES), "split")
    # the split's own seed (and the validation part's): None follows `seed`, so a config
    # without it splits as it always did; one split_seed and several seeds share a test set
    split_seed: int | None = option(None, _optional(_integer(0)), "split seed")
    activation: tuple[str, ...] = option("sigmoid", _activations(), "activation")
    loss: str = option("cross_entropy", _choice(LOSS_NAMES), "loss")
    label_smoothing: float = option(
        0.0, _real(0, 1), "label smoothing of the cross-entropy's targets (0: one-hot)"
    )
    init: str = option("uniform", _choice(INIT_NAMES), "weight initialisation")
    dtype: str = option("float32", _choice(DTYPE_NAMES), "dtype")
    device: str = option("cpu", _device(), "device")
    # CUDA graphs of the training step on a GPU: "auto" captures a step whose batch
    # repeats the shape of the one before and replays it (handprop.scale.graphs),
    # "off" launches every kernel on its own; the same results to float rounding
    graph: str = option("auto", _choice(GRAPH_NAMES), "CUDA graphs of the training step")
    eval_every: int = option(10, _integer(1), "evaluation interval in epochs")
    out: str = option("runs", _string(path=True), "output directory")
    name: str | None = option(None, _optional(_string(folder_name=True)), "run name")
    # any network, as layer items; the output layer is appended (replaces hidden)
    layers: tuple[str, ...] | None = option(
        None, _optional(_layer_items()), "layers ('conv 32 3', 'relu', 'maxpool 2', ...)"
    )
    # optimization (past the original)
    optimizer: str = option("gd", _choice(OPTIMIZER_NAMES), "optimizer")
    batch_size: int | None = option(
        None, _optional(_integer(1)), "mini-batch size (none: the full batch)"
    )
    momentum: float = option(0.9, _real(0, 1), "momentum")
    beta1: float = option(0.9, _real(0, 1), "Adam beta1")
    beta2: float = option(0.999, _real(0, 1), "Adam beta2")
    rho: float = option(0.9, _real(0, 1), "RMSprop decay")
    eps: float = option(1e-8, _positive_real(), "Adam/RMSprop epsilon")
    schedule: str = option("constant", _choice(SCHEDULE_NAMES), "learning-rate schedule")
    warmup: int = option(0, _integer(0), "warm-up epochs")
    onecycle_peak: float = option(
        0.25, _real(0, 1, low_open=True), "where the one-cycle rate peaks (fraction of training)"
    )
    step_size: int = option(10, _integer(1), "epochs between step decays")
    gamma: float = option(0.1, _real(0, 1, low_open=True, high_open=False), "decay factor")
    # regularization
    weight_decay: float = option(0.0, _real(0, math.inf), "L2 weight decay")
    dropout: tuple[float, ...] = option(0.0, _per_layer_reals(_real(0, 1)), "dropout")
    validation: float = option(0.0, _real(0, 1), "validation fraction of the training set")
    patience: int | None = option(
        None, _optional(_integer(1)), "early-stopping patience in evaluations"
    )
    # data augmentation of image mini-batches
    augment_shift: int = option(0, _integer(0), "largest random shift in pixels")
    augment_rotate: float = option(
        0.0, _real(0, 180, high_open=False), "largest random rotation in degrees"
    )
    augment_scale: float = option(
        0.0, _real(0, 1), "largest random change of size, a fraction (0.1: 0.9 to 1.1 times)"
    )
    augment_elastic_alpha: float = option(
        0.0, _real(0, math.inf), "elastic distortion scale alpha in pixels (0: off)"
    )
    augment_elastic_sigma: float = option(
        4.0, _positive_real(), "elastic distortion smoothing sigma in pixels"
    )
    batchnorm_stats: str = option(
        "running", _choice(BATCHNORM_STATS_NAMES), "batchnorm statistics at inference"
    )
    # weight averaging (Izmailov et al. 2018): the run's result is the mean of the
    # parameters at the ends of epochs average_from to the last (None: the last epoch's)
    average_from: int | None = option(
        None, _optional(_integer(1)), "first epoch whose parameters are averaged (none: off)"
    )

    def __post_init__(self) -> None:
        given = {f.name: (f.name, getattr(self, f.name)) for f in fields(self)}
        values = _resolve(given, _Origin("RunConfig"))
        for name, value in values.items():
            object.__setattr__(self, name, value)  # frozen: normalize once, here

    def replace(self, **changes: Any) -> RunConfig:
        """A copy with ``changes`` applied and validated (command-line overrides).

        Changing ``hidden`` alone keeps a single activation used by every layer (or the
        default, when there were no hidden layers); a per-layer list must be replaced
        together with ``hidden``. Raises ConfigError naming an unknown field, or the bad
        value, as "override".
        """
        values: dict[str, Any] = {f.name: getattr(self, f.name) for f in fields(self)}
        unknown = [key for key in changes if key not in values]
        if unknown:
            raise ConfigError(_unknown_key_message("override", unknown[0], tuple(values)))
        values.update(changes)
        for per_layer in PER_LAYER_FIELDS:
            if "hidden" in changes and per_layer not in changes:
                # a new depth with one value throughout keeps that value throughout
                distinct = set(getattr(self, per_layer))
                if len(distinct) == 1:
                    values[per_layer] = distinct.pop()
                elif not distinct:
                    values[per_layer] = _DEFAULTS[per_layer]
        given = {name: (name, value) for name, value in values.items()}
        return RunConfig(**_resolve(given, _Origin("override", text=True)))

    @property
    def augments(self) -> bool:
        """Whether the mini-batches are augmented (any of the augment_* moves is on)."""
        return any(getattr(self, name) for name in AUGMENT_MOVES)

    @property
    def resolved_split_seed(self) -> int:
        """The seed of the train/test split and of the validation part: ``split_seed``,
        or ``seed`` when it is not set."""
        return self.seed if self.split_seed is None else self.split_seed

    def to_dict(self) -> dict[str, Any]:
        """Every field, JSON-able (tuples as lists), in declaration order."""
        return {
            f.name: list(v) if isinstance(v := getattr(self, f.name), tuple) else v
            for f in fields(self)
        }


def field_specs() -> dict[str, FieldSpec]:
    """Field name -> :class:`FieldSpec`, in declaration order."""
    return {f.name: f.metadata[_SPEC_KEY] for f in fields(RunConfig)}


_SPECS = field_specs()
_DEFAULTS = {f.name: f.default for f in fields(RunConfig)}
_ALIASES = {alias: name for name, spec in _SPECS.items() for alias in spec.aliases}
#: the original CSV's column names -> field names (d -> total, alpha -> learning_rate, ...)
ALIASES: Mapping[str, str] = MappingProxyType(_ALIASES)
#: the seed format's field names, line 1 first
SEED_LINES: tuple[str, ...] = tuple(
    sorted((n for n, s in _SPECS.items() if s.seed_line), key=lambda n: _SPECS[n].seed_line)
)


# --- resolving raw values -----------------------------------------------------------------

Where = Mapping[str, str] | Callable[[str], "str | None"] | None


@dataclass
class _Origin:
    """Where raw values come from, so that every message can name their location.

    source : the whole input ("run.toml", "grid.csv row 3")
    where  : raw key -> its own location ("run.toml line 4"), a dict or a callable
    keys   : field name -> the key the input used for it ("alpha" for learning_rate)
    text   : strings are text cells to convert (seed lines, CSV cells), not values
    seed   : the seed format: fields are named in words and use their seed kinds
    """

    source: str
    where: Where = None
    keys: dict[str, str] = field(default_factory=dict)
    text: bool = False
    seed: bool = False

    def at(self, name: str | None) -> str:
        """The location of field ``name`` (or of the whole input)."""
        key = self.keys.get(name) if name else None
        return self.at_key(key) if key is not None else self.source

    def at_key(self, key: str) -> str:
        where = self.where
        found = where.get(key) if isinstance(where, Mapping) else where(key) if where else None
        return found or self.source

    def label(self, name: str) -> str:
        return _SPECS[name].label if self.seed else self.keys.get(name, name)


def _type_name(value: Any) -> str:
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, str):
        return "a string"
    if _is_int(value):
        return "an integer"
    if _is_real(value):
        return "a float"
    if isinstance(value, (list, tuple)):
        return "a list"
    if isinstance(value, Mapping):
        return "a table"
    return f"a {type(value).__name__}"


def _parse_value(name: str, raw: Any, origin: _Origin) -> Any:
    spec = _SPECS[name]
    kind = spec.seed_kind if origin.seed and spec.seed_kind else spec.kind
    value = raw
    if origin.text and isinstance(raw, str) and kind.from_text is not None:
        value = kind.from_text(raw)
    try:
        return kind.parse(value)
    except _BadValueError as bad:
        shown = repr(raw)
        if len(shown) > 80:  # a value a megabyte long is not worth repeating
            shown = f"{shown[:60]}... ({len(shown):,} characters)"
        message = f"{origin.at(name)}: {origin.label(name)} must be {kind.expect}, got {shown}"
        # "got 'ten'" says enough for a text cell; "got '1000'" in TOML needs "(a string)"
        if bad.wrong_type and not (origin.text and isinstance(raw, str)):
            message += f" ({_type_name(raw)})"
        if bad.hint:
            message += f"; {bad.hint}"
        raise ConfigError(message) from None


def _check_relations(values: dict[str, Any], origin: _Origin) -> None:
    """Rules between fields; normalizes ``activation`` to one name per hidden layer."""
    hidden, activation = values["hidden"], values["activation"]
    if isinstance(activation, str):
        values["activation"] = (activation,) * len(hidden)
    elif len(activation) != len(hidden):
        raise ConfigError(
            f"{origin.at('activation')}: {origin.label('activation')} lists "
            f"{len(activation)} names for {len(hidden)} hidden layers "
            f"({origin.label('hidden')} = {list(hidden)}); give one name per hidden layer, "
            "or a single name for all"
        )

    dropout = values["dropout"]
    if isinstance(dropout, float):
        values["dropout"] = (dropout,) * len(hidden)
    elif len(dropout) != len(hidden):
        raise ConfigError(
            f"{origin.at('dropout')}: {origin.label('dropout')} lists {len(dropout)} "
            f"probabilities for {len(hidden)} hidden layers; give one per hidden layer, "
            "or a single one for all"
        )
    if values["label_smoothing"] and values["loss"] != "cross_entropy":
        raise ConfigError(
            f"{origin.at('label_smoothing')}: label smoothing smooths the cross-entropy's "
            f"targets; {origin.label('loss')} is {values['loss']!r}"
        )
    augmented = [name for name in AUGMENT_MOVES if values[name]]
    if augmented and values["batch_size"] is None:
        raise ConfigError(
            f"{origin.at(augmented[0])}: augmentation is applied per mini-batch; set batch_size too"
        )
    if values["patience"] is not None and values["validation"] == 0:
        raise ConfigError(
            f"{origin.at('patience')}: early stopping (patience) needs a validation split; "
            "set validation to a fraction such as 0.1"
        )

    _check_average(values, origin)

    total, train, test = values["total"], values["train"], values["test"]
    if values["split"] == "original":
        missing = [n for n in ("total", "train", "test") if values[n] is None]
        if missing:
            raise ConfigError(
                f"{origin.source}: split 'original' needs total, train and test sample "
                f"counts; missing {', '.join(missing)} (or set split = 'standard' to use "
                "the dataset's official training and test parts)"
            )
    if total is not None and train is not None and test is not None and train + test > total:
        lab = origin.label
        raise ConfigError(
            f"{origin.at('test')}: {lab('train')} + {lab('test')} must not exceed "
            f"{lab('total')}, got {train} + {test} = {train + test} > {total}"
        )


def _check_average(values: dict[str, Any], origin: _Origin) -> None:
    """Weight averaging needs epochs to average and is the run's only result (early
    stopping's best parameters would be another). A network with batchnorm needs its
    statistics re-estimated for the mean: the running ones belong to each step's weights."""
    start = values["average_from"]
    if start is None:
        return
    at, label = origin.at("average_from"), origin.label
    if start > values["epochs"]:
        raise ConfigError(
            f"{at}: {label('average_from')} = {start} is after the last epoch "
            f"({label('epochs')} = {values['epochs']}): no epoch would be averaged"
        )
    if values["validation"]:
        raise ConfigError(
            f"{at}: weight averaging and a validation split (early stopping's best "
            f"parameters) each choose the run's result; set {label('validation')} = 0 or "
            "leave average_from out"
        )
    # a layer item's first word is its kind ("batchnorm", "batchnorm momentum=0.1")
    kinds = [item.replace(":", " ").split()[0].lower() for item in values["layers"] or ()]
    if "batchnorm" in kinds and values["batchnorm_stats"] != "recalibrate":
        raise ConfigError(
            f"{at}: averaged weights need batchnorm statistics of their own; set "
            f'{label("batchnorm_stats")} = "recalibrate" (re-estimated after the last epoch)'
        )


def _resolve(given: dict[str, tuple[str, Any]], origin: _Origin) -> dict[str, Any]:
    """field name -> (key used, raw value)  ->  field name -> validated value."""
    origin = replace(origin, keys={name: key for name, (key, _) in given.items()})
    values: dict[str, Any] = {}
    missing = []
    for name, default in _DEFAULTS.items():
        if name in given:
            values[name] = _parse_value(name, given[name][1], origin)
        elif default is MISSING:
            missing.append(name)
        else:
            values[name] = default
    if missing:
        what = "; ".join(f"{n} ({_SPECS[n].label}, {_SPECS[n].kind.expect})" for n in missing)
        raise ConfigError(f"{origin.source}: missing {what}")
    _check_relations(values, origin)
    return values


def _unknown_key_message(location: str, key: str, known: tuple[str, ...]) -> str:
    hint = _suggest(key, known)
    return (
        f"{location}: unknown key {key!r}"
        + (f"; {hint}" if hint else "")
        + f" (known keys: {', '.join(known)})"
    )


def config_from_mapping(
    values: Mapping[str, Any],
    source: str,
    where: Where = None,
    *,
    text: bool = True,
) -> RunConfig:
    """Build a RunConfig from raw values, e.g. one row of an experiment CSV.

    Parameters
    ----------
    values : mapping of str to value
        Field name (or an original CSV alias: d, dtrain, dtest, m, alpha) -> value.
        Absent fields take their defaults; with ``text=True`` an empty string is absent.
    source : str
        The input as a whole, for messages: ``"grid.csv row 3"``.
    where : dict or callable or None
        The location of one key, for messages about that key: ``{"alpha": "grid.csv
        row 3 column alpha"}`` or ``lambda key: ...``; keys it does not know (and
        messages about the input as a whole) fall back to ``source``.
    text : bool
        Strings are text cells to convert (``"100"``, ``"2.5"``, ``"800-800"``). TOML
        passes False: there ``epochs = "1000"`` is a type error.

    Raises
    ------
    ConfigError
        An unknown key (with the closest known one), a key given twice (by name and
        alias), a bad value, a missing required field, or a rule between fields broken.
    """
    origin = _Origin(source, where, text=text)
    known = tuple(_SPECS) + tuple(_ALIASES)
    given: dict[str, tuple[str, Any]] = {}
    for key, raw in values.items():
        name = _ALIASES.get(key, key)
        if name not in _SPECS:
            raise ConfigError(_unknown_key_message(origin.at_key(key), key, known))
        if name in given:
            raise ConfigError(
                f"{origin.at_key(key)}: {given[name][0]!r} and {key!r} both give {name}; keep one"
            )
        if text and isinstance(raw, str) and not raw.strip():
            continue  # an empty CSV cell: use the default
        given[name] = (key, raw)
    return RunConfig(**_resolve(given, origin))


# --- the seed format -----------------------------------------------------------------------


def _seed_layout() -> str:
    return ", ".join(f"{_SPECS[n].seed_line}: {_SPECS[n].label}" for n in SEED_LINES)


def parse_seed_config(text: str, source: str) -> RunConfig:
    """Parse the original 6-line format: one value per line, then an optional ``# note``.

    Blank lines and whole-line comments are skipped; line numbers in messages are
    physical lines of the file. Line 4 is one hidden size m, giving ``hidden = (m,)``.
    Every other field takes its default.
    """
    entries: list[tuple[int, str]] = []
    for lineno, line in enumerate(text.removeprefix("\ufeff").splitlines(), start=1):
        value = line.split("#", 1)[0].strip()
        if value:
            entries.append((lineno, value))
    n = len(SEED_LINES)
    if not entries:
        raise ConfigError(f"{source}: empty config; expected {n} lines ({_seed_layout()})")
    if len(entries) > n:
        lineno, value = entries[n]
        raise ConfigError(
            f"{source} line {lineno}: unexpected value {value!r} after the {n} config lines "
            f"({_seed_layout()}); put notes after '#'"
        )
    if len(entries) < n:
        for lineno, value in entries:  # "1797 1500": two values on one line
            if len(value.split()) > 1:
                shown = value if len(value) <= 60 else value[:57] + "..."
                raise ConfigError(
                    f"{source} line {lineno}: expected one value per line, got "
                    f"{len(value.split())} ({shown!r}); the {n} values go on {n} lines "
                    f"({_seed_layout()})"
                )
        name = SEED_LINES[len(entries)]
        spec = _SPECS[name]
        raise ConfigError(
            f"{source}: line {spec.seed_line} is missing; it should hold the "
            f"{spec.label} ({(spec.seed_kind or spec.kind).expect}); the file has only "
            f"{len(entries)} of {n} lines ({_seed_layout()})"
        )
    pairs = list(zip(SEED_LINES, entries, strict=True))
    lines = {name: f"{source} line {lineno}" for name, (lineno, _) in pairs}
    given = {name: (name, value) for name, (_, value) in pairs}
    origin = _Origin(source, lines, text=True, seed=True)
    return RunConfig(**_resolve(given, origin))


# --- TOML ----------------------------------------------------------------------------------


def _toml_key_lines(text: str, keys: list[str], source: str) -> dict[str, str]:
    """Top-level key (or table name) -> "source line N", found by scanning the text."""
    found: dict[str, str] = {}
    lines = text.splitlines()
    for key in keys:
        name = re.escape(key)
        quoted = rf"(?:{name}|\"{name}\"|'{name}')"
        pattern = re.compile(rf"^\s*(?:{quoted}\s*=|\[+\s*{quoted}\s*[\].])")
        for lineno, line in enumerate(lines, start=1):
            if pattern.match(line):
                found[key] = f"{source} line {lineno}"
                break
    return found


def parse_toml_config(text: str, source: str) -> RunConfig:
    """Parse a TOML config: the fields of :class:`RunConfig`, at the top level."""
    try:
        table = tomllib.loads(text.removeprefix("\ufeff"))
    except RecursionError:
        raise ConfigError(f"{source}: TOML nested too deeply (arrays or tables)") from None
    except tomllib.TOMLDecodeError as err:
        # tomllib puts the position in the message: "... (at line 3, column 5)"
        message = str(err)
        at = re.search(r"\s*\(at line (\d+), column (\d+)\)", message)
        if at:
            reason = message[: at.start()] + message[at.end() :]
            raise ConfigError(
                f"{source} line {at[1]}: TOML syntax error: {reason} (column {at[2]})"
            ) from None
        raise ConfigError(f"{source}: TOML syntax error: {message}") from None
    lines = _toml_key_lines(text, list(table), source)
    return config_from_mapping(table, source, lines, text=False)


def load_config(path: str | Path) -> RunConfig:
    """Read a run config: TOML when the name ends with ``.toml``, else the 6-line format.

    Raises
    ------
    ConfigError
        The file is missing, a folder, a FIFO or a device, larger than
        :data:`~handprop.files.MAX_CONFIG_BYTES`, unreadable, not UTF-8, or malformed.
    """
    from handprop.files import MAX_CONFIG_BYTES, read_regular

    path = Path(path)
    source = str(path)
    try:
        # not a FIFO, a device or a huge file: refused before it is opened
        data = read_regular(path, "config file", MAX_CONFIG_BYTES, ConfigError)
    except FileNotFoundError:
        raise ConfigError(f"{source}: config file not found") from None
    except IsADirectoryError:
        raise ConfigError(f"{source}: is a folder, expected a config file") from None
    except OSError as err:
        if path.is_dir():  # Windows reports a folder as PermissionError
            raise ConfigError(f"{source}: is a folder, expected a config file") from None
        raise ConfigError(f"{source}: cannot read the config ({err.strerror})") from None
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as err:
        line = data[: err.start].count(b"\n") + 1
        raise ConfigError(
            f"{source} line {line}: not UTF-8 text (byte 0x{data[err.start]:02x} at offset "
            f"{err.start}); save the config as UTF-8"
        ) from None
    if path.suffix.lower() == ".toml":
        return parse_toml_config(text, source)
    return parse_seed_config(text, source)


# --- writing TOML --------------------------------------------------------------------------


def to_toml(cfg: RunConfig) -> str:
    """The config as TOML, every field written out; ``load_config`` reads it back equal.

    Fields that are None (not set) are listed as comments first.
    """
    import tomli_w

    unset = [f"# {name} = (not set)  # {spec.label}" for name, spec in _SPECS.items()
             if getattr(cfg, name) is None]  # fmt: skip
    values = {
        name: list(value) if isinstance(value, tuple) else value
        for name in _SPECS
        if (value := getattr(cfg, name)) is not None
    }
    return "\n".join(["# handprop run config", *unset, ""]) + "\n" + tomli_w.dumps(values)
