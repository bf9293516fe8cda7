"""Convolution and pooling: a nested-loop oracle, gradient checks, ties, a whole CNN.

The layers take and give batch-last images (c, h, w, n); the loop references are
written on sample-first (n, c, h, w) arrays, so the tests move the batch axis with
``batch_last`` on the way in and compare against ``batch_last`` of the references."""

import numpy as np
import pytest

from handprop.errors import ShapeError
from handprop.nn import (
    AvgPool2D,
    Conv2D,
    MaxPool2D,
    Network,
    backend,
    gradcheck,
    gradcheck_layer,
)
from handprop.nn.conv import MaxPoolReLU
from handprop.nn.layers import batch_first, batch_last
from handprop.nn.passes import Pass, Workspace


def training(xp=np):
    """A training pass on ``xp`` with a workspace of its own."""
    return Pass(training=True, xp=xp, work=Workspace())


def conv_naive(X, W, b, stride, pad):
    """Direct cross-correlation, one output value at a time."""
    n, _, h, w = X.shape
    c_out, _, k, _ = W.shape
    Xp = np.pad(X, ((0, 0), (0, 0), (pad, pad), (pad, pad)))
    ho, wo = (h + 2 * pad - k) // stride + 1, (w + 2 * pad - k) // stride + 1
    Z = np.zeros((n, c_out, ho, wo))
    for i in range(n):
        for o in range(c_out):
            for y in range(ho):
                for x in range(wo):
                    patch = Xp[i, :, y * stride : y * stride + k, x * stride : x * stride + k]
                    Z[i, o, y, x] = np.sum(patch * W[o]) + b[o]
    return Z


def bound(layer, rng):
    """A layer with its own parameter arrays (outside a network)."""
    shapes = layer.param_shapes()
    params = {name: rng.normal(size=shape) for name, shape in shapes.items()}
    grads = {name: np.zeros(shape) for name, shape in shapes.items()}
    layer.bind(params, grads)
    return layer


CASES = [(3, 1, 0), (3, 1, 1), (3, 2, 1), (2, 2, 0), (5, 1, 2), (1, 1, 0), (4, 3, 2)]


def conv_backward_naive(X, W, G, stride, pad):
    """dX, dW, db of the cross-correlation by loops over every output value."""
    n, _, h, w = X.shape
    _, _, k, _ = W.shape
    Xp = np.pad(X, ((0, 0), (0, 0), (pad, pad), (pad, pad)))
    dXp, dW = np.zeros_like(Xp), np.zeros_like(W)
    for i in range(n):
        for o in range(W.shape[0]):
            for y in range(G.shape[2]):
                for x in range(G.shape[3]):
                    win = (i, slice(None), slice(y * stride, y * stride + k))
                    win += (slice(x * stride, x * stride + k),)
                    dW[o] += G[i, o, y, x] * Xp[win]
                    dXp[win] += G[i, o, y, x] * W[o]
    return dXp[:, :, pad : pad + h, pad : pad + w], dW, G.sum(axis=(0, 2, 3))


@pytest.mark.parametrize("k, stride, pad", CASES)
def test_conv_matches_the_nested_loop_reference(k, stride, pad, rng):
    layer = bound(Conv2D(3, 4, k, stride, pad), rng)
    X = rng.normal(size=(2, 3, 9, 8))
    want = batch_last(conv_naive(X, layer.W, layer.b, stride, pad))  # (c_out, ho, wo, n)
    np.testing.assert_allclose(layer.forward(batch_last(X)), want, rtol=1e-10, atol=1e-12)
    Z = layer.forward(batch_last(X), training())
    np.testing.assert_allclose(Z, want, 1e-10, 1e-12)


@pytest.mark.parametrize("k, stride, pad", CASES)
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_conv_backward_matches_the_nested_loop_reference(k, stride, pad, dtype, rng):
    layer = Conv2D(3, 4, k, stride, pad)
    W, b = rng.normal(size=(4, 3, k, k)).astype(dtype), rng.normal(size=4).astype(dtype)
    layer.bind({"W": W, "b": b}, {"W": np.zeros_like(W), "b": np.zeros_like(b)})
    X = rng.normal(size=(3, 3, 9, 8))
    ctx = training()
    Z = layer.forward(batch_last(X.astype(dtype)), ctx)
    G = rng.normal(size=Z.shape)  # batch-last, as Z
    dX = layer.backward(G.astype(dtype), ctx)
    assert dX.dtype == layer.dW.dtype == dtype
    assert dX.shape == (3, 9, 8, 3)  # (c_in, h, w, n)
    Gs = batch_first(G)
    Xf, Wf = X.astype(dtype).astype(float), W.astype(float)
    dXs, dW, db = conv_backward_naive(Xf, Wf, Gs, stride, pad)
    tol = 1e-4 if dtype == np.float32 else 1e-10
    for got, ref in zip((dX, layer.dW, layer.db), (batch_last(dXs), dW, db), strict=True):
        np.testing.assert_allclose(got, ref, rtol=tol, atol=tol)


@pytest.mark.parametrize("k, stride, pad", CASES)
def test_conv_backward_matches_central_differences(k, stride, pad, rng):
    X = batch_last(rng.normal(size=(2, 2, 7, 6)))  # (c_in, h, w, n)
    errors = gradcheck_layer(Conv2D(2, 3, k, stride, pad), X, rng)
    assert set(errors) == {"X", "W", "b"}
    assert max(errors.values()) < 1e-6, errors


@pytest.mark.parametrize("cls", [MaxPool2D, AvgPool2D])
@pytest.mark.parametrize("k, stride, size", [(2, None, 6), (3, 2, 7), (2, 1, 5), (3, None, 7)])
def test_pool_backward_matches_central_differences(cls, k, stride, size, rng):
    X = rng.permutation(2 * 3 * size * size).reshape(3, size, size, 2) / 10.0  # distinct
    assert gradcheck_layer(cls(k, stride), X, rng)["X"] < 1e-6


def test_max_pool_forward_and_deterministic_ties():
    X = batch_last(np.array([[[[1.0, 1.0, 0.0, 2.0], [1.0, 0.0, 2.0, 2.0]]]]))  # (1, 2, 4, 1)
    pool, ctx = MaxPool2D(2), training()
    np.testing.assert_array_equal(pool.forward(X, ctx), batch_last(np.array([[[[1.0, 2.0]]]])))
    dX = pool.backward(batch_last(np.array([[[[5.0, 7.0]]]])), ctx)
    # each window gives its whole gradient to its FIRST maximum in row-major order
    want = np.array([[[[5.0, 0, 0, 7.0], [0, 0, 0, 0]]]])
    np.testing.assert_array_equal(dX, batch_last(want))


def max_pool_naive(X, G, k, stride):
    """Max pooling and its gradient by loops: each window's first maximum in row-major
    order gets the window's G."""
    n, c, h, w = X.shape
    ho, wo = (h - k) // stride + 1, (w - k) // stride + 1
    A, dX = np.zeros((n, c, ho, wo)), np.zeros_like(X)
    for idx in np.ndindex(n, c, ho, wo):
        i, ch, y, x = idx
        win = X[i, ch, y * stride : y * stride + k, x * stride : x * stride + k]
        a, b = np.unravel_index(np.argmax(win), win.shape)  # argmax: the first maximum
        A[idx] = win[a, b]
        dX[i, ch, y * stride + a, x * stride + b] += G[idx]
    return A, dX


@pytest.mark.parametrize("k, stride, size", [(2, None, 6), (2, None, 7), (3, 2, 7), (2, 1, 5),
                                             (3, None, 8), (2, 3, 8)])  # fmt: skip
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_max_pool_matches_the_loop_reference_with_many_ties(k, stride, size, dtype, rng):
    pool, ctx = MaxPool2D(k, stride), training()
    for _ in range(2):  # the second pass reuses the work arrays of the first
        X = rng.integers(0, 3, size=(2, 3, size, size)).astype(dtype)  # ties everywhere
        A = pool.forward(batch_last(X), ctx)
        Gs = rng.normal(size=batch_first(A).shape).astype(dtype)  # (n, c, ho, wo)
        G = batch_last(Gs)
        want_A, want_dX = max_pool_naive(X, Gs.astype(float), k, stride or k)
        np.testing.assert_array_equal(A, batch_last(want_A))
        np.testing.assert_allclose(pool.backward(G, ctx), batch_last(want_dX), rtol=1e-6)
        np.testing.assert_array_equal(pool.forward(batch_last(X)), batch_last(want_A))


def test_avg_pool_forward():
    X = batch_last(np.arange(16.0).reshape(1, 1, 4, 4))
    want = batch_last(np.array([[[[2.5, 4.5], [10.5, 12.5]]]]))
    np.testing.assert_array_equal(AvgPool2D(2).forward(X), want)


def test_a_whole_small_cnn_passes_gradcheck(rng):
    net = Network.from_layers(
        [
            "conv 3 3 pad=1",
            "tanh",
            "maxpool 2",
            "conv 4 3",
            "relu",
            "avgpool 2",
            "dense 5",
            "sigmoid",
        ],
        input_shape=(1, 8, 8),
        n_classes=3,
        dtype=np.float64,
        rng=rng,
    )
    X = rng.normal(size=(3, 1, 8, 8))
    y = np.array([0, 1, 2])
    assert gradcheck(net, X, y, n_coords=150, rng=rng) < 1e-6


def test_a_relu_before_a_max_pool_runs_with_the_pool_with_the_same_numbers(rng):
    items = ["conv 3 3 pad=1", "relu", "maxpool 2", "conv 4 3", "relu", "maxpool 2",
             "dense 5", "relu"]  # fmt: skip
    net = Network.from_layers(items, (1, 10, 10), 3, dtype=np.float64, rng=rng)
    pools = [layer for layer in net.layers if isinstance(layer, MaxPool2D)]
    fused = [step for step in net.steps if isinstance(step, MaxPoolReLU)]
    assert [step.pool for step in fused] == pools  # each pool runs with its ReLU
    assert net.passes == [0, 2, 3, 5, 6, 7, 8, 9]  # the ReLUs before a pool (1, 4) are skipped
    # small integers: exact sums, with ties and exact zeros in many windows
    net.params[...] = rng.integers(-2, 3, net.n_params)
    X = rng.integers(0, 2, size=(4, 1, 10, 10)).astype(np.float64)
    y = np.array([0, 1, 2, 0])
    loss, out = net.train_pass(X, y)
    out, grads, probs = out.copy(), net.grads.copy(), net.predict_proba(X)
    assert (grads != 0).any() and (out != 0).any()

    # now every layer runs by itself, in the written order, on the batch-last images
    # the network hands its first layer
    A, ctx = batch_last(X), net.context(training=True)
    for layer in net.layers:
        A = layer.forward(A, ctx)
    want_loss, G = net.loss(A, y)
    for i in range(len(net.layers) - 1, -1, -1):
        G = net.layers[i].backward(G, ctx, need_input_grad=i > 0)
    assert loss == want_loss
    np.testing.assert_array_equal(out, A)
    np.testing.assert_array_equal(grads, net.grads)
    A = batch_last(X)
    for layer in net.layers:
        A = layer.forward(A)
    np.testing.assert_array_equal(probs, net.loss.probabilities(A))


def test_a_cnn_with_a_relu_inside_its_max_pool_passes_gradcheck(rng):
    net = Network.from_layers(
        ["conv 3 3 pad=1", "relu", "maxpool 2", "dense 5"], (1, 6, 6), 3, dtype=np.float64, rng=rng
    )
    assert isinstance(net.steps[1], MaxPoolReLU) and net.steps[1].pool is net.layers[2]
    X, y = rng.normal(size=(3, 1, 6, 6)), np.array([0, 1, 2])
    assert gradcheck(net, X, y, n_coords=120, rng=rng) < 1e-6


def test_cnn_parameters_are_views_and_float32_stays_float32(rng):
    net = Network.from_layers(["conv 4 3", "relu", "maxpool 2"], (1, 8, 8), 10, rng=rng)
    conv = net.layers[0]
    assert np.shares_memory(conv.W, net.params) and np.shares_memory(conv.dW, net.grads)
    assert net.n_params == 4 * 9 + 4 + 4 * 3 * 3 * 10 + 10
    X = net.check_input(rng.uniform(size=(5, 1, 8, 8)))
    loss = net.loss_and_grad(X, np.arange(5))
    assert np.isfinite(loss) and net.grads.dtype == np.float32
    assert net.predict_proba(X).dtype == np.float32


def test_cnn_save_load_round_trip(tmp_path, rng):
    from handprop.nn import load, save

    net = Network.from_layers(["conv 2 3 pad=1", "relu", "maxpool 2"], (1, 6, 6), 4, rng=rng)
    save(net, tmp_path / "cnn.npz")
    back = load(tmp_path / "cnn.npz")
    X = rng.uniform(size=(2, 1, 6, 6))
    np.testing.assert_array_equal(back.predict_proba(X), net.predict_proba(X))


@pytest.mark.parametrize(
    "items, message",
    [
        (["conv 32"], "needs k"),
        (["convolve 32 3"], "unknown layer 'convolve 32 3'"),
        (["conv 8 3 dilation=2"], "unknown setting 'dilation'"),
        (["conv 8 x"], "k must be a number"),
        (["conv 8 30"], "does not fit"),
        (["dense 10", "conv 8 3"], "needs image inputs"),
    ],
)
def test_bad_layer_specs_are_refused(items, message):
    with pytest.raises(ShapeError, match=message):
        Network.from_layers(items, (1, 8, 8), 10)


def test_inference_batches_bound_the_im2col_memory(rng, monkeypatch):
    import handprop.nn.network as network

    net = Network.from_layers(["conv 4 3", "relu", "maxpool 2"], (1, 8, 8), 3, rng=0)
    # per sample: 9 column rows x 36 positions + 4 x 36 outputs = 468 float32 values
    assert net.inference_batch() == 8192  # small: the 8192 cap
    monkeypatch.setattr(network, "INFERENCE_BYTES", 468 * 4 * 5)
    assert net.inference_batch() == 5
    X = rng.random((23, 1, 8, 8)).astype(np.float32)
    np.testing.assert_allclose(net.predict_proba(X), net.predict_proba(X, batch_size=23), 1e-6)


# -- any array namespace (fixture xp: NumPy, array-api-strict, CuPy on a GPU machine) --


def on(xp, layer, params):
    """``layer`` with its own parameter and gradient arrays on ``xp``."""
    layer.bind(
        {name: backend.asarray(value, xp) for name, value in params.items()},
        {name: xp.zeros(tuple(value.shape), dtype=xp.float64) for name, value in params.items()},
    )
    return layer


def passes(layer, X, G, xp):
    """Training forward, backward (twice: the second reuses the work arrays), and an
    inference forward of ``layer`` on ``xp``, with the parameter gradients, on the host."""
    out, ctx = [], training(xp)
    for _ in range(2):
        A = layer.forward(backend.asarray(X, xp), ctx)
        dX = layer.backward(backend.asarray(G, xp), ctx)
        grads = [getattr(layer, "d" + name) for name in layer.param_shapes()]
        out += [backend.to_host(a) for a in (A, dX, *grads)]
    return [*out, backend.to_host(layer.forward(backend.asarray(X, xp), Pass(xp=xp)))]


def im2col_naive(X, k, stride, pad):
    """cols (c k k, ho wo n) of batch-last X (c, h, w, n), one element at a time: row
    (channel, ki, kj), column (y, x, image) holds Xpadded[channel, y s + ki, x s + kj, image]."""
    c, h, w, n = X.shape
    Xp = np.pad(X, ((0, 0), (pad, pad), (pad, pad), (0, 0)))
    ho, wo = (h + 2 * pad - k) // stride + 1, (w + 2 * pad - k) // stride + 1
    cols = np.full((c, k, k, ho, wo, n), np.nan)
    for ch, ki, kj, y, x, i in np.ndindex(c, k, k, ho, wo, n):
        cols[ch, ki, kj, y, x, i] = Xp[ch, y * stride + ki, x * stride + kj, i]
    return cols.reshape(c * k * k, ho * wo * n), ho, wo


def col2im_naive(dcols, shape, k, stride, pad):
    """The adjoint of im2col_naive, one element at a time: each column entry is added
    back onto the input element it was copied from (padding dropped)."""
    c, h, w, n = shape
    ho, wo = (h + 2 * pad - k) // stride + 1, (w + 2 * pad - k) // stride + 1
    D = dcols.reshape(c, k, k, ho, wo, n)
    dXp = np.zeros((c, h + 2 * pad, w + 2 * pad, n))
    for ch, ki, kj, y, x, i in np.ndindex(c, k, k, ho, wo, n):
        dXp[ch, y * stride + ki, x * stride + kj, i] += D[ch, ki, kj, y, x, i]
    return dXp[:, pad : pad + h, pad : pad + w, :]


@pytest.mark.parametrize("k, stride, pad", CASES)
def test_im2col_and_col2im_match_the_element_references_on_any_namespace(k, stride, pad, xp, rng):
    from handprop.nn import conv

    X = batch_last(rng.normal(size=(2, 3, 9, 8)))  # (c, h, w, n) = (3, 9, 8, 2)
    want, ho, wo = im2col_naive(X, k, stride, pad)
    assert (ho, wo) == (conv.out_size(9, k, stride, pad), conv.out_size(8, k, stride, pad))
    cols, ho1, wo1 = conv.im2col(X, k, stride, pad)
    assert (ho1, wo1) == (ho, wo) and cols.shape == (3 * k * k, ho * wo * 2)
    np.testing.assert_array_equal(cols, want)  # copies: exact
    D = rng.normal(size=cols.shape)
    back = conv.col2im(D, X.shape, k, stride, pad)
    assert back.shape == X.shape
    np.testing.assert_allclose(back, col2im_naive(D, X.shape, k, stride, pad), 1e-12, 1e-12)
    # adjoint: <im2col(X), D> = <X, col2im(D)>
    assert np.sum(cols * D) == pytest.approx(np.sum(X * back), rel=1e-12)

    # on xp: the same numbers, with and without arrays to write into, as Conv2D gives
    # them: the columns, the padded input (work) and the padded sum of col2im (filled
    # with NaN, so a value left unwritten or added onto shows)
    Xs, Ds = backend.asarray(X, xp), backend.asarray(D, xp)
    ours, ho2, wo2 = conv.im2col(Xs, k, stride, pad)
    assert (ho2, wo2) == (ho, wo)
    np.testing.assert_array_equal(backend.to_host(ours), cols)
    np.testing.assert_array_equal(backend.to_host(conv.col2im(Ds, X.shape, k, stride, pad)), back)
    padded = (3, 9 + 2 * pad, 8 + 2 * pad, 2)
    buf = xp.full(tuple(cols.shape), float("nan"), dtype=xp.float64)
    work = xp.full(padded, float("nan"), dtype=xp.float64)
    acc = xp.full(padded, float("nan"), dtype=xp.float64)
    for _ in range(2):  # the second pass reuses the arrays of the first
        ours, _, _ = conv.im2col(Xs, k, stride, pad, out=buf, work=work)
        np.testing.assert_array_equal(backend.to_host(ours), cols)
        got = conv.col2im(Ds, X.shape, k, stride, pad, out=acc)
        assert tuple(got.shape) == X.shape
        np.testing.assert_array_equal(backend.to_host(got), back)
        if xp is np:  # the results are in the arrays given
            assert np.shares_memory(ours, buf) and np.shares_memory(got, acc)


@pytest.mark.parametrize("k, stride, pad", CASES)
def test_conv_gives_numpys_numbers_on_any_namespace(k, stride, pad, xp, rng):
    params = {"W": rng.normal(size=(4, 3, k, k)), "b": rng.normal(size=4)}
    X = batch_last(rng.normal(size=(3, 3, 9, 8)))  # (c_in, h, w, n)
    G = rng.normal(size=(*Conv2D(3, 4, k, stride, pad).output_shape((3, 9, 8)), 3))
    ours = passes(on(xp, Conv2D(3, 4, k, stride, pad), params), X, G, xp)
    want = passes(on(np, Conv2D(3, 4, k, stride, pad), params), X, G, np)
    for a, b in zip(ours, want, strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("cls", [MaxPool2D, AvgPool2D])
@pytest.mark.parametrize("k, stride, size", [(2, None, 7), (3, 2, 7), (2, 1, 5), (2, 3, 8)])
def test_pools_give_numpys_numbers_on_any_namespace(cls, k, stride, size, xp, rng):
    """Gaps (stride > k), overlaps (stride < k) and, for max pooling, ties everywhere."""
    X = rng.integers(0, 3, size=(2, 3, size, size)) + rng.normal(0, 0.1, size=(2, 3, 1, 1))
    X = batch_last(X)  # (c, h, w, n)
    G = rng.normal(size=(*cls(k, stride).output_shape((3, size, size)), 2))
    ours = passes(on(xp, cls(k, stride), {}), X, G, xp)
    want = passes(on(np, cls(k, stride), {}), X, G, np)
    for a, b in zip(ours, want, strict=True):
        np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("k, stride", [(2, None), (3, 2), (2, 1), (3, None)])
def test_avg_pool_matches_the_windows_mean(k, stride, rng):
    X = rng.normal(size=(2, 3, 9, 8)).astype(np.float32)
    s = stride or k
    windows = np.lib.stride_tricks.sliding_window_view(X, (k, k), axis=(2, 3))[:, :, ::s, ::s]
    want = windows.mean(axis=(-2, -1), dtype=X.dtype)
    pool = AvgPool2D(k, stride)
    np.testing.assert_allclose(pool.forward(batch_last(X)), batch_last(want), rtol=1e-6)
    np.testing.assert_allclose(pool.forward(batch_last(X), training()), batch_last(want), rtol=1e-6)
