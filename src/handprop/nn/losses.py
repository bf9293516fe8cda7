"""Losses, each returning (loss, G) with G = dL/d(network output), averaged over the batch.

The average over the batch happens here and only here (G carries the 1/n), so no layer
divides by n again. A shard of a batch split over threads passes the whole batch's
size as ``count``: its loss and G are then its share of the batch's mean, and the
shards' sums are the batch's loss and gradient.
"""

from __future__ import annotations

import numpy as np

from handprop.nn.layers import Array


class Loss:
    """A loss on the network's output and integer labels."""

    kind: str = ""
    #: activation layer the network puts after its last Dense layer for this loss
    output_activation: str | None = None

    def __call__(self, out: Array, y: Array, count: int | None = None) -> tuple[float, Array]:
        """(loss, G) summed over the rows of ``out`` and divided by ``count`` (default:
        the number of rows, the mean)."""
        raise NotImplementedError

    def value(self, out: Array, y: Array) -> float:
        """The loss alone (for evaluation and finite differences)."""
        return self(out, y)[0]

    def probabilities(self, out: Array) -> Array:
        """Class probabilities (n, k) from the network's output (n, k)."""
        raise NotImplementedError


def softmax(Z: Array) -> Array:
    """Row-wise softmax of Z (n, k); the row maximum is subtracted before exp.

    exp(Z - max) <= 1 cannot overflow, and at least one entry per row is exp(0) = 1, so
    the denominator is >= 1 and never underflows to 0: logits like (1000, -1000, 0) give
    (1, 0, 0) with no warning.
    """
    P = Z - Z.max(axis=1, keepdims=True)
    np.exp(P, out=P)
    P /= P.sum(axis=1, keepdims=True)
    return P


class SoftmaxCrossEntropy(Loss):
    """Mean cross-entropy of softmax(Z) against integer labels, fused with softmax.

    Fusing matters twice: the gradient is simply prediction minus target, with no
    softmax Jacobian, and log softmax is computed as (Z - max) - log sum exp (Z - max),
    which stays finite where log(softmax(Z)) would take the log of an underflowed 0.
    """

    kind = "cross_entropy"

    def __call__(self, Z: Array, y: Array, count: int | None = None) -> tuple[float, Array]:
        """
        Parameters
        ----------
        Z : ndarray of shape (n, k)    logits
        y : ndarray of shape (n,)      class ids in [0, k)
        count : int, optional          the n to divide by (default: Z's rows)

        Returns
        -------
        loss : float                   -mean_i log softmax(Z)_i,y_i
        G : ndarray of shape (n, k)    dL/dZ = (softmax(Z) - onehot(y)) / n
        """
        n = Z.shape[0]
        cols = np.arange(n)
        # Work on the (k, n) transpose: with k = 10 classes, reductions over a row of
        # length 10 run element by element, while over the k rows of the transpose
        # they run as whole-vector operations (2.4x faster for 18000 x 10).
        S = Z.T.copy()  # (k, n) logits
        S -= S.max(axis=0)  # shifted: column max 0
        S_y = S[y, cols]  # shifted logit of the true class
        np.exp(S, out=S)
        total = S.sum(axis=0)  # >= 1
        count = n if count is None else count
        loss = float(np.sum(np.log(total) - S_y)) / count
        S /= total  # P^T = softmax(Z)^T
        S[y, cols] -= 1  # P - Y without building Y
        S *= Z.dtype.type(1.0 / count)
        return loss, S.T  # (n, k), a transposed view

    def probabilities(self, Z: Array) -> Array:
        return softmax(Z)


class MeanSquaredError(Loss):
    """L = 1/(2n) sum_i sum_k (A_ik - Y_ik)^2 on sigmoid outputs A, one-hot targets Y.

    The original system's first version. With a sigmoid output the delta picks up a
    factor A(1 - A) that vanishes when an output saturates at the wrong value, which is
    why it learns more slowly than softmax with cross-entropy.
    """

    kind = "mse"
    output_activation = "sigmoid"

    def __call__(self, A: Array, y: Array, count: int | None = None) -> tuple[float, Array]:
        """
        Parameters
        ----------
        A : ndarray of shape (n, k)    network outputs (after the sigmoid)
        y : ndarray of shape (n,)      class ids in [0, k)
        count : int, optional          the n to divide by (default: A's rows)

        Returns
        -------
        loss : float
        G : ndarray of shape (n, k)    dL/dA = (A - Y) / n
        """
        n = A.shape[0]
        G = A.copy()
        G[np.arange(n), y] -= 1  # A - Y
        count = n if count is None else count
        loss = 0.5 * float(np.einsum("ij,ij->", G, G, dtype=np.float64)) / count
        G *= A.dtype.type(1.0 / count)
        return loss, G

    def probabilities(self, A: Array) -> Array:
        """Sigmoid outputs normalised to sum to 1 per row (they are scores, not
        probabilities, until normalised)."""
        total = A.sum(axis=1, keepdims=True)
        return A / np.maximum(total, np.finfo(A.dtype).tiny)


#: loss name -> class; config strings and model files resolve through it
LOSSES: dict[str, type[Loss]] = {cls.kind: cls for cls in (SoftmaxCrossEntropy, MeanSquaredError)}
