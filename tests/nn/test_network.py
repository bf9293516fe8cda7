import numpy as np
import pytest

from handprop.errors import ShapeError
from handprop.nn import GD, INITIALIZERS, Dense, Network, ReLU, gradcheck


def relu_margin(net, X):
    """Smallest |Z| entering a ReLU: finite differences must not step across the kink."""
    margin, A = np.inf, X
    for layer in net.layers:
        if isinstance(layer, ReLU):
            margin = min(margin, np.abs(A).min())
        A = layer.forward(A)
    return margin


@pytest.mark.parametrize("activation", ["sigmoid", "tanh", "relu", "identity"])
@pytest.mark.parametrize("spec", ["5-4-3", "5-4-4-3", "5-6-4-5-3"])
@pytest.mark.parametrize("loss", ["cross_entropy", "mse"])
def test_backward_matches_central_differences(activation, spec, loss, rng):
    net = Network.from_spec(
        spec, activation=activation, loss=loss, init="glorot_normal", dtype=np.float64, rng=rng
    )
    net.params += rng.normal(0, 0.1, size=net.n_params)  # nonzero biases
    X, y = rng.normal(size=(7, 5)), rng.integers(0, 3, size=7)
    while relu_margin(net, X) < 0.02:
        X = rng.normal(size=(7, 5))
    assert gradcheck(net, X, y) < 1e-6


def test_gradcheck_samples_coordinates_of_a_big_net(rng):
    net = Network.from_spec("784-100-10", dtype=np.float64, init="glorot_uniform", rng=rng)
    X, y = rng.uniform(size=(4, 784)), rng.integers(0, 10, size=4)
    assert gradcheck(net, X, y, n_coords=200, rng=rng) < 1e-6


def test_gradcheck_catches_a_wrong_backward(rng):
    net = Network.from_spec("4-3-2", dtype=np.float64, init="glorot_normal", rng=rng)
    dense = net.layers[0]
    original = dense.backward

    def wrong_backward(G, ctx, need_input_grad=True):
        dX = original(G, ctx, need_input_grad)
        dense.db *= 2  # a deliberately wrong bias gradient
        return dX

    dense.backward = wrong_backward
    assert gradcheck(net, rng.normal(size=(5, 4)), rng.integers(0, 2, size=5)) > 0.1


def test_params_are_one_flat_vector_and_layers_hold_views(rng):
    net = Network.from_spec("6-5-4-3", rng=rng)
    dense = [layer for layer in net.layers if isinstance(layer, Dense)]
    assert net.n_params == 6 * 5 + 5 + 5 * 4 + 4 + 4 * 3 + 3
    assert net.params.shape == net.grads.shape == (net.n_params,)
    for layer in dense:
        for name in ("W", "b"):
            assert np.shares_memory(getattr(layer, name), net.params)
            assert np.shares_memory(getattr(layer, "d" + name), net.grads)
    # writing the flat vector changes the layers' W and b
    net.params[:] = np.arange(net.n_params)
    assert dense[0].W[0, 0] == 0 and dense[0].W[0, 1] == 1 and dense[0].W[1, 0] == 5
    assert dense[0].b[0] == 30
    assert dense[1].W[0, 0] == 35
    assert dense[2].b[-1] == net.n_params - 1
    # and the gradient vector has the same layout: backward writes dW where W lives
    net.loss_and_grad(rng.normal(size=(3, 6)), np.array([0, 1, 2]))
    slot = net.layout.slots[2]  # layer 2's W
    assert (slot.layer, slot.name, slot.offset) == (2, "W", 35)
    np.testing.assert_array_equal(net.grads[35 : 35 + 20].reshape(5, 4), dense[1].dW)


def test_weight_mask_excludes_biases(rng):
    net = Network.from_spec("3-2-2", rng=rng)
    mask = net.layout.mask(("W",))
    assert mask.sum() == 3 * 2 + 2 * 2
    assert not mask[6:8].any()  # first bias


def test_one_training_step_in_float32_keeps_every_array_float32(rng):
    net = Network.from_spec("8-6-4", activation="sigmoid", dtype=np.float32, rng=rng)
    X = rng.uniform(size=(10, 8))  # float64 in: cast once at the boundary
    y = rng.integers(0, 4, size=10)
    Xc = net.check_input(X)
    assert Xc.dtype == np.float32
    out = net.forward(Xc, training=True)
    assert out.dtype == np.float32
    _, G = net.loss(out, y)
    assert G.dtype == np.float32
    assert net.backward(G, input_grad=True).dtype == np.float32
    GD(0.5).step(net.params, net.grads)
    assert net.params.dtype == np.float32 and net.grads.dtype == np.float32
    for layer in net.layers:
        for value in vars(layer).values():
            if isinstance(value, np.ndarray) and value.dtype != bool:
                assert value.dtype == np.float32, layer
    for value in net.work.arrays():  # the work arrays of the training pass
        if value.dtype != bool:
            assert value.dtype == np.float32
    assert net.predict_proba(X).dtype == np.float32


def train(net, X, y, lr, epochs):
    opt = GD(lr)
    X = net.check_input(X)
    for _ in range(epochs):
        net.loss_and_grad(X, y)
        opt.step(net.params, net.grads)


def test_learns_xor_from_a_fixed_seed():
    X = np.array([[0, 0], [0, 1], [1, 0], [1, 1]], dtype=np.float64)
    y = np.array([0, 1, 1, 0])
    net = Network.from_spec("2-8-2", activation="tanh", init="glorot_uniform", rng=1)
    train(net, X, y, lr=1.0, epochs=500)
    np.testing.assert_array_equal(net.predict(X), y)
    assert net.loss_value(net.check_input(X), y) < 0.05


def test_784_100_10_fits_a_separable_synthetic_problem(rng):
    # 10 well-separated class prototypes in [0, 1]^784 plus noise
    n, k = 300, 10
    prototypes = rng.uniform(size=(k, 784)) > 0.7
    y = rng.integers(0, k, size=n)
    X = np.clip(prototypes[y] + rng.normal(0, 0.2, size=(n, 784)), 0, 1)
    net = Network.from_spec("784-100-10", activation="sigmoid", rng=0)
    train(net, X, y, lr=2.5, epochs=100)
    assert (net.predict(X) == y).mean() == 1.0


def test_predict_proba_rows_sum_to_one(rng):
    for loss in ("cross_entropy", "mse"):
        net = Network.from_spec("4-3-5", loss=loss, rng=rng)
        P = net.predict_proba(rng.normal(size=(9, 4)), batch_size=4)
        assert P.shape == (9, 5)
        np.testing.assert_allclose(P.sum(axis=1), 1, rtol=1e-5)


@pytest.mark.parametrize("scheme", sorted(INITIALIZERS))
def test_init_is_seeded_and_biases_start_at_zero(scheme):
    a = Network.from_spec("20-10-3", init=scheme, rng=7)
    b = Network.from_spec("20-10-3", init=scheme, rng=7)
    c = Network.from_spec("20-10-3", init=scheme, rng=8)
    np.testing.assert_array_equal(a.params, b.params)
    assert not np.array_equal(a.params, c.params)
    assert not a.layers[0].b.any()
    assert a.layers[0].W.std() > 0


def test_init_scales():
    rng = np.random.default_rng(0)
    net = Network.from_spec("400-300-10", init="he_normal", dtype=np.float64, rng=rng)
    assert net.layers[0].W.std() == pytest.approx(np.sqrt(2 / 400), rel=0.02)
    net.init("glorot_uniform", rng)
    a = np.sqrt(6 / 700)
    assert np.abs(net.layers[0].W).max() <= a
    assert net.layers[0].W.std() == pytest.approx(a / np.sqrt(3), rel=0.02)
    net.init("uniform", rng)
    assert np.abs(net.params).max() <= 0.05


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"spec": "784"}, "input and an output"),
        ({"spec": "784-x-10"}, "sizes joined by '-'"),
        ({"spec": "784-0-10"}, ">= 1"),
        ({"spec": "4-3-2", "activation": "softplus"}, "unknown activation 'softplus'"),
        ({"spec": "4-3-3-2", "activation": ["relu"]}, "1 activations for 2 hidden"),
        ({"spec": "4-3-2", "loss": "hinge"}, "unknown loss 'hinge'"),
        ({"spec": "4-3-2", "init": "zeros"}, "unknown init 'zeros'"),
        ({"spec": "4-3-2", "dtype": "float16"}, "float32 or float64"),
    ],
)
def test_bad_construction_is_refused(kwargs, message):
    with pytest.raises(ShapeError, match=message):
        Network.from_spec(**kwargs)


def test_bad_input_is_refused(rng):
    net = Network.from_spec("4-3-2", rng=rng)
    with pytest.raises(ShapeError, match=r"expects \(n, 4\)"):
        net.predict(rng.normal(size=(2, 5)))
    with pytest.raises(ShapeError, match="labels must lie in"):
        net.check_labels(np.array([0, 2]), 2)
    with pytest.raises(ShapeError, match="integer class ids"):
        net.check_labels(np.array([0.0, 1.0]), 2)
    with pytest.raises(ShapeError, match="expects inputs of shape"):
        Network([Dense(3, 2)], input_shape=(4,))


def test_network_with_dropout_passes_gradcheck_with_fixed_masks(rng):
    from handprop.nn import Dropout

    net = Network.from_spec("5-6-4-3", activation="tanh", dropout=0.3, dtype=np.float64, rng=rng)
    drops = [i for i, layer in enumerate(net.layers) if isinstance(layer, Dropout)]
    assert len(drops) == 2
    net.pin_masks(
        {drops[0]: rng.uniform(size=(7, 6)) >= 0.3, drops[1]: rng.uniform(size=(7, 4)) >= 0.3}
    )
    assert gradcheck(net, rng.normal(size=(7, 5)), rng.integers(0, 3, size=7)) < 1e-6


def test_backward_skips_the_input_gradient_unless_asked(rng):
    net = Network.from_spec("6-5-3", dtype=np.float64, rng=rng)
    X, y = rng.normal(size=(4, 6)), np.array([0, 1, 2, 0])
    loss, G = net.loss(net.forward(X, training=True), y)
    assert net.backward(G) is None
    grads = net.grads.copy()
    dX = net.backward(G, input_grad=True)
    np.testing.assert_array_equal(net.grads, grads)  # same parameter gradients either way
    eps = 1e-6
    X2 = X.copy()
    X2[1, 2] += eps
    numeric = (net.loss_value(X2, y) - loss) / eps
    assert dX[1, 2] == pytest.approx(numeric, rel=1e-4)


def test_inference_outputs_are_never_overwritten_by_later_passes(rng):
    net = Network.from_spec("6-5-3", rng=rng)
    X = rng.normal(size=(4, 6))
    first = net.forward(net.check_input(X))
    kept = first.copy()
    net.forward(net.check_input(X) * 2)
    net.loss_and_grad(net.check_input(X) * 3, np.array([0, 1, 2, 0]))
    np.testing.assert_array_equal(first, kept)


# -- specs and sizes refused at construction, before anything is allocated --------------


@pytest.mark.parametrize(
    ("items", "message"),
    [
        (["dense 0"], r"layer 'dense 0': dense needs sizes >= 1"),
        (["dense -3"], r"layer 'dense -3': dense needs sizes >= 1"),
        (["conv 0 3"], r"layer 'conv 0 3': conv2d needs channels"),
        (["conv 4 0"], r"layer 'conv 4 0': conv2d needs channels, kernel"),
        (["conv 4 3 stride=0"], r"conv2d needs channels, kernel and stride >= 1"),
        (["conv 4 3 pad=-1"], r"padding >= 0"),
        (["maxpool 0"], r"layer 'maxpool 0': pooling needs k and stride >= 1"),
        (["avgpool 2 stride=0"], r"pooling needs k and stride >= 1"),
        (["conv 4 9"], r"layer 'conv 4 9': .* does not fit an input of 8x8"),
        (["maxpool 2", "maxpool 2", "maxpool 2", "maxpool 2"], r"does not fit an input of 1x1"),
        (["dense 4", "dropout 1"], r"layer 'dropout 1': dropout probability must be in \[0, 1\)"),
        (["dense 4", "dropout -0.5"], r"dropout probability must be in \[0, 1\)"),
        (["dense 4", "dropout nan"], r"dropout probability must be in \[0, 1\)"),
    ],
)
def test_bad_layer_items_are_refused_naming_the_item(items, message):
    from handprop.errors import HandpropError

    with pytest.raises(HandpropError, match=message):
        Network.from_layers(items, (1, 8, 8), 10)


@pytest.mark.parametrize("spec", ["784-0-10", "784-100-0", "0-10"])
def test_sizes_below_one_are_refused(spec):
    with pytest.raises(ShapeError, match="all >= 1"):
        Network.from_spec(spec)
    with pytest.raises(ShapeError, match="dense needs sizes >= 1"):
        Dense(784, 0)


def test_a_network_too_large_for_memory_is_refused_with_the_estimate(monkeypatch):
    from handprop.errors import ResourceError

    monkeypatch.setenv("HANDPROP_MEMORY_LIMIT", "1T")
    with pytest.raises(
        ResourceError,
        match=r"^the network 784-1000000000-10 \(795,000,000,010 float32 parameters, .*\) "
        r"would need about 5\.8 TiB, but only",
    ):
        Network.from_spec("784-1000000000-10")
    monkeypatch.setenv("HANDPROP_MEMORY_LIMIT", "64M")
    with pytest.raises(ResourceError, match=r"conv 100000 3, flatten, dense 10 .* would need"):
        Network.from_layers(["conv 100000 3"], (1, 8, 8), 10)


def test_a_training_batch_too_large_is_refused_before_the_pass(monkeypatch, rng):
    from handprop.errors import ResourceError

    net = Network.from_spec("64-32-10", rng=rng)
    X = np.zeros((20_000, 64), dtype=np.float32)
    y = np.zeros(20_000, dtype=np.int64)
    need = net.work_bytes(20_000, training=True)
    assert need > net.work_bytes(20_000, training=False) > 0
    monkeypatch.setenv("HANDPROP_MEMORY_LIMIT", str(need // 2))
    with pytest.raises(ResourceError, match=r"^training the network 64-32-10 on batches of 20,000"):
        net.train_pass(X, y)
    with pytest.raises(ResourceError, match="on batches of 20,000"):
        net.check_memory(20_000)
    monkeypatch.delenv("HANDPROP_MEMORY_LIMIT")
    net.train_pass(X[:100], y[:100])  # a batch that fits runs
