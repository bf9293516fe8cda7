"""handprop.data: reading MNIST-style datasets, locating, downloading, verifying, splitting.

``load_dataset(name)`` looks for the files in ``data_dir``, then ``$HANDPROP_DATA``,
then the user cache, then system locations, and downloads them (verified) when none
has them. See :mod:`handprop.data.registry` for the datasets known.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from handprop.data.csvfile import read_csv
from handprop.data.fetch import cache_dir, check_file, locate, no_data_message
from handprop.data.fetch import download as fetch_files
from handprop.data.idx import idx_bytes, parse_idx, read_idx, write_idx
from handprop.data.prep import normalize, original_split, standard_split
from handprop.data.registry import DATASETS, Dataset, DatasetSpec, FileSpec
from handprop.errors import DataError

__all__ = [
    "DATASETS",
    "Dataset",
    "DatasetSpec",
    "FileSpec",
    "cache_dir",
    "check_file",
    "fetch_files",
    "get_spec",
    "idx_bytes",
    "load_dataset",
    "normalize",
    "original_split",
    "parse_idx",
    "read_csv",
    "read_idx",
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
    """Load a registered dataset; see the module docstring for where it is looked for."""
    spec = get_spec(name)
    if spec.builtin:
        return _load_digits(spec)
    found = locate(spec, data_dir)
    if found is None:
        if data_dir is not None:
            missing = ", ".join(f.name + "[.gz]" for f in spec.files)
            raise DataError(f"{data_dir}: does not hold the {name} files ({missing})")
        if not download:
            raise DataError(no_data_message(spec, "downloading is off"))
        fetch_files(spec, progress=progress)
        found = locate(spec, None)
        if found is None:  # pragma: no cover - download() verified every file
            raise DataError(no_data_message(spec, "the download left no files"))
    _, directory, paths = found
    verify_files(spec, paths)
    train_x, train_y, test_x, test_y = (read_idx(p) for p in paths)
    for images, labels, part in ((train_x, train_y, "train"), (test_x, test_y, "test")):
        if images.ndim != 3 or labels.ndim != 1 or len(images) != len(labels):
            raise DataError(
                f"{directory}: {part} images {images.shape} and labels {labels.shape} "
                "do not match (expected (n, h, w) and (n,))"
            )
    k = len(spec.class_names)
    labels = np.concatenate([train_y, test_y]).astype(np.int64)
    if labels.min() < 0 or labels.max() >= k:
        raise DataError(
            f"{directory}: labels must lie in [0, {k}), got {labels.min()}..{labels.max()}"
        )
    return Dataset(
        name=name,
        images=np.concatenate([train_x, test_x]),
        labels=labels,
        class_names=spec.class_names,
        image_shape=tuple(train_x.shape[1:]),
        pixel_max=255.0,
        n_train=len(train_y),
        source=str(directory),
        files={f.name: str(p) for f, p in zip(spec.files, paths, strict=True)},
    )


def verify_files(spec: DatasetSpec, paths: list[Path]) -> None:
    """Refuse files whose content fails the dataset's pinned checksums.

    MNIST and Fashion-MNIST share their file names, so a name alone would let one be
    trained on as the other; checking costs a fraction of a second.
    """
    for f, path in zip(spec.files, paths, strict=True):
        ok, why = check_file(path, f)
        if ok is False:
            raise DataError(f"{path}: not the published {spec.name} file: {why}")


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
