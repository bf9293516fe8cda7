"""Pictures (PNG, JPEG, ...) made into a model's input images.

A picture is prepared the way the model's own training images were (``IMAGE_PREPS``,
named in the model's metadata as ``image_prep``): converted to grayscale, inverted if
its background is light (the datasets hold light digits on black), cropped to the ink,
then either

- ``mnist``: scaled so that its longer side fills 20 of 28 pixels (5/7 of the model's
  image side) and pasted so that its centre of mass lies at the centre, as MNIST's
  digits were; or
- ``fill``: scaled, by averaging blocks of pixels, so that it fills the frame (its
  height, or its width if that binds), and centred by mass along the other side, as
  scikit-learn's 8x8 digits (32x32 bitmaps counted in 4x4 blocks) and Fashion-MNIST's
  pictures were.

``handprop predict`` (:mod:`handprop.predict`) and ``handprop serve`` both prepare their
pictures here.
"""

from __future__ import annotations

import contextlib
import io
import re
import struct
import warnings
import zlib
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


#: the EXIF tag that says how a camera's pixels must be turned to stand upright
EXIF_ORIENTATION = 0x0112


def _upright(img):
    """The picture as it is meant to be seen: a camera keeps its pixels as the sensor
    read them and says in the EXIF Orientation tag how to turn them (a phone held
    upright writes a landscape JPEG tagged 6, "turn 90 degrees clockwise"), so the tag
    is applied. An EXIF block Pillow cannot parse is ignored: the pixels as stored."""
    from PIL import ImageOps

    try:
        orientation = img.getexif().get(EXIF_ORIENTATION, 1)
    except (OSError, SyntaxError, ValueError, KeyError, TypeError, struct.error):
        return img
    return ImageOps.exif_transpose(img) if orientation in range(2, 9) else img


def _grayscale(img, name: str = "image") -> np.ndarray:
    """Image -> float (H, W) in [0, 1]; transparent pixels take the background's place.
    DataError, starting with ``name``, for a float image holding NaN or infinities."""
    from PIL import Image

    if img.mode in ("I;16", "I;16L", "I;16B", "I;16N", "I", "F"):
        # 16-bit and float grayscale: convert("L") would clip them, so scale by hand
        gray = np.asarray(img, dtype=np.float64)
        if not np.isfinite(gray).all():  # a float TIFF's: no scale or ink to read
            raise DataError(f"{name}: holds NaN or infinite pixel values")
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


#: how a picture becomes a dataset's image: a model's ``image_prep``, and what it means
IMAGE_PREPS = {
    "mnist": "the digit scaled into a 20x20 box of 28x28, centred by its mass (as MNIST)",
    "fill": "the digit scaled to fill the frame, centred by its mass (as the 8x8 digits)",
}


def image_prep(meta: dict[str, Any]) -> str:
    """A model's image preparation: its ``image_prep``, or, for a model saved before
    models recorded it, its dataset's; "mnist" when neither is known. ModelFileError
    for a name that is not in ``IMAGE_PREPS``."""
    from handprop.data import DATASETS

    prep = meta.get("image_prep")
    if prep is None:
        known = DATASETS.get(meta.get("dataset"))  # type: ignore[arg-type]
        return known.image_prep if known else "mnist"
    if prep not in IMAGE_PREPS:
        raise ModelFileError(
            f"the model's image_prep is {prep!r:.40}; known: {', '.join(IMAGE_PREPS)}"
        )
    return prep


def prepare_image(
    source: str | Path | bytes | Any,
    image_shape: tuple[int, int],
    name: str | None = None,
    max_pixels: int | None = None,
    prep: str = "mnist",
) -> np.ndarray:
    """A picture as a float array (H, W) in [0, 1], white digit on black, prepared as
    ``prep`` says (a key of ``IMAGE_PREPS``; see the module docstring).

    ``source`` is a file's path, an image file's bytes (an upload) or a PIL image;
    messages start with ``name`` (default: the path, or "image"). ``handprop predict``
    and ``handprop serve`` both prepare their images here.

    Raises DataError naming the file when it is not an image Pillow can read, is too
    large (Pillow's decompression-bomb limit, or more than ``max_pixels``:
    ImageTooLargeError), is truncated, or is blank (one colour: there is no digit to
    read) or holds NaN or infinite pixel values (a float TIFF). An animated image is
    read by its first frame; a camera's EXIF orientation is applied (:func:`_upright`).
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
            gray = _grayscale(_upright(img), name)
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
    digit = Image.fromarray((gray[top:bottom, left:right] * 255).astype(np.uint8))
    H, W = image_shape
    if prep == "mnist":
        # the longer side fills 20/28 of the frame, smoothly resampled; the centre of
        # mass on pixel (14, 14) of 28x28, where MNIST's lies (13.996, 14.004 on average)
        box = max(1, round(min(H, W) * 20 / 28))
        return _centred(digit, image_shape, (box, box), Image.Resampling.LANCZOS, (H / 2, W / 2))
    if prep == "fill":
        # the frame filled, each pixel the average of the block it covers; the centre of
        # mass midway between the middle pixels, where the 8x8 digits' lies (3.57 of 0..7);
        # strokes as broad as theirs
        centre = ((H - 1) / 2, (W - 1) / 2)
        digit = _broadened(digit, FILL_STROKE * max(digit.size))
        return _centred(digit, image_shape, (H, W), Image.Resampling.BOX, centre)
    raise ConfigError(f"unknown image preparation {prep!r}; known: {', '.join(IMAGE_PREPS)}")


#: the 8x8 digits' strokes are this broad for the digit's longer side (their median;
#: 0.13 to 0.20 for 80% of them), twice 2 area / boundary of their ink
FILL_STROKE = 0.15


def stroke_width(ink: np.ndarray) -> float:
    """The mean width of the strokes of a boolean picture, in pixels: a stroke of width
    t and length L has area t L and about 2 L boundary pixels."""
    inside = np.pad(ink, 1)
    inner = inside[:-2, 1:-1] & inside[2:, 1:-1] & inside[1:-1, :-2] & inside[1:-1, 2:]
    return 2 * ink.sum() / max(1, (ink & ~inner).sum())


def _broadened(digit, width: float):
    """The digit (a PIL image) with its strokes broadened to about ``width`` pixels
    (a max filter), if they are narrower: a fine pen's digit drawn as a broad pen's."""
    from PIL import ImageFilter, ImageOps

    size = 2 * round((width - stroke_width(np.asarray(digit) > 127)) / 2) + 1
    if size < 3:
        return digit
    return ImageOps.expand(digit, size // 2).filter(ImageFilter.MaxFilter(size))


def _centred(
    digit, image_shape: tuple[int, int], box: tuple[int, int], resample, centre: tuple[float, float]
) -> np.ndarray:
    """The cropped digit (a PIL image) scaled to fit ``box`` (height, width), its shape
    kept, and pasted into a black ``image_shape`` with its centre of mass on ``centre``
    (row, column) as far as the frame allows: a side that fills the frame stays put."""
    (H, W), (w, h) = image_shape, digit.size
    scale = min(box[0] / h, box[1] / w)
    small = digit.resize((max(1, round(w * scale)), max(1, round(h * scale))), resample)
    small = np.asarray(small, dtype=np.float64) / 255.0
    rows, cols = np.indices(small.shape)
    cy = (rows * small).sum() / small.sum()
    cx = (cols * small).sum() / small.sum()
    top = min(max(round(float(centre[0] - cy)), 0), H - small.shape[0])
    left = min(max(round(float(centre[1] - cx)), 0), W - small.shape[1])
    out = np.zeros((H, W))
    out[top : top + small.shape[0], left : left + small.shape[1]] = small
    return out
