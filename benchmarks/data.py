"""MNIST for the benchmarks, through ``handprop.data``: the 60000 official training
images first, then the 10000 test images, scaled to [0, 1] as float32."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from benchmarks.common import REPO_ROOT


def default_data_dir() -> Path:
    """``$HANDPROP_DATA``, else ``../shared/data/mnist`` next to the repository."""
    env = os.environ.get("HANDPROP_DATA")
    return Path(env) if env else REPO_ROOT.parent / "shared" / "data" / "mnist"


@dataclass
class Mnist:
    """All 70000 MNIST samples, flattened and normalized.

    X : float32 (70000, 784) in [0, 1]     y : int64 (70000,)
    n_train : how many leading samples are the official training part (60000)
    source : how it was loaded, for the notes
    """

    X: np.ndarray
    y: np.ndarray
    n_train: int
    source: str

    @property
    def train(self) -> tuple[np.ndarray, np.ndarray]:
        return self.X[: self.n_train], self.y[: self.n_train]

    @property
    def test(self) -> tuple[np.ndarray, np.ndarray]:
        return self.X[self.n_train :], self.y[self.n_train :]


def _read_handprop(folder: Path) -> Mnist:
    from handprop.data import load_dataset, normalize

    ds = load_dataset("mnist", data_dir=str(folder), progress=False)
    X = normalize(ds.images, ds.pixel_max)
    X = np.ascontiguousarray(X.reshape(len(X), -1), dtype=np.float32)
    y = np.asarray(ds.labels, dtype=np.int64)
    n_train = int(ds.n_train) if getattr(ds, "n_train", None) else 60000
    return Mnist(X, y, n_train, f"{ds.source} (handprop.data)")


def load_mnist(folder: Path) -> tuple[Mnist | None, str]:
    """MNIST from ``folder``, or None with the reason it could not be loaded.

    The cases that need it are then skipped with that reason.
    """
    from handprop.errors import HandpropError

    try:
        return _read_handprop(Path(folder)), ""
    except HandpropError as exc:
        return None, str(exc)
