"""The same hand-written passes on every array namespace (fixture ``xp``: NumPy,
array-api-strict, CuPy on a GPU machine): gradient checks of every layer and loss,
training steps equal to NumPy's, and model files written from the host."""

import numpy as np
import pytest

from handprop.nn import (
    LOSSES,
    OPTIMIZERS,
    AvgPool2D,
    BatchNorm,
    Conv2D,
    Dense,
    Dropout,
    Flatten,
    MaxPool2D,
    Network,
    backend,
    gradcheck,
    gradcheck_layer,
    load,
    save,
)
from handprop.nn.activations import ACTIVATIONS
from handprop.nn.layers import batch_last
from handprop.nn.passes import Masks, Pass, Workspace


def pinned_mask(kind, shape):
    """The dropout layer's keep-mask (sample-first ``shape``), pinned for every pass
    (None for other kinds)."""
    return np.random.default_rng(1).random(shape) >= 0.4 if kind.startswith("dropout") else None


def layer_input(X):
    """A sample-first batch as the layer takes it: images (n, c, h, w) batch-last."""
    return batch_last(X) if X.ndim == 4 else X


# (layer factory, sample-first input shape (n, ...)): every kind of layer. An image
# batch (n, c, h, w) goes to the layer batch-last, (c, h, w, n), as a network hands it on
LAYERS = {
    "dense": (lambda rng: Dense(5, 3), (4, 5)),
    **{name: (lambda rng, cls=cls: cls(), (3, 2, 4)) for name, cls in ACTIVATIONS.items()},
    "dropout": (lambda rng: Dropout(0.4), (3, 6)),
    "dropout_images": (lambda rng: Dropout(0.4), (3, 2, 3, 4)),
    "flatten": (lambda rng: Flatten(), (2, 2, 3, 3)),
    "conv_pad": (lambda rng: Conv2D(2, 3, 3, stride=1, pad=1), (2, 2, 5, 5)),
    "conv_stride2": (lambda rng: Conv2D(4, 3, 3, stride=2, pad=1), (2, 4, 6, 6)),
    "conv_stride1": (lambda rng: Conv2D(4, 2, 3, stride=1, pad=0), (2, 4, 5, 5)),
    "maxpool": (lambda rng: MaxPool2D(2), (2, 3, 4, 5)),
    "maxpool_overlapping": (lambda rng: MaxPool2D(3, stride=1), (2, 2, 5, 5)),
    "avgpool": (lambda rng: AvgPool2D(2), (2, 3, 4, 4)),
    "batchnorm_dense": (lambda rng: BatchNorm(4), (6, 4)),
    "batchnorm_conv": (lambda rng: BatchNorm(3), (3, 3, 4, 4)),
}


@pytest.mark.parametrize("kind", sorted(LAYERS))
def test_every_layer_passes_a_gradient_check_on_every_backend(kind, xp, rng):
    make, shape = LAYERS[kind]
    X = rng.normal(size=shape)
    if kind.startswith("maxpool"):  # ties have no derivative: distinct values
        X = rng.permutation(X.size).reshape(shape) / X.size
    mask = pinned_mask(kind, shape)
    layer = make(np.random.default_rng(1))
    errors = gradcheck_layer(layer, layer_input(X), rng=2, xp=xp, mask=mask)
    assert max(errors.values()) < 1e-6, errors


@pytest.mark.parametrize("kind", sorted(LAYERS))
def test_every_layer_computes_what_numpy_computes(kind, xp, rng):
    """Forward and backward on ``xp`` equal NumPy's to float64 rounding."""
    make, shape = LAYERS[kind]
    X, results = rng.normal(size=shape), []
    for space in (np, xp):
        layer = make(np.random.default_rng(1))
        net = Network([layer], shape[1:], dtype=np.float64) if layer.param_shapes() else None
        if net is not None:  # parameters from one seed, then moved
            net.init("glorot_normal", 3)
            net.params[...] += np.linspace(-0.2, 0.2, net.n_params)
            net.to(space)
        mask = pinned_mask(kind, shape)
        masks = None if mask is None else Masks({id(layer): mask}, shape[0])
        ctx = Pass(training=True, xp=space, work=Workspace(), masks=masks)
        A = layer.forward(backend.asarray(layer_input(X), space), ctx)
        G = backend.asarray(np.cos(np.arange(np.prod(A.shape))).reshape(tuple(A.shape)), space)
        dX = layer.backward(G, ctx)
        grads = backend.to_host(net.grads) if net is not None else np.zeros(0)
        inference = layer.forward(backend.asarray(layer_input(X), space), Pass(xp=space))
        results.append([backend.to_host(a) for a in (A, dX, inference)] + [grads])
    for ours, theirs in zip(results[1], results[0], strict=True):
        np.testing.assert_allclose(ours, theirs, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("loss", sorted(LOSSES))
def test_every_loss_passes_a_gradient_check_on_every_backend(loss, xp, rng):
    """A network made of its output layer alone: the check is the loss's gradient."""
    net = Network.from_spec("6-4", loss=loss, dtype=np.float64, rng=1).to(xp)
    X, y = rng.normal(size=(7, 6)), rng.integers(0, 4, size=7)
    assert gradcheck(net, X, y) < 1e-7


def train(items, shape, xp, optimizer, steps=3, dtype=np.float64, seed=0):
    """``steps`` steps of a network made of ``items`` on ``xp``; returns the net."""
    rng = np.random.default_rng(seed)
    net = Network.from_layers(items, shape, 10, dtype=dtype, rng=seed).to(xp)
    net.set_rng(np.random.default_rng(seed + 1))  # dropout masks: the same on every backend
    opt = OPTIMIZERS[optimizer](lr=1e-2)
    X = backend.asarray(rng.normal(size=(16, *shape)).astype(dtype), xp)
    y = backend.asarray(rng.integers(0, 10, size=16), xp)
    for _ in range(steps):
        net.loss_and_grad(X, y)
        opt.step(net.params, net.grads)
    return net, opt


MLP = (["dense 32", "relu", "dropout 0.3", "dense 16", "tanh"], (12,))
CNN = (
    [  # batchnorm after relu: a bias right before it has a gradient of exactly 0, whose
        # float32 rounding noise an adaptive optimizer turns into steps of any sign
        "conv 4 3",
        "relu",
        "batchnorm",
        "maxpool 2",
        "conv 8 3 pad=1",
        "relu",
        "maxpool 2",  # with the ReLU before it: one step, the ReLU on the pooled values
        "flatten",
        "dense 16",
        "sigmoid",
        "dropout 0.5",
    ],
    (1, 8, 8),
)


@pytest.mark.parametrize(
    "net_items, optimizer", [(MLP, "adam"), (MLP, "nesterov"), (CNN, "adam"), (CNN, "rmsprop")]
)
@pytest.mark.parametrize("dtype", [np.float64, np.float32])
def test_training_steps_equal_numpys(net_items, optimizer, dtype, xp):
    """An MLP with dropout and a small CNN, a few optimizer steps: the parameters and
    the optimizer's state equal NumPy's to float rounding."""
    items, shape = net_items
    ours, our_opt = train(items, shape, xp, optimizer, dtype=dtype)
    numpys, numpy_opt = train(items, shape, np, optimizer, dtype=dtype)
    tol = 1e-9 if dtype == np.float64 else 2e-5  # sums run in other orders
    params = backend.to_host(ours.params)
    np.testing.assert_allclose(params, numpys.params, rtol=tol, atol=tol)
    ours_state, numpy_state = our_opt.state_dict(), numpy_opt.state_dict()
    assert all(isinstance(v, np.ndarray) for v in ours_state.values())
    for name, value in numpy_state.items():
        np.testing.assert_allclose(ours_state[name], value, rtol=tol * 10, atol=tol)
    assert params.dtype == dtype


def test_a_model_trained_on_a_device_loads_on_the_host_and_back(xp, tmp_path):
    net, opt = train(*CNN, xp, "adam")
    save(net, tmp_path / "m.npz")
    host = load(tmp_path / "m.npz")
    assert host.xp is np
    np.testing.assert_array_equal(host.params, backend.to_host(net.params))
    X = np.random.default_rng(5).normal(size=(9, 1, 8, 8))
    expected = host.predict_proba(X)
    np.testing.assert_allclose(net.predict_proba(X), expected, rtol=1e-12, atol=1e-12)
    assert isinstance(net.predict_proba(X), np.ndarray)
    # the optimizer state goes back to the device with the parameters
    again = load(tmp_path / "m.npz").to(xp)
    opt2 = OPTIMIZERS["adam"](lr=1e-2)
    opt2.load_state_dict(opt.state_dict(), again.params)
    assert backend.namespace(opt2.state["m"]) is backend.namespace(again.params)


def test_the_flat_vectors_stay_views_on_every_backend(xp):
    """An optimizer steps the flat vector; each layer sees the step through its views,
    and backward writes through its gradient views into the flat gradient vector."""
    net = Network.from_spec("3-2", dtype=np.float64, rng=0).to(xp)
    dense = net.layers[0]
    net.params[...] = xp.ones_like(net.params)
    assert float(xp.sum(dense.W)) == 6.0 and float(xp.sum(dense.b)) == 2.0
    net.loss_and_grad(np.eye(3), np.array([0, 1, 1]))
    assert float(xp.sum(xp.abs(net.grads))) == pytest.approx(
        float(xp.sum(xp.abs(dense.dW))) + float(xp.sum(xp.abs(dense.db)))
    )


def test_moving_there_and_back_keeps_every_parameter(xp):
    net = Network.from_layers(*CNN, 10, rng=3)
    before = net.params.copy()
    assert net.to(xp).device == backend.device_name(xp)
    assert net.to("cpu").xp is np
    np.testing.assert_array_equal(net.params, before)


def test_an_unknown_device_is_one_line():
    with pytest.raises(backend.DeviceError, match="device must be one of cpu, cuda, got 'tpu'"):
        Network.from_spec("3-2").to("tpu")
