import numpy as np
import pytest

from handprop.errors import ConfigError
from handprop.nn import (
    LOSSES,
    MeanSquaredError,
    SoftmaxCrossEntropy,
    numeric_gradient,
    relative_error,
    softmax,
)

LOSS_CLASSES = [SoftmaxCrossEntropy, MeanSquaredError]


@pytest.mark.parametrize("cls", LOSS_CLASSES)
def test_loss_gradient_matches_central_differences(cls, rng):
    out = rng.normal(size=(6, 4))
    if cls is MeanSquaredError:
        out = 1 / (1 + np.exp(-out))  # sigmoid outputs
    y = rng.integers(0, 4, size=6)
    loss = cls()
    _, G = loss(out, y)
    numeric = numeric_gradient(lambda: loss.value(out, y), out)
    assert relative_error(G, numeric) < 1e-6


def test_softmax_is_stable_for_huge_logits():
    Z = np.array([[1000.0, -1000.0, 0.0], [-1000.0, -1000.0, -1000.0]])
    P = softmax(Z)
    np.testing.assert_allclose(P, [[1, 0, 0], [1 / 3, 1 / 3, 1 / 3]])
    loss, G = SoftmaxCrossEntropy()(Z, np.array([0, 2]))
    # row 0: -log 1 = 0; row 1: -log(1/3) = log 3; mean = log(3) / 2
    assert loss == pytest.approx(np.log(3) / 2)
    assert np.all(np.isfinite(G))
    # the wrong class with a gap of 2000 gives a finite loss of about 2000
    loss, _ = SoftmaxCrossEntropy()(Z[:1], np.array([1]))
    assert loss == pytest.approx(2000)


def test_cross_entropy_gradient_is_p_minus_y_over_n():
    Z = np.array([[0.0, 0.0], [np.log(3), 0.0]])
    y = np.array([0, 1])
    loss, G = SoftmaxCrossEntropy()(Z, y)
    # P = [[1/2, 1/2], [3/4, 1/4]]; Y = [[1, 0], [0, 1]]; n = 2
    np.testing.assert_allclose(G, [[-0.25, 0.25], [0.375, -0.375]])
    assert loss == pytest.approx((np.log(2) + np.log(4)) / 2)


@pytest.mark.parametrize("smoothing", [0.1, 0.5])
def test_smoothed_cross_entropy_gradient_matches_central_differences(smoothing, rng):
    Z, y = rng.normal(size=(6, 4)) * 3, rng.integers(0, 4, size=6)
    loss = SoftmaxCrossEntropy(smoothing)
    value, G = loss(Z, y)
    assert relative_error(G, numeric_gradient(lambda: loss.value(Z, y), Z)) < 1e-6
    # the textbook: targets (1 - e) one-hot + e / k, loss -mean sum Y log P, G = (P - Y) / n
    Y = (1 - smoothing) * np.eye(4)[y] + smoothing / 4
    P = softmax(Z)
    assert value == pytest.approx(-(Y * np.log(P)).sum() / 6)
    np.testing.assert_allclose(G, (P - Y) / 6)
    # the lowest loss is at P = Y, not at an infinite logit gap
    logits = np.log(Y)
    _, G_at_targets = loss(logits, y)
    np.testing.assert_allclose(G_at_targets, 0, atol=1e-15)


def test_label_smoothing_is_a_probability_below_1():
    with pytest.raises(ConfigError, match=r"label smoothing must be in \[0, 1\), got 1.0"):
        SoftmaxCrossEntropy(1.0)
    assert SoftmaxCrossEntropy(0.0)(np.zeros((2, 3)), np.array([0, 1]))[0] == pytest.approx(
        np.log(3)
    )


def test_mse_value_and_gradient():
    A = np.array([[0.5, 0.25]])
    loss, G = MeanSquaredError()(A, np.array([1]))
    # (A - Y) = [0.5, -0.75]; L = (0.25 + 0.5625) / 2 = 0.40625
    assert loss == pytest.approx(0.40625)
    np.testing.assert_allclose(G, [[0.5, -0.75]])


@pytest.mark.parametrize("cls", LOSS_CLASSES)
def test_losses_keep_float32(cls, rng):
    out = rng.uniform(size=(5, 3)).astype(np.float32)
    loss, G = cls()(out, rng.integers(0, 3, size=5))
    assert G.dtype == np.float32
    assert isinstance(loss, float)
    assert cls().probabilities(out).dtype == np.float32


@pytest.mark.parametrize("loss", ["cross_entropy", "mse"])
def test_a_count_divides_instead_of_the_rows(loss, rng):
    """A shard of a split batch divides by the whole batch's n: its share of the mean."""
    out, y = rng.uniform(0.05, 0.95, size=(6, 4)), rng.integers(0, 4, size=6)
    mean_loss, G = LOSSES[loss]()(out, y)
    share, G_share = LOSSES[loss]()(out, y, count=18)
    assert share == pytest.approx(mean_loss * 6 / 18, rel=1e-12)
    np.testing.assert_allclose(G_share, G * 6 / 18, rtol=1e-12)
