"""Turn user inputs (PNG/JPEG images, IDX or CSV files) into a model's input rows.

An image is prepared the way MNIST's digits were: converted to grayscale, inverted if
its background is light (MNIST digits are white on black), cropped to the ink, scaled
so that its longer side fills 20 of 28 pixels (5/7 of the model's image side), and
pasted into the model's image so that its centre of mass lies at the centre.

Every input is opened and checked before the first prediction is made (a bad file
is one clear line, never half a listing), then IDX and CSV rows are normalized and
predicted batch by batch: a raw IDX file is memory-mapped, so a million images cost
no more memory than one batch of them as floats.
"""

from __future__ import annotations

import contextlib
import gzip
import io
import math
import re
import struct
import warnings
import zlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from handprop.errors import (
    ConfigError,
    DataError,
    HandpropError,
    ImageTooLargeError,
    ModelFileError,
)
from handprop.memory import check_fits
from handprop.nn import Network

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp"}
#: the file a run folder keeps its model in
MODEL_FILE = "model.npz"
#: rows normalized and predicted at a time (fewer when the network's work arrays ask)
BATCH_ROWS = 4096


def load_model(path: str | Path) -> Network:
    """A saved model: a ``.npz`` file, or a run folder holding ``model.npz``."""
    from handprop import nn

    path = Path(path)
    if path.is_dir():
        if not (path / MODEL_FILE).is_file():
            raise ModelFileError(
                f"{path}: a folder without a {MODEL_FILE}; give a run folder or a .npz model file"
            )
        path = path / MODEL_FILE
    return nn.load(path)


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


# -- images --------------------------------------------------------------------------


def open_image(source: str | Path | bytes, name: str | None = None, max_pixels: int | None = None):
    """An image opened (header read, pixels not yet decoded) from a file or from bytes;
    Pillow's faults become one DataError line that starts with ``name`` (default: the
    path, or "image" for bytes).

    Raises ImageTooLargeError (a DataError) when the image has more pixels than
    Pillow's decompression-bomb limit or than ``max_pixels``: a small compressed file
    can claim a huge picture, refused before a byte of it is decoded.
    """
    from PIL import Image, UnidentifiedImageError

    if name is None:
        name = "image" if isinstance(source, (bytes, bytearray)) else str(source)
    file = io.BytesIO(source) if isinstance(source, (bytes, bytearray)) else Path(source)
    try:
        with warnings.catch_warnings():
            # an image over Pillow's pixel limit warns (over twice it, raises): refuse both
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            img = Image.open(file)
    except (Image.DecompressionBombWarning, Image.DecompressionBombError) as exc:
        found = re.search(r"\((\d+) pixels\)", str(exc))
        size = f"{int(found[1]):,} pixels" if found else "too many pixels"
        raise ImageTooLargeError(
            f"{name}: the image has {size}, more than the {Image.MAX_IMAGE_PIXELS:,} "
            "handprop reads; scale it down"
        ) from None
    except UnidentifiedImageError:
        raise DataError(f"{name}: not a readable image (not a format Pillow knows)") from None
    except OSError as exc:
        raise DataError(f"{name}: cannot read the image ({exc.strerror or exc})") from None
    pixels = img.size[0] * img.size[1]
    if max_pixels is not None and pixels > max_pixels:
        img.close()
        raise ImageTooLargeError(
            f"{name}: the image has {pixels:,} pixels, more than the {max_pixels:,} "
            "handprop reads; scale it down"
        )
    return img


def _grayscale(img) -> np.ndarray:
    """Image -> float (H, W) in [0, 1]; transparent pixels take the background's place."""
    from PIL import Image

    if img.mode in ("I;16", "I;16L", "I;16B", "I;16N", "I", "F"):
        # 16-bit and float grayscale: convert("L") would clip them, so scale by hand
        gray = np.asarray(img, dtype=np.float64)
        top = 1.0 if img.mode == "F" and gray.max() <= 1 else 255.0
        if img.mode.startswith("I;16") or gray.max() > 255:
            top = 65535.0
        return np.clip(gray / top, 0, 1)
    if img.mode in ("RGBA", "LA", "PA", "RGBa", "La") or "transparency" in img.info:
        # transparent pixels are background: composite onto white (a dark digit on
        # a transparent page) or, if that leaves nothing, onto black (a light digit)
        rgba = img.convert("RGBA")
        for paper in ((255, 255, 255, 255), (0, 0, 0, 255)):
            flat = Image.alpha_composite(Image.new("RGBA", rgba.size, paper), rgba)
            gray = np.asarray(flat.convert("L"), dtype=np.float64) / 255.0
            if gray.max() - gray.min() > 0.05:
                break
        return gray
    return np.asarray(img.convert("L"), dtype=np.float64) / 255.0


def prepare_image(
    source: str | Path | bytes | Any,
    image_shape: tuple[int, int],
    name: str | None = None,
    max_pixels: int | None = None,
) -> np.ndarray:
    """A picture as a float array (H, W) in [0, 1], white digit on black, MNIST-style.

    ``source`` is a file's path, an image file's bytes (an upload) or a PIL image;
    messages start with ``name`` (default: the path, or "image"). ``handprop predict``
    and ``handprop serve`` both prepare their images here.

    Raises DataError naming the file when it is not an image Pillow can read, is too
    large (Pillow's decompression-bomb limit, or more than ``max_pixels``:
    ImageTooLargeError), is truncated, or is blank (one colour: there is no digit to
    read). An animated image is read by its first frame.
    """
    from PIL import Image

    if isinstance(source, Image.Image):
        name = name or "image"
        img, owned = source, False
    else:
        if name is None:
            name = "image" if isinstance(source, (bytes, bytearray)) else str(source)
        img, owned = open_image(source, name, max_pixels), True
    try:
        with img if owned else contextlib.nullcontext(img):
            img.seek(0)  # an animated GIF or a multi-page TIFF: the first frame
            img.load()
            gray = _grayscale(img)
    except HandpropError:
        raise
    except (OSError, SyntaxError, ValueError, EOFError, struct.error, zlib.error) as exc:
        raise DataError(f"{name}: not a readable image ({exc})") from None

    border = np.concatenate([gray[0], gray[-1], gray[:, 0], gray[:, -1]])
    if border.mean() > 0.5:  # dark digit on a light background
        gray = 1.0 - gray
    gray = np.clip((gray - np.median(border if border.mean() <= 0.5 else 1 - border)), 0, None)
    if gray.max() <= 0.05:
        raise DataError(f"{name}: the image is blank (one colour); no digit to read")
    gray /= gray.max()

    ink = np.argwhere(gray > 0.1)
    (top, left), (bottom, right) = ink.min(axis=0), ink.max(axis=0) + 1
    digit = gray[top:bottom, left:right]

    H, W = image_shape
    box = max(1, round(min(H, W) * 20 / 28))
    scale = box / max(digit.shape)
    new_h = max(1, round(digit.shape[0] * scale))
    new_w = max(1, round(digit.shape[1] * scale))
    small = Image.fromarray((digit * 255).astype(np.uint8)).resize(
        (new_w, new_h), Image.Resampling.LANCZOS
    )
    digit = np.asarray(small, dtype=np.float64) / 255.0

    # centre of mass to the image centre, as MNIST was prepared
    total = digit.sum()
    rows, cols = np.indices(digit.shape)
    cy = (rows * digit).sum() / total
    cx = (cols * digit).sum() / total
    top = round(float(H / 2 - cy - 0.5))
    left = round(float(W / 2 - cx - 0.5))
    top = min(max(top, 0), H - new_h)
    left = min(max(left, 0), W - new_w)
    out = np.zeros((H, W))
    out[top : top + new_h, left : left + new_w] = digit
    return out


# -- inputs ----------------------------------------------------------------------------


@dataclass
class Input:
    """One input file, checked: its rows (n, features), still in the file's own dtype
    and scale (a memory map for a raw IDX file), and the divisor that normalizes them."""

    path: Path
    rows: np.ndarray
    scale: float
    single: bool = False  # one image: named by its path alone

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


def _open_csv(path: Path, net: Network) -> np.ndarray:
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
    _, images = read_csv(path)
    _check_features(path, images.shape[1:], net, "rows")
    return images.reshape(len(images), -1)


def open_inputs(paths: list[str | Path], net: Network) -> list[Input]:
    """Every input opened and checked (existence, format, sizes against the model,
    memory), images prepared; rows are read and normalized later, by :func:`predict_batches`."""
    image_shape = tuple(net.meta.get("image_shape") or ())
    pixel_max = float(net.meta.get("pixel_max", 255))
    inputs: list[Input] = []
    for p in map(Path, paths):
        if p.is_dir():
            raise DataError(f"{p}: is a folder; give image, IDX or CSV files")
        if not p.is_file():
            raise DataError(f"{p}: no such file" if not p.exists() else f"{p}: not a regular file")
        try:
            suffix = p.suffix.lower()
            if suffix in IMAGE_SUFFIXES:
                if len(image_shape) != 2:
                    raise DataError(
                        f"{p}: this model was not trained on images; give IDX or CSV rows"
                    )
                row = prepare_image(p, image_shape).reshape(1, -1).astype(net.dtype)
                inputs.append(Input(p, row, 1.0, single=True))
            elif suffix == ".csv":
                rows = _open_csv(p, net)
                inputs.append(Input(p, rows, _pixel_scale(p, rows, pixel_max)))
            else:
                rows = _open_idx(p, net)
                inputs.append(Input(p, rows, _pixel_scale(p, rows, pixel_max)))
        except OSError as exc:
            raise DataError(f"{p}: cannot read ({exc.strerror or exc})") from None
        except (EOFError, zlib.error) as exc:
            raise DataError(f"{p}: truncated or corrupt gzip data ({exc})") from None
    return inputs


def predict_batches(
    inputs: list[Input], net: Network | Sequence[Network]
) -> Iterator[tuple[list[str], np.ndarray]]:
    """(names, probabilities (k, n_classes)) batch by batch over every input's rows;
    each batch is converted to the network's dtype and normalized only when its turn
    comes, so memory stays at one batch whatever the inputs' size.

    Given several networks (an ensemble, checked by :func:`load_ensemble`), the
    probabilities are the mean of theirs."""
    from handprop.nn import DataParallel

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
            yield [item.name(i) for i in range(lo, hi)], P


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
