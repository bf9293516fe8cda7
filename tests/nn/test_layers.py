"""Every layer's backward pass against central differences, on its own."""

import numpy as np
import pytest

from handprop.nn import ACTIVATIONS, Dense, Flatten, Sigmoid, gradcheck_layer
from handprop.nn.layers import batch_first, batch_last, batch_size
from handprop.nn.passes import Masks, Pass, Workspace


def training(layer=None, mask=None, key=None, n=None, lo=0):
    """A training pass with a workspace; a dropout ``layer``'s pinned ``mask``, or the
    ``key`` of its mask in a batch of ``n`` rows of which these start at ``lo``."""
    masks = None
    if mask is not None:
        masks = Masks({id(layer): mask}, len(mask))
    elif key is not None:
        masks = Masks({id(layer): key}, n, lo)
    return Pass(training=True, work=Workspace(), masks=masks)


@pytest.mark.parametrize("kind", sorted(ACTIVATIONS))
@pytest.mark.parametrize("shape", [(6, 5), (3, 2, 4, 4)])
def test_activation_backward_matches_central_differences(kind, shape, rng):
    X = rng.normal(size=shape)
    if kind == "relu":  # keep inputs away from the kink at 0
        X = np.where(np.abs(X) < 0.05, 0.5, X)
    errors = gradcheck_layer(ACTIVATIONS[kind](), X, rng)
    assert errors["X"] < 1e-6, errors


@pytest.mark.parametrize("d_in, d_out, n", [(5, 3, 7), (1, 1, 1), (12, 9, 4)])
def test_dense_backward_matches_central_differences(d_in, d_out, n, rng):
    errors = gradcheck_layer(Dense(d_in, d_out), rng.normal(size=(n, d_in)), rng)
    assert set(errors) == {"X", "W", "b"}
    assert max(errors.values()) < 1e-6, errors


def test_flatten_round_trips_shape(rng):
    X = batch_last(rng.normal(size=(3, 2, 4, 5)))  # images arrive batch-last: (c, h, w, n)
    layer = Flatten()
    assert layer.output_shape((2, 4, 5)) == (40,)
    ctx = training()
    Y = layer.forward(X, ctx)
    assert Y.shape == (3, 40)
    assert layer.backward(Y, ctx).shape == X.shape
    assert gradcheck_layer(layer, X, rng)["X"] < 1e-6
    # any other input (n, ...): reshaped as it is
    X3 = rng.normal(size=(3, 4, 5))
    Y3 = layer.forward(X3, ctx)
    np.testing.assert_array_equal(Y3, X3.reshape(3, 20))
    np.testing.assert_array_equal(layer.backward(Y3, ctx), X3)


def test_batch_last_and_batch_first_move_the_sample_axis(rng):
    X = rng.normal(size=(5, 3, 4, 2))  # (n, c, h, w)
    B = batch_last(X)
    assert B.shape == (3, 4, 2, 5) and B.flags.c_contiguous
    np.testing.assert_array_equal(B, np.transpose(X, (1, 2, 3, 0)))
    for i in range(5):  # image i is B[..., i]
        np.testing.assert_array_equal(B[..., i], X[i])
    back = batch_first(B)
    assert back.shape == X.shape
    np.testing.assert_array_equal(back, X)
    np.testing.assert_array_equal(batch_last(batch_first(B)), B)
    assert batch_last(X.astype(np.float32)).dtype == np.float32
    assert batch_size(B) == 5  # 4-D: batch-last
    assert batch_size(rng.normal(size=(7, 3))) == 7  # else the first axis
    assert batch_size(rng.normal(size=(6, 2, 3))) == 6


def test_flatten_of_batch_last_images_gives_the_sample_first_rows(rng):
    """Each row of Flatten's output is one image in (c, h, w) order: the rows of the
    sample-first (n, c, h, w) batch reshaped; backward gives back a batch-last gradient."""
    Xs = rng.normal(size=(4, 3, 2, 5))  # (n, c, h, w)
    layer, ctx = Flatten(), training()
    Y = layer.forward(batch_last(Xs), ctx)
    assert Y.shape == (4, 30)
    np.testing.assert_array_equal(Y, Xs.reshape(4, 30))
    np.testing.assert_array_equal(layer.forward(batch_last(Xs)), Xs.reshape(4, 30))  # inference
    Gs = rng.normal(size=(4, 30))
    dX = layer.backward(Gs, ctx)
    assert dX.shape == (3, 2, 5, 4)
    np.testing.assert_array_equal(dX, batch_last(Gs.reshape(4, 3, 2, 5)))


def test_dense_worked_example():
    # Z = X W + b with X = [[1, 2]], W = [[1, 0, -1], [2, 1, 0]], b = [0.5, 0, 0]
    #   = [[1 + 4 + 0.5, 0 + 2, -1 + 0]] = [[5.5, 2, -1]]
    layer = Dense(2, 3)
    W = np.array([[1.0, 0, -1], [2, 1, 0]])
    b = np.array([0.5, 0, 0])
    dW, db = np.zeros_like(W), np.zeros_like(b)
    layer.bind({"W": W, "b": b}, {"W": dW, "b": db})
    X = np.array([[1.0, 2.0]])
    ctx = training()
    np.testing.assert_array_equal(layer.forward(X, ctx), [[5.5, 2, -1]])
    # G = [[1, 0, 1]]: dW = X^T G = [[1, 0, 1], [2, 0, 2]], db = [1, 0, 1],
    # dX = G W^T = [[1 - 1, 2 + 0]] = [[0, 2]]
    dX = layer.backward(np.array([[1.0, 0, 1]]), ctx)
    np.testing.assert_array_equal(dW, [[1, 0, 1], [2, 0, 2]])
    np.testing.assert_array_equal(db, [1, 0, 1])
    np.testing.assert_array_equal(dX, [[0, 2]])


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_sigmoid_extreme_inputs_give_no_overflow_warning(dtype):
    # pyproject turns RuntimeWarning into an error, so an overflow would fail here
    Z = np.array([[-1e4, -1000, -50, 0, 50, 1000, 1e4]], dtype=dtype)
    A = Sigmoid().forward(Z)
    assert A.dtype == dtype
    np.testing.assert_allclose(A[0, [0, 1, 3, 5, 6]], [0, 0, 0.5, 1, 1])
    assert np.all((A >= 0) & (A <= 1))


def test_sigmoid_matches_the_textbook_formula(rng):
    Z = rng.normal(scale=5, size=(20, 3))
    np.testing.assert_allclose(Sigmoid().forward(Z), 1 / (1 + np.exp(-Z)), rtol=1e-10, atol=1e-15)


@pytest.mark.parametrize("kind", sorted(ACTIVATIONS))
def test_activations_keep_float32(kind, rng):
    layer = ACTIVATIONS[kind]()
    X = rng.normal(size=(4, 3)).astype(np.float32)
    ctx = training()
    assert layer.forward(X, ctx).dtype == np.float32
    assert layer.backward(np.ones_like(X), ctx).dtype == np.float32


def test_dropout_backward_with_a_fixed_mask_matches_central_differences(rng):
    from handprop.nn import Dropout

    layer = Dropout(0.4)
    X = rng.normal(size=(6, 5))
    mask = rng.uniform(size=X.shape) >= 0.4
    assert gradcheck_layer(layer, X, rng, mask=mask)["X"] < 1e-6


def test_dropout_is_inverted_and_off_at_inference(rng):
    from handprop.nn import Dropout

    layer = Dropout(0.5)
    X = np.ones((400, 50), dtype=np.float32)
    key = int(np.random.default_rng(0).integers(2**63))
    A = layer.forward(X, training(layer, key=key, n=400))
    assert A.dtype == np.float32
    assert set(np.unique(A)) == {0.0, 2.0}  # kept units scaled by 1 / (1 - p)
    assert A.mean() == pytest.approx(1.0, abs=0.02)  # the expectation is unchanged
    np.testing.assert_array_equal(layer.forward(X), X)


@pytest.mark.parametrize("p", [0.0, 0.1, 0.5, 0.9])
def test_keep_masks_keep_one_minus_p_of_the_entries(p):
    from handprop.nn.layers import keep_mask

    mask = keep_mask(7, p, (2000, 300), 0, 2000)
    assert mask.dtype == bool and mask.shape == (2000, 300)
    kept = mask.mean()
    # 600,000 Bernoulli draws: a standard error of at most 0.00065
    assert kept == pytest.approx(1 - p, abs=0.004)
    # rows, columns and blocks are not correlated: every row and column keeps about as many
    assert np.abs(mask.mean(axis=0) - (1 - p)).max() < 0.06
    assert np.abs(mask.mean(axis=1) - (1 - p)).max() < 0.15


@pytest.mark.parametrize("block", [1, 4, 35, 2**18])
def test_any_rows_of_a_keep_mask_are_those_rows_of_the_whole(block, monkeypatch):
    """A worker's rows [lo, hi) equal the batch's mask at those rows, whatever the block
    size and wherever the rows start and end against the blocks."""
    from handprop.nn import layers

    monkeypatch.setattr(layers, "MASK_BLOCK", block)
    whole = layers.keep_mask(3, 0.4, (23, 2, 3), 0, 23)
    for lo, hi in [(0, 23), (0, 1), (5, 6), (3, 17), (22, 23), (7, 7), (11, 23)]:
        np.testing.assert_array_equal(layers.keep_mask(3, 0.4, (23, 2, 3), lo, hi), whole[lo:hi])
    assert not np.array_equal(layers.keep_mask(4, 0.4, (23, 2, 3), 0, 23), whole)


def test_a_dropout_layer_draws_one_key_per_batch_and_its_rows_of_that_mask():
    from handprop.nn import Dropout, Network
    from handprop.nn.layers import keep_mask

    net = Network([Dropout(0.3)], (4,), dtype=np.float64)
    layer = net.layers[0]
    net.set_rng(np.random.default_rng(11))
    keys = np.random.default_rng(11).integers(2**63, size=2)
    X = np.ones((9, 4))
    for key in keys:  # one batch after another: a key each, from the network's generator
        np.testing.assert_array_equal(
            net.forward(X, training=True) != 0, keep_mask(key, 0.3, X.shape, 0, 9)
        )
    # rows [6, 15) of a batch of 20 under the first key
    ctx = training(layer, key=int(keys[0]), n=20, lo=6)
    np.testing.assert_array_equal(
        layer.forward(X, ctx) != 0, keep_mask(keys[0], 0.3, (20, 4), 6, 15)
    )


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_dropout_training_pass_against_the_mask_by_hand(dtype, rng):
    """Forward and backward (written into reused work arrays) equal X * M / (1 - p)
    and G * M / (1 - p), step after step, in the input's dtype."""
    from handprop.nn import Dropout

    layer = Dropout(0.25)
    for _ in range(2):
        X, G = rng.normal(size=(6, 5)).astype(dtype), rng.normal(size=(6, 5)).astype(dtype)
        mask = rng.random((6, 5)) >= 0.25
        ctx = training(layer, mask=mask)
        A = layer.forward(X, ctx)
        dX = layer.backward(G, ctx)
        assert A.dtype == dX.dtype == dtype
        scale = dtype(1 / 0.75)
        np.testing.assert_allclose(A, X * mask * scale, rtol=1e-6)
        np.testing.assert_allclose(dX, G * mask * scale, rtol=1e-6)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_dropout_on_batch_last_images_uses_the_sample_first_mask_transposed(dtype, rng):
    """Dropout on images (c, h, w, n): the mask is drawn (or pinned) for the sample-first
    shape (n, c, h, w) as for any other input, and used moved to (c, h, w, n)."""
    from handprop.nn import Dropout
    from handprop.nn.layers import keep_mask

    layer = Dropout(0.3)
    scale = dtype(1 / 0.7)
    for _ in range(2):  # the second pass reuses the work arrays of the first
        Xs = rng.normal(size=(4, 3, 5, 2)).astype(dtype)  # (n, c, h, w)
        Gs = rng.normal(size=Xs.shape).astype(dtype)
        mask = rng.random(Xs.shape) >= 0.3  # pinned: sample-first
        ctx = training(layer, mask=mask)
        A = layer.forward(batch_last(Xs), ctx)
        dX = layer.backward(batch_last(Gs), ctx)
        assert A.shape == dX.shape == (3, 5, 2, 4) and A.dtype == dX.dtype == dtype
        np.testing.assert_allclose(A, batch_last(Xs * mask * scale), rtol=1e-6)
        np.testing.assert_allclose(dX, batch_last(Gs * mask * scale), rtol=1e-6)
    # a drawn mask: rows [6, 10) of a batch of 12 under one key, the sample-first rows
    key = int(np.random.default_rng(0).integers(2**63))
    Xs = np.ones((4, 3, 5, 2))
    A = layer.forward(batch_last(Xs), training(layer, key=key, n=12, lo=6))
    want = keep_mask(key, 0.3, (12, 3, 5, 2), 6, 10)
    np.testing.assert_array_equal(A != 0, batch_last(want))
    np.testing.assert_allclose(A, batch_last(want / 0.7), rtol=1e-12)


def test_dropout_on_batch_last_images_passes_a_gradient_check_with_a_pinned_mask(rng):
    from handprop.nn import Dropout

    X = batch_last(rng.normal(size=(3, 2, 4, 4)))  # (c, h, w, n) = (2, 4, 4, 3)
    mask = rng.uniform(size=(3, 2, 4, 4)) >= 0.4  # sample-first (n, c, h, w)
    assert gradcheck_layer(Dropout(0.4), X, rng, mask=mask)["X"] < 1e-6
