"""Preprocessing: pixels to floats in [0, 1], and the two ways of splitting a dataset."""

from __future__ import annotations

from typing import Any

import numpy as np

from handprop.errors import DataError


def normalize(images: np.ndarray, pixel_max: float, dtype: Any = np.float32) -> np.ndarray:
    """Rows (n, h * w) of ``dtype`` in [0, 1]: pixels divided by ``pixel_max``.

    Converted straight to ``dtype`` and scaled in place, so 70000 MNIST images never
    pass through a float64 array (which would take 440 MB instead of 220 MB).
    """
    X = np.asarray(images).reshape(len(images), -1).astype(dtype)
    X *= X.dtype.type(1.0 / pixel_max)
    return X


def check_pixels(images: np.ndarray, name: str, pixel_max: float = 255.0) -> None:
    """Refuse pixels that are NaN, infinite or outside [0, ``pixel_max``], naming ``name``
    (a float IDX file may hold anything; dividing garbage by 255 would hide it)."""
    a = np.asarray(images)
    if a.size == 0:
        return
    if a.dtype.kind == "f":
        bad = int(a.size - np.count_nonzero(np.isfinite(a)))
        if bad:
            raise DataError(f"{name}: pixel values must be finite numbers, got {bad} NaN or inf")
    lo, hi = a.min(), a.max()
    if lo < 0 or hi > pixel_max:
        raise DataError(f"{name}: pixel values must lie in [0, {pixel_max:g}], got {lo:g}..{hi:g}")


def original_split(
    n_available: int, d: int, dtrain: int, dtest: int, seed: int
) -> tuple[np.ndarray, np.ndarray]:
    """The original system's split: the first ``d`` samples, permuted by the seed, then
    the first ``dtrain`` of the permutation for training and the next ``dtest`` for
    testing. Returns (train_idx, test_idx), int64 indices into the dataset."""
    for name, value in (("total", d), ("train", dtrain), ("test", dtest)):
        if int(value) != value or value < 1:
            raise DataError(f"{name} must be a positive integer, got {value!r}")
    if d > n_available:
        raise DataError(f"total = {d} samples asked, but the dataset holds {n_available}")
    if dtrain + dtest > d:
        raise DataError(f"train + test must not exceed total, got {dtrain} + {dtest} > {d}")
    perm = np.random.default_rng(seed).permutation(d)
    return perm[:dtrain].astype(np.int64), perm[dtrain : dtrain + dtest].astype(np.int64)


def standard_split(dataset: Any) -> tuple[np.ndarray, np.ndarray]:
    """The dataset's official training and test parts (MNIST: 60000 and 10000)."""
    if dataset.n_train is None:
        raise DataError(
            f"dataset {dataset.name!r} has no official train/test split; "
            "use split = 'original' with total, train and test counts"
        )
    n = len(dataset.labels)
    return np.arange(dataset.n_train, dtype=np.int64), np.arange(dataset.n_train, n, dtype=np.int64)
