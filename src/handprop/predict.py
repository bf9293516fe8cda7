"""Turn user inputs (PNG/JPEG images, IDX or CSV files) into a model's input rows.

A picture is prepared as the model's own training images were, by
:func:`handprop.images.prepare_image` (the preparation the model's ``image_prep`` names).

Every input is opened and checked before the first prediction is made (a bad file
is one clear line, never half a listing), then IDX and CSV rows are normalized and
predicted batch by batch: a raw IDX file is memory-mapped, so a million images cost
no more memory than one batch of them as floats.

Labelled inputs carry their true labels, checked against the model's classes before
the first prediction, so that :class:`Accuracy` can score the predictions: an IDX images
file whose labels file lies beside it (:func:`labels_beside`: t10k-images-idx3-ubyte.gz
and t10k-labels-idx1-ubyte[.gz]) and every CSV file (its first column is the label).
"""

from __future__ import annotations

import gzip
import math
import struct
import zlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from handprop.errors import ConfigError, DataError, ModelFileError
from handprop.images import image_prep, prepare_image
from handprop.memory import check_fits
from handprop.nn import Network

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp"}
#: the file a run folder keeps its model in
MODEL_FILE = "model.npz"
#: rows normalized and predicted at a time (fewer when the network's work arrays ask)
BATCH_ROWS = 4096


def load_model(path: str | Path) -> Network:
    """A saved model: a ``.npz`` file, or a run folder holding ``model.npz``; its image
    preparation is checked too (:func:`handprop.images.image_prep`)."""
    from handprop import nn

    path = Path(path)
    if path.is_dir():
        if not (path / MODEL_FILE).is_file():
            raise ModelFileError(
                f"{path}: a folder without a {MODEL_FILE}; give a run folder or a .npz model file"
            )
        path = path / MODEL_FILE
    net = nn.load(path)
    try:
        image_prep(net.meta)
    except ModelFileError as exc:
        raise ModelFileError(f"{path}: {exc}") from None
    return net


def model_paths(paths: Sequence[str | Path]) -> list[Path]:
    """Model files of ``paths``: a ``.npz`` file or a run folder names one; an
    experiment grid (a folder of run folders) names each of its runs' model.npz."""
    found: list[Path] = []
    for path in map(Path, paths):
        if path.is_dir() and not (path / MODEL_FILE).is_file():
            runs = sorted(p / MODEL_FILE for p in path.iterdir() if (p / MODEL_FILE).is_file())
            if runs:  # a grid: every run that finished
                found += runs
                continue
        found.append(path)
    return found


def input_facts(net: Network) -> tuple[Any, ...]:
    """What the models of an ensemble must share: the input (image shape, or number of
    values, and pixel scale) and the classes."""
    image = tuple(net.meta.get("image_shape") or ())
    values = math.prod(net.input_shape)
    names = tuple(net.meta.get("class_names") or (str(i) for i in range(net.n_classes)))
    return image, values, float(net.meta.get("pixel_max", 255)), names


def describe_input(net: Network) -> str:
    image, values, pixel_max, names = input_facts(net)
    inputs = f"{_shape_text(image)} images" if image else f"{values:,} input values"
    return f"{inputs} (pixel_max {pixel_max:g}) and {len(names)} classes ({', '.join(names)})"


def load_ensemble(paths: Sequence[str | Path], device: Any = "cpu") -> list[Network]:
    """The models of ``paths`` (see :func:`model_paths`), which must agree on their
    input and classes (:func:`input_facts`); ConfigError names the first that does not.
    An MLP and a CNN on the same 28x28 images may go together.

    Model files hold host arrays: each is loaded on the host, then moved to ``device``
    ("cpu", "cuda" or an array namespace; see :meth:`Network.to`)."""
    files = model_paths(paths)
    nets = [load_model(p).to(device) for p in files]
    first = input_facts(nets[0])
    for path, net in zip(files[1:], nets[1:], strict=True):
        if input_facts(net) != first:
            raise ConfigError(
                f"{path}: takes {describe_input(net)}, but {files[0]} takes "
                f"{describe_input(nets[0])}; an ensemble's models must agree on input "
                "shape and classes"
            )
    return nets


# -- inputs ----------------------------------------------------------------------------


@dataclass
class Input:
    """One input file, checked: its rows (n, features), still in the file's own dtype
    and scale (a memory map for a raw IDX file), and the divisor that normalizes them."""

    path: Path
    rows: np.ndarray
    scale: float
    single: bool = False  # one image: named by its path alone
    labels: np.ndarray | None = None  # true class ids (n,) int64, when the input has them
    labels_from: Path | None = None  # the file they came from (the input's own, for CSV)

    @property
    def count(self) -> int:
        return len(self.rows)

    def name(self, i: int) -> str:
        return str(self.path) if self.single else f"{self.path}[{i}]"


def _shape_text(shape: tuple[int, ...]) -> str:
    return "x".join(map(str, shape))


def _check_features(path: Path, sample: tuple[int, ...], net: Network, what: str) -> None:
    features = math.prod(net.input_shape)
    if math.prod(sample) != features:
        image = net.meta.get("image_shape")
        expects = (
            f"{_shape_text(tuple(image))} ({features:,} values)"
            if image
            else f"{features:,} values"
        )
        if what == "rows" and math.prod(sample) + 1 == features:
            # a CSV row is a label, then the pixels: a row of exactly the model's values
            # has none, and its first pixel was read as the label
            raise DataError(
                f"{path}: rows of {features:,} values: the label column is missing (a CSV "
                f"row holds its label first, then the model's {expects})"
            )
        raise DataError(
            f"{path}: {what} of {_shape_text(sample)} ({math.prod(sample):,} values each); "
            f"the model expects {expects}"
        )


def _open_idx(path: Path, net: Network) -> np.ndarray:
    """An IDX file's images as (n, features), checked by its header before any data is
    read: a raw file is memory-mapped, a gzip one read into an array of the size its
    header gives."""
    from handprop.data.idx import GZIP_MAGIC, IDX_DTYPES

    with path.open("rb") as f:
        gz = f.read(2) == GZIP_MAGIC
    with gzip.open(path, "rb") if gz else path.open("rb") as f:
        head = f.read(4)
        if len(head) < 4:
            raise DataError(f"{path}: too short for an IDX header ({len(head)} bytes)")
        if head[0] != 0 or head[1] != 0:
            raise DataError(
                f"{path}: not an image, CSV or IDX file (an IDX file starts with 00 00, "
                f"this one with {head[:2].hex()}); images need a suffix such as .png"
            )
        code, ndim = head[2], head[3]
        if code not in IDX_DTYPES:
            raise DataError(f"{path}: unknown IDX dtype code 0x{code:02x}")
        raw_dims = f.read(4 * ndim)
        if len(raw_dims) < 4 * ndim:
            raise DataError(f"{path}: truncated header ({ndim} dimensions)")
        dims = struct.unpack(f">{ndim}I", raw_dims)
        if ndim < 2:
            raise DataError(f"{path}: holds {'labels' if ndim == 1 else 'one value'}, not images")
        if dims[0] == 0:
            raise DataError(f"{path}: holds no images (dims {_shape_text(dims)})")
        _check_features(path, dims[1:], net, "images")
        dtype = IDX_DTYPES[code]
        count, features = dims[0], math.prod(dims[1:])
        need = count * features * dtype.itemsize
        offset = 4 + 4 * ndim
        if not gz:
            size = path.stat().st_size - offset
            if size != need:
                raise DataError(
                    f"{path}: dims {_shape_text(dims)} need {need:,} data bytes, the file has "
                    f"{size:,}" + (" (truncated)" if size < need else "")
                )
            return np.memmap(path, dtype=dtype, mode="r", offset=offset, shape=(count, features))
        check_fits(need, f"{path}: its {count:,} images of {_shape_text(dims[1:])}")
        rows = np.empty((count, features), dtype=dtype)
        data, done = memoryview(rows).cast("B"), 0
        while done < need:
            got = f.readinto(data[done : done + 2**24])
            if not got:
                raise DataError(
                    f"{path}: truncated: dims {_shape_text(dims)} need {need:,} data bytes, "
                    f"the file has {done:,}"
                )
            done += got
        if f.read(1):
            raise DataError(f"{path}: more data than dims {_shape_text(dims)} need")
        return rows


def _pixel_scale(path: Path, rows: np.ndarray, pixel_max: float) -> float:
    """The divisor that brings the rows to [0, 1]: the model's pixel_max, or 255 for
    8-bit data given to a model trained on a smaller scale. Values outside [0, 255]
    (or [0, pixel_max]) and non-finite ones are refused."""
    if rows.dtype == np.uint8 and pixel_max >= 255:
        return pixel_max
    low, high = math.inf, -math.inf
    step = max(1, 2**24 // max(1, rows.shape[1]))
    for i in range(0, len(rows), step):
        part = rows[i : i + step]
        if part.dtype.kind == "f" and not np.isfinite(part).all():
            raise DataError(f"{path}: holds NaN or infinite pixel values")
        low, high = min(low, float(part.min())), max(high, float(part.max()))
    limit = max(255.0, pixel_max)
    if low < 0 or high > limit:
        raise DataError(f"{path}: pixel values must lie in [0, {limit:g}], got {low:g} to {high:g}")
    return 255.0 if high > pixel_max else pixel_max


def _open_csv(path: Path, net: Network) -> tuple[np.ndarray, np.ndarray]:
    """A CSV file's rows (n, features) and labels (n,): its first column, each a class
    id of the model (a row whose label is not is refused with its line)."""
    from handprop.data import read_csv

    try:
        size = path.stat().st_size
        with path.open("rb") as f:
            first = f.readline(2**20)
            lines = first.count(b"\n") + sum(
                chunk.count(b"\n") for chunk in iter(lambda: f.read(2**24), b"")
            )
    except OSError as exc:
        raise DataError(f"{path}: cannot read ({exc.strerror or exc})") from None
    width = first.count(b",") + 1
    # the reader holds the text, its lines and an int64 array of every cell at once
    check_fits(3 * size + lines * (width * 9 + 64), f"{path}: reading its {lines:,} rows")
    labels, images = read_csv(path, n_classes=net.n_classes)
    _check_features(path, images.shape[1:], net, "rows")
    return images.reshape(len(images), -1), labels


def labels_beside(path: Path) -> Path | None:
    """The labels file that pairs with the IDX images file ``path`` by MNIST's naming:
    "images" -> "labels" and "idx3" -> "idx1" in the file's name, gzip-compressed or not
    (t10k-images-idx3-ubyte.gz -> t10k-labels-idx1-ubyte.gz or t10k-labels-idx1-ubyte);
    None when no such file is there."""
    if "images" not in path.name:
        return None
    name = path.name.replace("images", "labels").replace("idx3", "idx1")
    plain = name.removesuffix(".gz")
    names = (name, plain) if name != plain else (plain, plain + ".gz")
    return next((path.with_name(n) for n in names if path.with_name(n).is_file()), None)


def _open_labels(path: Path, images: Path, count: int, n_classes: int) -> np.ndarray:
    """The labels (n,) int64 of the IDX labels file ``path``, checked against the
    ``count`` images of ``images`` and the model's ``n_classes``: one DataError line
    naming ``path`` otherwise."""
    from handprop.data.idx import read_header, read_idx

    why = f"as the labels file beside {images} it must hold one class id per image"
    h = read_header(path)
    if len(h.dims) != 1:
        raise DataError(f"{path}: dims {h.shape}, not labels; {why}")
    if h.dtype.kind not in "iu":
        raise DataError(f"{path}: {h.dtype.name} values, not class ids; {why}")
    if h.dims[0] != count:
        raise DataError(
            f"{path}: {h.dims[0]:,} labels for the {count:,} images of {images}; a labels "
            "file must hold one class id per image"
        )
    labels = read_idx(path).astype(np.int64)
    bad = np.flatnonzero((labels < 0) | (labels >= n_classes))
    if len(bad):
        first = f"{labels[bad[0]]} (item {bad[0]:,})"
        raise DataError(
            f"{path}: label {first} is not a class id of the model (0 to {n_classes - 1})"
            if len(bad) == 1
            else f"{path}: {len(bad):,} labels are not class ids of the model "
            f"(0 to {n_classes - 1}), the first {first}"
        )
    return labels


def open_inputs(paths: list[str | Path], net: Network) -> list[Input]:
    """Every input opened and checked (existence, format, sizes against the model,
    memory), images prepared; rows are read and normalized later, by :func:`predict_batches`.
    A FIFO, a device or a file over its kind's limit (:mod:`handprop.files`) is refused
    before it is opened."""
    from handprop.files import MAX_CSV_BYTES, MAX_IDX_BYTES, MAX_IMAGE_BYTES, regular_file

    image_shape = tuple(net.meta.get("image_shape") or ())
    pixel_max = float(net.meta.get("pixel_max", 255))
    prep = image_prep(net.meta)
    inputs: list[Input] = []
    for p in map(Path, paths):
        if p.is_dir():
            raise DataError(f"{p}: is a folder; give image, IDX or CSV files")
        if not p.exists():
            raise DataError(f"{p}: no such file")
        try:
            suffix = p.suffix.lower()
            if suffix in IMAGE_SUFFIXES:
                regular_file(p, "image", MAX_IMAGE_BYTES)
            elif suffix == ".csv":
                regular_file(p, "CSV file", MAX_CSV_BYTES)
            else:
                regular_file(p, "IDX file", MAX_IDX_BYTES)
            if suffix in IMAGE_SUFFIXES:
                if len(image_shape) != 2:
                    raise DataError(
                        f"{p}: this model was not trained on images; give IDX or CSV rows"
                    )
                row = prepare_image(p, image_shape, prep=prep).reshape(1, -1)
                row = row.astype(net.dtype)
                inputs.append(Input(p, row, 1.0, single=True))
            elif suffix == ".csv":
                rows, labels = _open_csv(p, net)
                scale = _pixel_scale(p, rows, pixel_max)
                inputs.append(Input(p, rows, scale, labels=labels, labels_from=p))
            else:
                rows = _open_idx(p, net)
                scale = _pixel_scale(p, rows, pixel_max)
                beside = labels_beside(p)
                labels = None
                if beside is not None:
                    labels = _open_labels(beside, p, len(rows), net.n_classes)
                inputs.append(Input(p, rows, scale, labels=labels, labels_from=beside))
        except OSError as exc:
            raise DataError(f"{p}: cannot read ({exc.strerror or exc})") from None
        except (EOFError, zlib.error) as exc:
            raise DataError(f"{p}: truncated or corrupt gzip data ({exc})") from None
    return inputs


@dataclass
class Batch:
    """The probabilities ``P`` (hi - lo, n_classes) of rows [lo, hi) of one input."""

    input: Input
    lo: int
    hi: int
    P: np.ndarray

    @property
    def names(self) -> list[str]:
        return [self.input.name(i) for i in range(self.lo, self.hi)]

    @property
    def labels(self) -> np.ndarray | None:
        """The rows' true class ids, or None when the input has none."""
        labels = self.input.labels
        return None if labels is None else labels[self.lo : self.hi]


def predict_batches(
    inputs: list[Input], net: Network | Sequence[Network]
) -> Iterator[tuple[list[str], np.ndarray]]:
    """(names, probabilities (k, n_classes)) batch by batch over every input's rows
    (:func:`predict_rows`, without the labels)."""
    for batch in predict_rows(inputs, net):
        yield batch.names, batch.P


def predict_rows(inputs: list[Input], net: Network | Sequence[Network]) -> Iterator[Batch]:
    """Every input's rows predicted batch by batch; each batch is converted to the
    network's dtype and normalized only when its turn comes, so memory stays at one
    batch whatever the inputs' size.

    Given several networks (an ensemble, checked by :func:`load_ensemble`), the
    probabilities are the mean of theirs."""
    from handprop.scale import DataParallel

    nets = [net] if isinstance(net, Network) else list(net)
    batch = max(1, min(BATCH_ROWS, *(n.inference_batch() for n in nets)))
    for n in nets:
        n.check_memory(batch, training=False)
    models = [DataParallel(n) for n in nets]  # a large batch goes over every core
    for item in inputs:
        for lo in range(0, item.count, batch):
            hi = min(lo + batch, item.count)
            P = None
            for n, model in zip(nets, models, strict=True):
                X = item.rows[lo:hi].astype(n.dtype)
                if item.scale != 1.0:
                    X /= n.dtype.type(item.scale)
                Pn = model.predict_proba(X.reshape(hi - lo, *n.input_shape), batch_size=batch)
                P = Pn if len(nets) == 1 else Pn.astype(np.float64) if P is None else P + Pn
            if len(nets) > 1:
                P /= len(nets)
            yield Batch(item, lo, hi, P)


class Accuracy:
    """The predictions' accuracy on each labelled input, counted batch by batch."""

    def __init__(self) -> None:
        self._counts: dict[int, list] = {}  # id(input) -> [input, correct, total]

    def add(self, batch: Batch, predicted: np.ndarray) -> None:
        """Count the batch's predicted class ids (hi - lo,) against its labels, if any."""
        if batch.labels is None:
            return
        count = self._counts.setdefault(id(batch.input), [batch.input, 0, 0])
        count[1] += int(np.count_nonzero(predicted == batch.labels))
        count[2] += len(predicted)

    def summary(self) -> dict[str, Any] | None:
        """None when no input had labels; else correct, total and accuracy over all the
        labelled inputs, and ``inputs``: the same for each (with its ``labels`` file)."""
        if not self._counts:
            return None
        inputs = [
            {
                "input": str(item.path),
                "labels": str(item.labels_from),
                "correct": correct,
                "total": total,
                "accuracy": correct / total,
            }
            for item, correct, total in self._counts.values()
        ]
        correct, total = sum(r["correct"] for r in inputs), sum(r["total"] for r in inputs)
        return {"correct": correct, "total": total, "accuracy": correct / total, "inputs": inputs}

    def lines(self) -> list[str]:
        """One line per labelled input, "accuracy: 97.98% (291/297) on FILE" (an IDX
        file's with its labels file), then one for them all when there are several."""
        summary = self.summary()
        if summary is None:
            return []

        def line(r: dict[str, Any], where: str) -> str:
            share = f"{r['correct']:,}/{r['total']:,}"
            return f"accuracy: {100 * r['accuracy']:.2f}% ({share}) on {where}"

        def where(r: dict[str, Any]) -> str:
            own = r["labels"] == r["input"]  # a CSV file's own label column
            return r["input"] if own else f"{r['input']} (labels: {r['labels']})"

        inputs = summary["inputs"]
        lines = [line(r, where(r)) for r in inputs]
        if len(inputs) > 1:
            lines.append(line(summary, f"all {len(inputs)} labelled inputs"))
        return lines


def load_inputs(paths: list[str | Path], net: Network) -> tuple[list[str], np.ndarray]:
    """Names and inputs (n, *net.input_shape) for images, IDX files and CSV files,
    all in memory at once (:func:`open_inputs` and :func:`predict_batches` stream)."""
    inputs = open_inputs(paths, net)
    total = sum(item.count for item in inputs)
    check_fits(
        total * math.prod(net.input_shape) * net.dtype.itemsize,
        f"{total:,} inputs as {net.dtype.name}",
    )
    names = [item.name(i) for item in inputs for i in range(item.count)]
    X = np.empty((total, *net.input_shape), dtype=net.dtype)
    at = 0
    for item in inputs:
        X[at : at + item.count] = (item.rows / item.scale).reshape(item.count, *net.input_shape)
        at += item.count
    return names, X
