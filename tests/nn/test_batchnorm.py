"""Batch normalization: gradients, running averages, split batches, files."""

import numpy as np
import pytest

from handprop.errors import ShapeError
from handprop.nn import (
    GD,
    BatchNorm,
    Network,
    backend,
    gradcheck,
    gradcheck_layer,
    load,
    save,
)
from handprop.nn.batchnorm import BatchSums
from handprop.nn.layers import batch_last
from handprop.nn.passes import Pass, Workspace
from handprop.nn.spec import parse_layer_item
from handprop.scale import DataParallel

DENSE = ["dense 7", "batchnorm", "tanh", "dense 5", "batchnorm", "sigmoid"]
CONV = ["conv 3 3 pad=1", "batchnorm", "tanh", "avgpool 2", "dense 5", "batchnorm", "tanh"]
#: a bias right before batchnorm has a gradient of exactly 0 (the mean subtraction
#: removes it); its differences are ~1e-13 of rounding, compared absolutely below this
FLOOR = 1e-6


def make(items, shape, seed=0, rng=None):
    net = Network.from_layers(items, shape, 3, dtype=np.float64, rng=seed, init="glorot_normal")
    if rng is not None:  # gamma and beta away from 1 and 0
        net.params += rng.normal(0, 0.1, size=net.n_params)
    return net


def layer_input(X):
    """X (n, d) as it is; images (n, c, h, w) batch-last (c, h, w, n), as a layer gets them."""
    return batch_last(X) if X.ndim == 4 else X


@pytest.mark.parametrize("shape", [(9, 5), (4, 3, 5, 6)], ids=["dense", "conv"])
def test_the_layer_passes_a_gradient_check(shape, rng):
    X = layer_input(rng.normal(1.5, 2.0, size=shape))
    errors = gradcheck_layer(BatchNorm(shape[1]), X, rng=1)
    assert max(errors.values()) < 1e-8, errors
    assert errors["running_mean"] == errors["running_var"] == 0  # not trained: dL = 0


@pytest.mark.parametrize("items, shape", [(DENSE, (6,)), (CONV, (2, 6, 6))], ids=["dense", "conv"])
def test_a_network_with_batchnorm_passes_a_gradient_check(items, shape, rng):
    net = make(items, shape, rng=rng)
    X, y = rng.normal(size=(8, *shape)), rng.integers(0, 3, size=8)
    assert gradcheck(net, X, y, floor=FLOOR) < 1e-6


@pytest.mark.parametrize("threads", [2, 3])
@pytest.mark.parametrize("items, shape", [(DENSE, (6,)), (CONV, (2, 6, 6))], ids=["dense", "conv"])
def test_a_batch_split_over_threads_is_normalized_as_a_whole(split_all, threads, items, shape, rng):
    X, y = rng.normal(size=(11, *shape)), rng.integers(0, 3, size=11)
    split_all(1)
    whole = make(items, shape, rng=np.random.default_rng(1))
    loss1, out1 = DataParallel(whole).train_pass(X, y)
    split_all(threads)
    net = make(items, shape, rng=np.random.default_rng(1))
    model = DataParallel(net)
    assert model.split(11, training=True) is not None
    loss, out = model.train_pass(X, y)
    assert loss == pytest.approx(loss1, rel=1e-12)
    np.testing.assert_allclose(out, out1, rtol=1e-10, atol=1e-13)
    np.testing.assert_allclose(net.grads, whole.grads, rtol=1e-9, atol=1e-13)
    # the running averages were updated once, with the whole batch's statistics
    np.testing.assert_allclose(net.params, whole.params, rtol=1e-12, atol=1e-15)
    # nothing of the split pass is left on the layers (its reduction lived in the pass)
    assert not any(isinstance(value, BatchSums) for shard in model.shards(threads)
                   for layer in shard.layers for value in vars(layer).values())  # fmt: skip
    assert gradcheck(model, X, y, floor=FLOOR) < 1e-6


def test_running_averages_follow_pytorch_and_serve_inference(rng):
    net = make(["dense 4", "batchnorm"], (3,))
    bn = net.layers[1]
    X = rng.normal(size=(10, 3))
    Z = net.layers[0].forward(X)
    net.forward(X, training=True)
    # momentum 0.1; the variance in the running average is the unbiased one (n - 1)
    np.testing.assert_allclose(bn.running_mean, 0.1 * Z.mean(axis=0), rtol=1e-12)
    np.testing.assert_allclose(bn.running_var, 0.9 + 0.1 * Z.var(axis=0, ddof=1), rtol=1e-12)
    # training normalizes with the batch's own (biased) variance
    out = bn.forward(Z, net.context(training=True))
    np.testing.assert_allclose(out, (Z - Z.mean(0)) / np.sqrt(Z.var(0) + 1e-5), atol=1e-12)
    # inference with the running averages, not the batch's
    expect = (Z - bn.running_mean) / np.sqrt(bn.running_var + 1e-5) * bn.gamma + bn.beta
    np.testing.assert_allclose(bn.forward(Z), expect, rtol=1e-12)


def test_a_conv_layer_is_normalized_per_channel(rng):
    bn = Network.from_layers(["batchnorm"], (2, 3, 4), 2, dtype=np.float64).layers[0]
    X = rng.normal(3.0, 2.0, size=(5, 2, 3, 4)) * [[[[1.0]], [[3.0]]]]  # (n, c, h, w)
    X[:, 1] += 4.0  # channels far apart: a per-channel mean and variance, not a shared one
    out = bn.forward(batch_last(X), Pass(training=True))  # (c, h, w, n)
    assert out.shape == (2, 3, 4, 5)
    np.testing.assert_allclose(out.mean(axis=(1, 2, 3)), 0, atol=1e-12)
    np.testing.assert_allclose(out.var(axis=(1, 2, 3)), 1, rtol=1e-4)  # eps 1e-5
    mean = X.mean(axis=(0, 2, 3), keepdims=True)
    want = (X - mean) / np.sqrt(X.var(axis=(0, 2, 3), keepdims=True) + 1e-5)
    np.testing.assert_allclose(out, batch_last(want), rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("ranks", [2, 3])
def test_mpi_ranks_normalize_with_the_whole_batch(ranks, rng, thread_ranks):
    X, y = rng.normal(size=(13, 2, 6, 6)), rng.integers(0, 3, size=13)
    alone = DataParallel(make(CONV, (2, 6, 6)))
    for _ in range(3):
        alone.train_pass(X, y)
        GD(0.3).step(alone.params, alone.grads)
    world, results = thread_ranks(ranks), {}

    def rank(r: int) -> None:
        model = DataParallel(make(CONV, (2, 6, 6)), world.rank(r))
        for _ in range(3):
            model.train_pass(X, y)
            GD(0.3).step(model.params, model.grads)
        results[r] = model.params.copy()

    world.run(rank)
    assert sorted(results) == list(range(ranks))
    for params in results.values():  # weights and running averages alike
        np.testing.assert_allclose(params, alone.params, rtol=1e-10, atol=1e-13)


def test_a_failing_shard_releases_the_others(split_all, rng, monkeypatch):
    split_all(2)
    net = make(DENSE, (6,))
    model = DataParallel(net)
    X, y = rng.normal(size=(10, 6)), rng.integers(0, 3, size=10)
    model.train_pass(X, y)  # makes the shards
    shard = model.shards(2)[1]

    def broken(X, ctx=None):
        raise MemoryError("shard 1 is out of memory")

    monkeypatch.setattr(shard.layers[0], "forward", broken)
    with pytest.raises(MemoryError, match="shard 1"):
        model.train_pass(X, y)


def test_save_and_load_keep_the_running_averages_bit_exactly(tmp_path, rng):
    net = make([CONV[0], "batchnorm momentum=0.25", *CONV[2:]], (2, 6, 6), rng=rng)
    assert net.layers[1].momentum == 0.25  # a float setting survives the JSON
    net.forward(rng.normal(size=(7, 2, 6, 6)), training=True)
    save(net, tmp_path / "m.npz")
    back = load(tmp_path / "m.npz")
    np.testing.assert_array_equal(back.params, net.params)
    assert back.layers[1].running_var is not None and back.layers[1].momentum == 0.25
    X = rng.normal(size=(4, 2, 6, 6))
    np.testing.assert_array_equal(back.predict_proba(X), net.predict_proba(X))


def test_layer_items_and_errors():
    assert parse_layer_item("batchnorm") == ("batchnorm", {})
    assert parse_layer_item("batchnorm momentum=0.01 eps=1e-3") == (
        "batchnorm",
        {"momentum": 0.01, "eps": 1e-3},
    )
    with pytest.raises(ShapeError, match="momentum must be in"):
        Network.from_layers(["dense 4", "batchnorm momentum=0"], (3,), 2)
    with pytest.raises(ShapeError, match=r"batchnorm over 4 features expects"):
        Network([BatchNorm(4)], (3,))


# -- any array namespace (fixture xp: NumPy, array-api-strict, CuPy on a GPU machine) --


def bn_on(xp, c, dtype, rng_seed=3, momentum=0.3):
    """A BatchNorm layer on ``xp`` with its own arrays: gamma, beta away from 1 and 0,
    running averages away from 0 and 1."""
    rng = np.random.default_rng(rng_seed)
    values = {
        "gamma": rng.normal(1.0, 0.3, size=c),
        "beta": rng.normal(0.0, 0.3, size=c),
        "running_mean": rng.normal(size=c),
        "running_var": rng.uniform(0.5, 2.0, size=c),
    }
    layer = BatchNorm(c, momentum=momentum)
    layer.bind(
        {k: backend.asarray(v.astype(dtype), xp) for k, v in values.items()},
        {k: backend.asarray(np.zeros(c, dtype=dtype), xp) for k in values},
    )
    return layer


def bn_passes(layer, X, G, xp, batch_sums=None):
    """Two training passes (the running averages move twice), backward after each, and
    an inference pass; everything on the host. ``batch_sums``: the training passes'."""
    out, ctx = [], Pass(training=True, xp=xp, work=Workspace(), batch_sums=batch_sums)
    for step in range(2):
        A = layer.forward(backend.asarray(X + step, xp), ctx)
        dX = layer.backward(backend.asarray(G, xp), ctx)
        grads = [getattr(layer, "d" + name) for name in layer.param_shapes()]
        params = [getattr(layer, name) for name in layer.param_shapes()]
        out += [np.array(backend.to_host(a)) for a in (A, dX, *grads, *params)]  # copies
    return [*out, backend.to_host(layer.forward(backend.asarray(X, xp), Pass(xp=xp)))]


@pytest.mark.parametrize("shape", [(9, 5), (4, 5, 3, 6)], ids=["dense", "conv"])
@pytest.mark.parametrize("dtype", [np.float64, np.float32])
def test_batchnorm_gives_numpys_numbers_on_any_namespace(shape, dtype, xp, rng):
    X = layer_input(rng.normal(1.5, 2.0, size=shape).astype(dtype))
    G = layer_input(rng.normal(size=shape).astype(dtype))
    ours = bn_passes(bn_on(xp, shape[1], dtype), X, G, xp)
    want = bn_passes(bn_on(np, shape[1], dtype), X, G, np)
    tol = 1e-12 if dtype == np.float64 else 1e-5
    for a, b in zip(ours, want, strict=True):
        assert a.dtype == b.dtype == dtype
        np.testing.assert_allclose(a, b, rtol=tol, atol=tol)


def test_ranks_share_the_statistics_on_any_namespace(xp, rng, thread_ranks):
    """Two MPI ranks (threads here), each one BatchNorm on its rows, arrays of ``xp``:
    their sums go through the host to the world's Allreduce and back."""
    X, G = batch_last(rng.normal(size=(7, 3, 4, 4))), batch_last(rng.normal(size=(7, 3, 4, 4)))
    want = bn_passes(bn_on(np, 3, np.float64), X, G, np)
    # each rank's images: its part of the last axis of the batch-last (c, h, w, n) arrays
    world, halves, results = thread_ranks(2), [np.s_[..., 0:3], np.s_[..., 3:7]], {}

    def rank(r: int) -> None:
        layer = bn_on(xp, 3, np.float64)
        sums = BatchSums(1, world.rank(r)).hook(0)  # one shard: the sums go over the ranks
        mine = [np.ascontiguousarray(A[halves[r]]) for A in (X, G)]  # as a shard gets them
        results[r] = bn_passes(layer, *mine, xp, batch_sums=sums)

    world.run(rank)
    assert sorted(results) == [0, 1]
    per_step = len(want) // 2  # A, dX, 4 gradients, 4 parameters
    for step in range(2):
        at = step * per_step
        for r in range(2):  # each rank's own rows of A and dX
            np.testing.assert_allclose(results[r][at], want[at][halves[r]], rtol=1e-10, atol=1e-12)
            np.testing.assert_allclose(
                results[r][at + 1], want[at + 1][halves[r]], rtol=1e-9, atol=1e-12
            )
        # the gradients are each rank's part; the running averages are the whole batch's
        for i in range(at + 2, at + 6):
            np.testing.assert_allclose(
                results[0][i] + results[1][i], want[i], rtol=1e-10, atol=1e-12
            )
        for i in range(at + 6, at + per_step):
            np.testing.assert_allclose(results[0][i], want[i], rtol=1e-12)
            np.testing.assert_allclose(results[1][i], want[i], rtol=1e-12)
