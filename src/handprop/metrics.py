"""Classification metrics from true and predicted class ids, NumPy only.

Training writes these into every run's ``metrics.json`` without importing scikit-learn
(which would double the memory of a training run); ``handprop evaluate`` recomputes them
from ``predictions.csv``, and the tests hold them equal to scikit-learn's.

A class that is never predicted has precision 0/0; like scikit-learn's
``zero_division=0`` it is defined as 0, and no division warning is raised.
"""

from __future__ import annotations

from typing import Any

import numpy as np


def confusion_matrix(y_true: np.ndarray, y_pred: np.ndarray, k: int) -> np.ndarray:
    """C (k, k) int64: C[i, j] = number of samples of true class i predicted as j."""
    C = np.bincount(np.asarray(y_true) * k + np.asarray(y_pred), minlength=k * k)
    return C.reshape(k, k).astype(np.int64)


def _ratio(num: np.ndarray, den: np.ndarray) -> np.ndarray:
    """num / den elementwise, 0 where den == 0."""
    out = np.zeros(num.shape, dtype=np.float64)
    np.divide(num, den, out=out, where=den != 0)
    return out


def per_class(C: np.ndarray) -> dict[str, np.ndarray]:
    """Precision, recall, F1 and support (k,) from a confusion matrix (k, k)."""
    tp = np.diag(C).astype(np.float64)
    predicted = C.sum(axis=0)
    support = C.sum(axis=1)
    precision = _ratio(tp, predicted)
    recall = _ratio(tp, support)
    f1 = _ratio(2 * precision * recall, precision + recall)
    return {"precision": precision, "recall": recall, "f1": f1, "support": support}


def classification_metrics(
    y_true: np.ndarray, y_pred: np.ndarray, class_names: list[str] | tuple[str, ...]
) -> dict[str, Any]:
    """Accuracy, per-class and averaged precision/recall/F1, confusion matrix (JSON-able).

    ``macro`` averages the classes equally; ``weighted`` weights them by support.
    """
    k = len(class_names)
    y_true = np.asarray(y_true, dtype=np.int64)
    y_pred = np.asarray(y_pred, dtype=np.int64)
    C = confusion_matrix(y_true, y_pred, k)
    pc = per_class(C)
    n = int(C.sum())
    weights = pc["support"] / n if n else np.zeros(k)
    averages = {
        "macro": {m: float(pc[m].mean()) for m in ("precision", "recall", "f1")},
        "weighted": {m: float(pc[m] @ weights) for m in ("precision", "recall", "f1")},
    }
    return {
        "accuracy": float(np.trace(C) / n) if n else 0.0,
        "n": n,
        "class_names": list(class_names),
        "per_class": {m: pc[m].tolist() for m in ("precision", "recall", "f1", "support")},
        "averages": averages,
        "confusion_matrix": C.tolist(),
    }


def top_confusions(C: np.ndarray, top: int = 5) -> list[tuple[int, int, int]]:
    """The ``top`` most frequent (true, predicted, count) pairs off the diagonal,
    by count descending, then by (true, predicted) for ties."""
    C = np.asarray(C)
    pairs = [
        (i, j, int(C[i, j]))
        for i in range(C.shape[0])
        for j in range(C.shape[1])
        if i != j and C[i, j]
    ]
    pairs.sort(key=lambda p: (-p[2], p[0], p[1]))
    return pairs[:top]
