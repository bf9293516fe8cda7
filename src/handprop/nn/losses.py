"""Losses, each returning (loss, G) with G = dL/d(network output), averaged over the batch.

The average over the batch happens here and only here (G carries the 1/n), so no layer
divides by n again. A shard of a batch split over threads passes the whole batch's
size as ``count``: its loss and G are then its share of the batch's mean, and the
shards' sums are the batch's loss and gradient.
"""

from __future__ import annotations

from handprop.nn import backend as ops
from handprop.nn import checks, kernels
from handprop.nn.backend import namespace
from handprop.nn.layers import Array


class Loss:
    """A loss on the network's output and its targets: integer labels (a classification
    loss) or real values (:class:`SquaredError`)."""

    kind: str = ""
    #: activation layer the network puts after its last Dense layer for this loss
    output_activation: str | None = None
    #: whether the targets are class ids (n,); else real values, (n, t) or (n,)
    classifies: bool = True

    def __call__(self, out: Array, y: Array, count: int | None = None) -> tuple[float, Array]:
        """(loss, G) summed over the rows of ``out`` and divided by ``count`` (default:
        the number of rows, the mean). The loss is a float, or on a device a 0-d array
        (:func:`handprop.nn.backend.scalar`: reading it waits for the device)."""
        raise NotImplementedError

    def value(self, out: Array, y: Array) -> float:
        """The loss alone, as a float (for evaluation and finite differences)."""
        return float(self(out, y)[0])

    def probabilities(self, out: Array) -> Array:
        """Class probabilities (n, k) from the network's output (n, k)."""
        raise NotImplementedError


def softmax(Z: Array) -> Array:
    """Row-wise softmax of Z (n, k); the row maximum is subtracted before exp.

    exp(Z - max) <= 1 cannot overflow, and at least one entry per row is exp(0) = 1, so
    the denominator is >= 1 and never underflows to 0: logits like (1000, -1000, 0) give
    (1, 0, 0) with no warning.
    """
    xp = namespace(Z)
    P = Z - xp.max(Z, axis=1, keepdims=True)
    ops.exp(P, out=P)
    P /= xp.sum(P, axis=1, keepdims=True)
    return P


class SoftmaxCrossEntropy(Loss):
    """Mean cross-entropy of softmax(Z) against integer labels, fused with softmax.

    Fusing matters twice: the gradient is simply prediction minus target, with no
    softmax Jacobian, and log softmax is computed as (Z - max) - log sum exp (Z - max),
    which stays finite where log(softmax(Z)) would take the log of an underflowed 0.

    ``smoothing`` (label smoothing, Szegedy et al. 2016): the target of a sample is
    (1 - smoothing) on its class and smoothing / k spread over all k classes, instead
    of one-hot; G is still P - Y. The network is then never pushed to make a logit
    infinitely larger than the rest (a training setting: inference is unchanged).
    """

    kind = "cross_entropy"

    def __init__(self, smoothing: float = 0.0) -> None:
        self.smoothing = checks.in_interval("label smoothing", float(smoothing), 0, 1)

    def __call__(self, Z: Array, y: Array, count: int | None = None) -> tuple[float, Array]:
        """
        Parameters
        ----------
        Z : ndarray of shape (n, k)    logits
        y : ndarray of shape (n,)      class ids in [0, k)
        count : int, optional          the n to divide by (default: Z's rows)

        Returns
        -------
        loss : float                   -mean_i sum_j Y_ij log softmax(Z)_ij
        G : ndarray of shape (n, k)    dL/dZ = (softmax(Z) - Y) / n
        (Y one-hot, or smoothed)
        """
        # (Z - max) - log sum exp (Z - max) per row, and P - Y: kernels.py, the passes
        # over the (k, n) transpose on the CPU, one kernel per row on a GPU
        count = Z.shape[0] if count is None else count
        return kernels.softmax_cross_entropy(Z, y, count, self.smoothing)

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
        G = ops.copy(A)
        ops.add_at_labels(G.T, ops.label_positions(G.T, y), -1.0)  # A - Y
        count = A.shape[0] if count is None else count
        loss = 0.5 * ops.sum_of_squares(G) / count
        G *= 1.0 / count
        return loss, G

    def probabilities(self, A: Array) -> Array:
        """Sigmoid outputs normalised to sum to 1 per row (they are scores, not
        probabilities, until normalised)."""
        xp = namespace(A)
        total = xp.sum(A, axis=1, keepdims=True)
        return A / ops.maximum(total, float(xp.finfo(A.dtype).smallest_normal))


class SquaredError(Loss):
    """L = 1/(2n) sum_i sum_k (Z_ik - Y_ik)^2 on linear outputs Z, real targets Y:
    regression (:class:`handprop.sklearn.HandpropRegressor`).

    Y is (n, t), or (n,): one target per row, for every output (t = 1 for a single
    target). Its "probabilities" are the outputs themselves, the predictions.
    """

    kind = "squared_error"
    classifies = False

    def __call__(self, Z: Array, Y: Array, count: int | None = None) -> tuple[float, Array]:
        """
        Parameters
        ----------
        Z : ndarray of shape (n, t)        network outputs (no output activation)
        Y : ndarray of shape (n, t) or (n,)   targets (cast to Z's dtype)
        count : int, optional              the n to divide by (default: Z's rows)

        Returns
        -------
        loss : float
        G : ndarray of shape (n, t)        dL/dZ = (Z - Y) / n
        """
        G = ops.copy(Z)
        Y = ops.asarray(Y, namespace(Z), dtype=Z.dtype)
        G -= Y if Y.ndim == 2 else Y[:, None]
        count = Z.shape[0] if count is None else count
        loss = 0.5 * ops.sum_of_squares(G) / count
        G *= 1.0 / count
        return loss, G

    def probabilities(self, Z: Array) -> Array:
        return Z


#: loss name -> class; config strings and model files resolve through it
LOSSES: dict[str, type[Loss]] = {
    cls.kind: cls for cls in (SoftmaxCrossEntropy, MeanSquaredError, SquaredError)
}
