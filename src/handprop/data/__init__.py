"""handprop.data: reading MNIST-style datasets, locating, downloading, verifying, splitting.

``load_dataset(name)`` looks for the files in ``data_dir``, then ``$HANDPROP_DATA``,
then the user cache, then system locations, and downloads them (verified) when none
has them. A copy in that order whose files fail verification is skipped, said so in
one line on stderr, for the next place. See :mod:`handprop.data.registry` for the
datasets known.
"""

from __future__ import annotations

import hashlib
import sys
from pathlib import Path

import numpy as np

from handprop.data.csvfile import read_csv
from handprop.data.fetch import (
    cache_dir,
    check_file,
    copies,
    failure,
    find_file,
    locate,
    no_data_message,
    not_in_dir_message,
)
from handprop.data.fetch import download as fetch_files
from handprop.data.idx import (
    IdxHeader,
    UnreadableFileError,
    idx_bytes,
    parse_idx,
    read_header,
    read_idx,
    read_idx_bytes,
    write_idx,
)
from handprop.data.prep import check_pixels, normalize, original_split, standard_split
from handprop.data.registry import DATASETS, Dataset, DatasetSpec, FileSpec
from handprop.errors import DataError
from handprop.memory import check_fits

__all__ = [
    "DATASETS",
    "Dataset",
    "DatasetSpec",
    "FileSpec",
    "IdxHeader",
    "UnreadableFileError",
    "cache_dir",
    "check_file",
    "check_pixels",
    "fetch_files",
    "find_file",
    "get_spec",
    "idx_bytes",
    "load_dataset",
    "normalize",
    "original_split",
    "parse_idx",
    "read_csv",
    "read_header",
    "read_idx",
    "read_idx_bytes",
    "standard_split",
    "verify_files",
    "write_idx",
]


def get_spec(name: str) -> DatasetSpec:
    if name not in DATASETS:
        raise DataError(f"unknown dataset {name!r}; known: {', '.join(DATASETS)}")
    return DATASETS[name]


def load_dataset(
    name: str, data_dir: str | Path | None = None, *, download: bool = True, progress: bool = True
) -> Dataset:
    """Load a registered dataset; see the module docstring for where it is looked for.

    A copy in ``data_dir`` that fails verification is refused; one found in the lookup
    order (``HANDPROP_DATA``, the cache, system folders) is skipped for the next, with
    a line on stderr ("handprop: skipped DIR: its FILE fails verification (why)"). When
    every copy fails, the first one's fault is raised (and nothing is downloaded).
    """
    spec = get_spec(name)
    if spec.builtin:
        return _load_digits(spec)
    skipped: list[tuple[Path, str]] = []  # folders holding another dataset's files
    failed: list[tuple[str, DataError]] = []  # copies failing verification
    for how, directory, paths in copies(spec, data_dir, skipped):
        try:
            arrays = _read_verified(spec, paths)
        except DataError as exc:  # unreadable too; a ResourceError is the machine's
            why = None if how == "--data-dir" else failure(spec, paths)
            if why is None:
                raise
            failed.append((f"handprop: skipped {directory}: {why}\n", exc))
            continue
        for note, _ in failed:
            sys.stderr.write(note)
        return _dataset(spec, directory, paths, arrays)
    if failed:  # no copy to use instead: the first one's fault, and what to do
        exc = failed[0][1]
        how = "" if _how_on(spec) in str(exc) else _how_on(spec)
        raise type(exc)(f"{exc}{how}") from None
    if data_dir is not None:
        raise DataError(not_in_dir_message(spec, data_dir, skipped))
    if not download:
        raise DataError(no_data_message(spec, "downloading is off"))
    fetch_files(spec, progress=progress)
    found = locate(spec, None)
    if found is None:  # pragma: no cover - download() verified every file
        raise DataError(no_data_message(spec, "the download left no files"))
    _, directory, paths = found
    return _dataset(spec, directory, paths, _read_verified(spec, paths))


def _dataset(
    spec: DatasetSpec, directory: Path, paths: list[Path], arrays: list[np.ndarray]
) -> Dataset:
    train_x, train_y, test_x, test_y = arrays
    name = spec.name
    return Dataset(
        name=name,
        images=np.concatenate([train_x, test_x]),
        labels=np.concatenate([train_y, test_y]).astype(np.int64),
        class_names=spec.class_names,
        image_shape=tuple(train_x.shape[1:]),
        pixel_max=255.0,
        n_train=len(train_y),
        source=str(directory),
        files={f.name: str(p) for f, p in zip(spec.files, paths, strict=True)},
    )


def _how_on(spec: DatasetSpec) -> str:
    """What to do about a copy that fails verification."""
    return (
        f"; use another folder (--data-dir DIR or HANDPROP_DATA), or `handprop data fetch "
        f"{spec.name}` to download a verified copy into the cache"
    )


def verify_files(spec: DatasetSpec, paths: list[Path]) -> None:
    """Refuse files whose content fails the dataset's pinned checksums.

    MNIST and Fashion-MNIST share their file names, so a name alone would let one be
    trained on as the other; checking costs a fraction of a second.
    """
    for f, path in zip(spec.files, paths, strict=True):
        status, why = check_file(path, f)
        if status == "UNREADABLE":
            raise UnreadableFileError(f"{path}: {why}")
        if status != "OK":
            raise DataError(f"{path}: not the published {spec.name} file: {why}{_how_on(spec)}")


def _read_verified(spec: DatasetSpec, paths: list[Path]) -> list[np.ndarray]:
    """Train images, train labels, test images, test labels: their headers checked
    against each other, then their content against the pinned checksums, then parsed."""
    headers = [read_header(p) for p in paths]
    check_layout(paths, headers)
    for f, path, h in zip(spec.files, paths, headers, strict=True):
        if not f.sha256:  # never used unverified
            raise DataError(f"{path}: no checksum is pinned for {spec.name}; it cannot be used")
        if f.size is not None and h.size != f.size:  # refused before a byte of data is read
            raise DataError(
                f"{path}: not the published {spec.name} file: its header announces "
                f"{h.size} bytes of content (dims {h.shape}), expected {f.size}{_how_on(spec)}"
            )
    check_fits(2 * sum(h.size for h in headers), f"loading {spec.name} from {paths[0].parent}")
    arrays = []
    for f, path in zip(spec.files, paths, strict=True):
        content = read_idx_bytes(path)
        digest = hashlib.sha256(content).hexdigest()
        if digest != f.sha256:
            raise DataError(
                f"{path}: not the published {spec.name} file: "
                f"sha256 of the content is {digest}, expected {f.sha256}{_how_on(spec)}"
            )
        arrays.append(parse_idx(content, str(path)))
    k = len(spec.class_names)
    for labels, path in zip(arrays[1::2], paths[1::2], strict=True):
        if labels.min() < 0 or labels.max() >= k:
            raise DataError(
                f"{path}: labels must lie in [0, {k}), got {labels.min()}..{labels.max()}"
            )
    return arrays


def check_layout(paths: list[Path], headers: list[IdxHeader]) -> None:
    """Images (n, h, w) of bytes, as many labels (n,), train and test images of one size."""
    for images, labels, ip, lp in ((*headers[0:2], *paths[0:2]), (*headers[2:4], *paths[2:4])):
        if len(images.dims) != 3:
            raise DataError(f"{ip}: images must have dims (n, height, width), got {images.shape}")
        if images.dtype.kind != "u" or images.dtype.itemsize != 1:
            raise DataError(f"{ip}: pixels must be bytes (IDX type 0x08), got {images.dtype.name}")
        if images.dims[0] == 0:
            raise DataError(f"{ip}: holds no images (dims {images.shape})")
        if min(images.dims) == 0:
            raise DataError(f"{ip}: images must be at least 1x1 pixels, got dims {images.shape}")
        if len(labels.dims) != 1 or labels.dtype.kind not in "iu":
            raise DataError(
                f"{lp}: labels must be one integer per image, "
                f"got dims {labels.shape} of {labels.dtype.name}"
            )
        if labels.dims[0] != images.dims[0]:
            raise DataError(
                f"{lp}: holds {labels.dims[0]} labels for the {images.dims[0]} images of {ip}"
            )
    train, test = headers[0].dims[1:], headers[2].dims[1:]
    if train != test:
        raise DataError(
            f"{paths[2]}: test images are {headers[2].shape}, but the training images "
            f"in {paths[0]} are {headers[0].shape}: they must have the same size"
        )


def _load_digits(spec: DatasetSpec) -> Dataset:
    from sklearn.datasets import load_digits  # bundled with scikit-learn: always offline

    bunch = load_digits()
    return Dataset(
        name=spec.name,
        images=bunch.images.astype(np.uint8),
        labels=bunch.target.astype(np.int64),
        class_names=spec.class_names,
        image_shape=(8, 8),
        pixel_max=16.0,
        n_train=None,
        source="scikit-learn",
    )
