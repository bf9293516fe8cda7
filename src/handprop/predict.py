"""Turn user inputs (PNG/JPEG images, IDX or CSV files) into a model's input rows.

An image is prepared the way MNIST's digits were: converted to grayscale, inverted if
its background is light (MNIST digits are white on black), cropped to the ink, scaled
so that its longer side fills 20 of 28 pixels (5/7 of the model's image side), and
pasted into the model's image so that its centre of mass lies at the centre.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from handprop.errors import DataError
from handprop.nn import Network

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp"}


def prepare_image(path: str | Path, image_shape: tuple[int, int]) -> np.ndarray:
    """A picture as a float array (H, W) in [0, 1], white digit on black, MNIST-style."""
    from PIL import Image, UnidentifiedImageError

    path = Path(path)
    try:
        with Image.open(path) as img:
            img.load()
            if img.mode in ("RGBA", "LA", "P"):
                # transparent pixels count as background: composite onto white
                rgba = img.convert("RGBA")
                white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
                img = Image.alpha_composite(white, rgba)
            gray = np.asarray(img.convert("L"), dtype=np.float64) / 255.0
    except (UnidentifiedImageError, OSError) as exc:
        raise DataError(f"{path}: not a readable image ({exc})") from None

    border = np.concatenate([gray[0], gray[-1], gray[:, 0], gray[:, -1]])
    if border.mean() > 0.5:  # dark digit on a light background
        gray = 1.0 - gray
    gray = np.clip((gray - np.median(border if border.mean() <= 0.5 else 1 - border)), 0, None)
    if gray.max() <= 0.05:
        raise DataError(f"{path}: the image is blank; no digit to read")
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


def load_inputs(paths: list[str | Path], net: Network) -> tuple[list[str], np.ndarray]:
    """Names and inputs (n, *net.input_shape) for images, IDX files and CSV files."""
    from handprop.data import read_csv, read_idx

    image_shape = tuple(net.meta.get("image_shape") or ())
    pixel_max = float(net.meta.get("pixel_max", 255))
    names: list[str] = []
    rows: list[np.ndarray] = []
    for p in map(Path, paths):
        if not p.is_file():
            raise DataError(f"{p}: no such file")
        suffix = p.suffix.lower()
        if suffix in IMAGE_SUFFIXES:
            if len(image_shape) != 2:
                raise DataError(f"{p}: this model was not trained on images; give IDX or CSV rows")
            names.append(str(p))
            rows.append(prepare_image(p, image_shape).reshape(1, -1))
        elif suffix == ".csv":
            _, images = read_csv(p)
            images = images.reshape(len(images), -1)
            names += [f"{p}[{i}]" for i in range(len(images))]
            # CSV pixels are on the scale of the data the model was trained on
            rows.append(images / pixel_max)
        else:
            images = read_idx(p)
            if images.ndim == 1:
                raise DataError(f"{p}: holds labels, not images")
            images = images.reshape(len(images), -1).astype(np.float64)
            names += [f"{p}[{i}]" for i in range(len(images))]
            rows.append(images / (255.0 if images.max() > pixel_max else pixel_max))
    features = int(np.prod(net.input_shape))
    X = np.concatenate(rows) if rows else np.zeros((0, features))
    if X.shape[1] != features:
        raise DataError(f"the inputs have {X.shape[1]} values each, the model expects {features}")
    # a CNN takes (n, 1, h, w) images: a reshape of the contiguous rows, not a copy
    return names, X.reshape(len(X), *net.input_shape)
