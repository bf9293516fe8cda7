"""Batches split over threads (and ranks): the same numbers as one thread, whatever
the count."""

import itertools
import threading

import numpy as np
import pytest

import handprop.scale.parallel as parallel_module
from handprop.errors import ConfigError, ShapeError
from handprop.nn import GD, Dropout, Network, gradcheck
from handprop.nn import threads as threads_module
from handprop.nn.threads import bounds, get_threads, rowwise, set_threads, side_by_side
from handprop.scale import DataParallel


def mlp(rng_seed=0, loss="cross_entropy", dropout=0.0):
    return Network.from_spec(
        "12-9-7-4",
        activation=["sigmoid", "tanh"],
        loss=loss,
        init="glorot_normal",
        dtype=np.float64,
        rng=rng_seed,
        dropout=dropout,
    )


def cnn(rng_seed=0):
    items = ["conv 3 3 pad=1", "relu", "maxpool 2", "conv 4 2", "avgpool 2"]
    items += ["dense 6", "dropout 0.4"]
    return Network.from_layers(items, (2, 8, 8), 3, dtype=np.float64, rng=rng_seed)


def one_step(net, X, y, seed=5):
    """Forward (training), loss, backward with dL/dX; the dropout masks come from ``seed``."""
    net.set_rng(np.random.default_rng(seed))
    out = net.forward(X, training=True)
    loss, G = net.loss(out, y)
    dX = net.backward(G, input_grad=True)
    return out.copy(), loss, net.grads.copy(), dX.copy()


@pytest.mark.parametrize("threads", [2, 3])
@pytest.mark.parametrize(
    "make, shape, k",
    [
        (lambda: mlp(dropout=0.3), (12,), 4),
        (lambda: mlp(loss="mse"), (12,), 4),
        (cnn, (2, 8, 8), 3),
    ],
    ids=["mlp-dropout", "mlp-mse", "cnn"],
)
def test_a_split_pass_gives_what_one_thread_gives(split_all, threads, make, shape, k, rng):
    X, y = rng.normal(size=(11, *shape)), rng.integers(0, k, size=11)
    split_all(1)
    whole = make()
    expected = one_step(whole, X, y)
    split_all(threads)
    model = DataParallel(make())
    assert model.split(11, training=True) == bounds(11, threads)
    model.net.set_rng(np.random.default_rng(5))
    loss, out = model.train_pass(X, y)
    assert len(model.shards(threads)) == threads
    assert loss == pytest.approx(expected[1], rel=1e-12)
    np.testing.assert_allclose(out, expected[0], rtol=1e-12)
    np.testing.assert_allclose(model.grads, expected[2], rtol=1e-12, atol=1e-14)
    # the inference pass splits too, and agrees
    np.testing.assert_allclose(model.predict_proba(X), whole.predict_proba(X), rtol=1e-12)


def test_a_split_network_passes_gradcheck(split_all, rng):
    split_all(2)
    # smooth everywhere: finite differences must not step across a ReLU or max kink
    items = ["conv 3 3 pad=1", "tanh", "avgpool 2", "conv 4 2", "sigmoid", "dense 6", "tanh"]
    net = Network.from_layers(items, (2, 8, 8), 3, dtype=np.float64, rng=0)
    net.params += rng.normal(0, 0.1, size=net.n_params)
    X, y = rng.normal(size=(6, 2, 8, 8)), rng.integers(0, 3, size=6)
    model = DataParallel(net)
    assert model.split(6, training=True) is not None
    assert gradcheck(model, X, y) < 1e-6


def test_pinned_dropout_masks_are_handed_to_the_shards_by_rows(split_all, rng):
    split_all(2)
    net = mlp(dropout=0.5)
    drop = next(i for i, layer in enumerate(net.layers) if isinstance(layer, Dropout))
    mask = rng.uniform(size=(8, 9)) >= 0.5
    net.pin_masks({drop: mask})
    X, y = rng.normal(size=(8, 12)), rng.integers(0, 4, size=8)
    net.set_rng(np.random.default_rng(5))  # the other dropout layer draws as one_step does
    loss = DataParallel(net).loss_and_grad(X, y)
    grads = net.grads.copy()
    assert net.pinned == {drop: mask} and net.pinned[drop] is mask  # the pin is left in place
    split_all(1)
    _, loss1, grads1, _ = one_step(net, X, y)
    assert loss == pytest.approx(loss1, rel=1e-12)
    np.testing.assert_allclose(grads, grads1, rtol=1e-12, atol=1e-15)


@pytest.mark.parametrize("mask_block", [2**18, 50])
def test_training_steps_on_two_threads_follow_one_thread(mask_block, split_all, rng, monkeypatch):
    """Mask blocks of one row or of whole batches: a shard draws its rows either way."""
    import handprop.nn.layers as layers_module

    monkeypatch.setattr(layers_module, "MASK_BLOCK", mask_block)  # 50: 2-6 rows a block
    X, y = rng.normal(size=(40, 12)), rng.integers(0, 4, size=40)
    params = {}
    for threads in (1, 2):
        split_all(threads)
        model, opt = DataParallel(mlp(dropout=0.2)), GD(0.5)
        for step in range(5):
            model.net.set_rng(np.random.default_rng(step))
            model.train_pass(X, y)
            opt.step(model.params, model.grads)  # in place: the shards see the new weights
        params[threads] = model.params
    np.testing.assert_allclose(params[2], params[1], rtol=1e-10, atol=1e-13)


@pytest.mark.parametrize("ranks", [2, 3])
@pytest.mark.parametrize(
    "make, shape, k",
    [(lambda: mlp(dropout=0.3), (12,), 4), (cnn, (2, 8, 8), 3)],
    ids=["mlp-dropout", "cnn"],
)
def test_ranks_of_a_world_step_as_one_process_does(ranks, make, shape, k, rng, thread_ranks):
    X, y = rng.normal(size=(13, *shape)), rng.integers(0, k, size=13)
    alone = DataParallel(make())
    for step in range(3):
        alone.net.set_rng(np.random.default_rng(step))
        alone.train_pass(X, y)
        GD(0.3).step(alone.params, alone.grads)
    world, results = thread_ranks(ranks), {}

    def rank(r: int) -> None:
        model = DataParallel(make(), world.rank(r))
        for step in range(3):
            model.net.set_rng(np.random.default_rng(step))
            _, out = model.train_pass(X, y)
            GD(0.3).step(model.params, model.grads)
        lo, hi = model.rows(13)
        results[r] = (model.params.copy(), out.shape[0] == hi - lo, model.accuracy(X, y))

    world.run(rank)
    assert sorted(results) == list(range(ranks))
    for params, rows_ok, accuracy in results.values():
        assert rows_ok
        np.testing.assert_allclose(params, alone.params, rtol=1e-12, atol=1e-14)
        assert accuracy == alone.accuracy(X, y)


def test_small_batches_and_one_thread_run_whole(split_all):
    model = DataParallel(Network.from_spec("784-100-10"))
    split_all(1)
    assert model.split(18000, training=True) is None
    split_all(2)
    parallel_module.MIN_SHARD_MACS = 20_000_000
    parallel_module.MIN_SHARD_MACS_PER_PARAM = 600
    assert model.split(18000, training=True) == [(0, 9000), (9000, 18000)]
    assert model.split(128, training=True) is None  # a mini-batch: the hand-off costs more
    assert model.split(3, training=False) is None
    # 784-800-800-10 mini-batches would spend the gain summing 1.3M-long gradients
    big = DataParallel(Network.from_spec("784-800-800-10"))
    assert big.split(128, training=True) is None
    assert big.split(128, training=False) is not None
    # a CNN's mini-batch gains even with a wide dense layer: im2col and pooling run on
    # one core unless the batch is split (251 multiply-adds per parameter here)
    parallel_module.MIN_CONV_SHARD_MACS_PER_PARAM = 100
    items = ["conv 32 3", "relu", "maxpool 2", "conv 64 3", "relu", "maxpool 2", "dense 512"]
    cnn_net = DataParallel(Network.from_layers(items, (1, 28, 28), 10))
    assert cnn_net.split(128, training=True) == [(0, 64), (64, 128)]


def test_bounds_cover_the_rows_in_near_equal_blocks():
    assert bounds(10, 3) == [(0, 3), (3, 6), (6, 10)]
    for n, parts in [(7, 2), (100, 7), (5, 5)]:
        b = bounds(n, parts)
        assert b[0][0] == 0 and b[-1][1] == n
        assert all(hi == lo2 for (_, hi), (lo2, _) in itertools.pairwise(b))
        sizes = [hi - lo for lo, hi in b]
        assert max(sizes) - min(sizes) <= 1


def test_side_by_side_runs_each_call_and_raises_a_worker_error(split_all):
    split_all(3)
    barrier = threading.Barrier(3, timeout=10)  # passes only if all 3 run at once

    def call(i):
        barrier.wait()
        return i, threading.current_thread().name

    names = side_by_side(call, [(0,), (1,), (2,)])
    assert [i for i, _ in names] == [0, 1, 2]
    assert names[0][1] == threading.current_thread().name  # the first runs here

    def fail(i):
        if i == 2:
            raise ValueError("shard 2 failed")
        return i

    with pytest.raises(ValueError, match="shard 2 failed"):
        side_by_side(fail, [(0,), (1,), (2,)])


def test_inside_a_shard_elementwise_passes_stay_on_the_shard_thread(split_all, monkeypatch):
    split_all(2)
    monkeypatch.setattr(threads_module, "MIN_PARALLEL", 0)
    seen = []

    def record(A):
        seen.append((threading.current_thread().name, A.shape[0], get_threads()))

    side_by_side(lambda A: rowwise(record, A), [(np.zeros((4, 2)),), (np.zeros((4, 2)),)])
    assert sorted(rows for _, rows, _ in seen) == [4, 4]  # not split again
    assert {threads for _, _, threads in seen} == {1}
    seen.clear()
    rowwise(record, np.zeros((6, 2)))  # outside a shard: split over the 2 threads
    assert sorted(rows for _, rows, _ in seen) == [3, 3]


def test_shared_parameters_must_fit_the_layout():
    net = Network.from_spec("4-3-2")
    with pytest.raises(ShapeError, match="shared parameters"):
        Network(net.layers, (4,), params=np.zeros(5, np.float32))
    with pytest.raises(ShapeError, match="shared parameters"):
        Network(net.layers, (4,), params=np.zeros(net.n_params, np.float64))


def test_the_thread_count_comes_from_handprop_threads(monkeypatch):
    monkeypatch.setenv("HANDPROP_THREADS", "3")
    set_threads(None)
    assert get_threads() == 3
    for bad in ("0", "two", "-1"):
        monkeypatch.setenv("HANDPROP_THREADS", bad)
        with pytest.raises(ConfigError, match=f"HANDPROP_THREADS .* got '{bad}'"):
            set_threads(None)
    monkeypatch.delenv("HANDPROP_THREADS")
    set_threads(None)
    assert get_threads() >= 1
