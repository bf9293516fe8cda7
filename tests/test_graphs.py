"""CUDA graphs of the training step (handprop.scale.graphs) and the config's ``graph``.

On this CPU the graph library is a stand-in (:class:`ReplayGraphs`) over
array-api-strict: a capture records the pass, a launch runs it again and writes its
loss into the captured array. That is what a CUDA graph does, less the GPU, so the
policy is tested here: when a step is captured, that a replay equals the eager step,
that the last short batch runs eagerly, that a failed capture or a replay that
disagrees falls back to eager steps with one line, that nothing is rebound. With
``HANDPROP_TEST_BACKENDS=...,cupy`` on a GPU machine the tests at the end capture real
CUDA graphs (benchmarks/gpu_check.sh runs them).
"""

import logging
import os

import numpy as np
import pytest

from handprop import nn
from handprop.config import GRAPH_NAMES, load_config, parse_toml_config, to_toml
from handprop.errors import ConfigError
from handprop.nn import backend
from handprop.run import train_run
from handprop.run.fit import run_epoch
from handprop.scale import DataParallel, TrainingStep
from handprop.scale import graphs as graphs_module
from handprop.scale.graphs import GRAPH_MODES, GraphMismatchError

xps = pytest.importorskip("array_api_strict")
pytest.importorskip("array_api_compat")


class Replay:
    """A captured pass, replayed by running its Python again."""

    def __init__(self, fn, result, after=None):
        self.fn, self.result, self.after = fn, result, after

    def launch(self):
        loss, out = self.fn()
        # a CUDA graph writes the arrays it captured: the output must be the same work
        # array, and the loss goes into the captured loss array
        assert out is self.result[1], "the pass rebound its output"
        self.result[0][...] = loss
        if self.after is not None:
            self.after()


class ReplayGraphs:
    """The graph library's stand-in: ``fail`` raises at capture, ``after`` runs after
    every launch (to spoil a replay)."""

    def __init__(self, fail=None, after=None):
        self.fail, self.after = fail, after
        self.runs = self.captures = self.launches = 0

    def describe(self):
        return "Python replay"

    def new_pool(self):
        return object()

    def run(self, fn, pool):
        self.runs += 1
        return fn()

    def capture(self, fn, pool):
        if self.fail is not None:
            raise self.fail
        self.captures += 1
        result = fn()  # no GPU to defer to: the pass runs, as the warm-up did
        return Replay(fn, result, self.after), result

    def launch(self, graph):
        self.launches += 1
        graph.launch()


def make_net(spec="12-16-10", activation="relu", dropout=0.3, xp=xps, seed=1):
    net = nn.Network.from_spec(spec, activation=activation, dropout=dropout, dtype=np.float64)
    net.init("he_normal", seed)
    return net.to(xp)


def data(n=110, d=12, seed=0):
    rng = np.random.default_rng(seed)
    return rng.random((n, d)), rng.integers(0, 10, n)


def train(net, step_of, epochs=3, batch=40, opt=None, n=110):
    """``epochs`` of run_epoch with the step ``step_of(model, opt)`` makes; the host
    parameters and the step."""
    X, y = data(n, net.input_shape[0])
    model, opt = DataParallel(net), opt or nn.Adam(1e-2)
    step = step_of(model, opt)
    Xd, yd = backend.asarray(X, net.xp), backend.asarray(y, net.xp, dtype=net.xp.int64)
    losses = []
    for epoch in range(epochs):
        rng = np.random.default_rng([0, epoch])
        net.set_rng(rng)
        losses.append(
            float(run_epoch(model, opt, Xd, yd, batch, rng, lambda loss: None, step=step)[0])
        )
    return backend.to_host(net.params).copy(), step, losses


def eager(model, opt):
    return TrainingStep(model, opt, "off")


def graphed(graphs=None):
    return lambda model, opt: TrainingStep(model, opt, "auto", graphs or ReplayGraphs())


# -- the policy --------------------------------------------------------------------------


def test_replayed_steps_equal_eager_steps_and_the_last_short_batch_runs_eagerly():
    want, _, want_losses = train(make_net(), eager)
    graphs = ReplayGraphs()
    got, step, losses = train(make_net(), graphed(graphs))
    np.testing.assert_array_equal(got, want)  # the same passes, the same masks
    assert losses == want_losses
    # 110 rows in batches of 40: 40, 40, 30. Epoch 1: eager, captured, eager (the
    # short batch); epochs 2 and 3: replayed, replayed, eager
    assert (step.captures, step.replays, step.off_reason) == (1, 4, None)
    assert graphs.runs == 1 and graphs.launches == 1 + 4  # + the check after capture
    assert [key[0] for key in step.captured] == [(40, 12)]  # the shape of X


@pytest.mark.parametrize("optimizer", ["gd", "momentum", "nesterov", "rmsprop"])
def test_every_optimizer_steps_alike_with_graphs(optimizer):
    opt = lambda: nn.OPTIMIZERS[optimizer](0.05, weight_decay=1e-3)  # noqa: E731
    want, _, _ = train(make_net(activation="sigmoid"), eager, opt=opt())
    got, step, _ = train(make_net(activation="sigmoid"), graphed(), opt=opt())
    np.testing.assert_array_equal(got, want)
    assert step.replays == 4


def test_the_full_batch_is_read_where_it_is():
    """Gradient descent on the full batch: the same arrays every epoch, bound to the
    graph, never copied; every epoch after the first two a replay."""
    want, _, _ = train(make_net(dropout=0.0), eager, opt=nn.GD(0.5), batch=110, epochs=5)
    got, step, _ = train(make_net(dropout=0.0), graphed(), opt=nn.GD(0.5), batch=110, epochs=5)
    np.testing.assert_array_equal(got, want)
    (captured,) = step.captured.values()
    assert captured.bound == (True, True) and step.replays == 3


def test_arrays_are_written_in_place_never_rebound():
    net = make_net()
    model, opt = DataParallel(net), nn.Adam(1e-2)
    step = TrainingStep(model, opt, "auto", ReplayGraphs())
    X, y = data(40)
    Xd, yd = xps.asarray(X), xps.asarray(y)
    params, grads = net.params, net.grads
    seen = []
    for k in range(5):
        net.set_rng(np.random.default_rng(k))
        _, out = step.train_pass(xps.asarray(X), yd if k % 2 else xps.asarray(y))
        step.update()
        if step.captured:
            (c,) = step.captured.values()
            seen.append((c.X, c.y, [id(a) for a in c.work.arrays()], out, c.loss))
    assert net.params is params and net.grads is grads
    first = seen[0]
    for later in seen[1:]:  # the static inputs, work arrays, output and loss: the same
        assert later[0] is first[0] and later[1] is first[1] and later[2] == first[2]
        assert later[3] is first[3] and later[4] is first[4]
    assert step.replays == 3 and not any(c.bound[0] for c in step.captured.values())
    del Xd


def test_graph_off_never_captures():
    graphs = ReplayGraphs()
    train(make_net(), lambda model, opt: TrainingStep(model, opt, "off", graphs))
    assert graphs.runs == graphs.captures == graphs.launches == 0


def test_a_failed_capture_falls_back_to_eager_steps_with_one_line(caplog):
    want, _, _ = train(make_net(), eager)
    failing = ReplayGraphs(fail=NotImplementedError("cuBLAS is not supported in capture"))
    with caplog.at_level(logging.WARNING, logger="handprop.graphs"):
        got, step, _ = train(make_net(), graphed(failing))
    np.testing.assert_array_equal(got, want)  # the same masks: drawn once per step
    assert step.captures == step.replays == 0
    assert step.off_reason == (
        "capturing the training step failed: NotImplementedError: cuBLAS is not "
        "supported in capture"
    )
    lines = [r.getMessage() for r in caplog.records]
    assert lines == [
        f"handprop: CUDA graphs off, the training steps run eagerly: {step.off_reason}"
    ]


def test_a_replay_that_disagrees_with_the_eager_pass_is_not_used(caplog):
    want, _, _ = train(make_net(), eager)
    holder = {}

    def spoil():
        grads = holder["net"].grads
        grads += 1.0

    net = make_net()
    holder["net"] = net
    with caplog.at_level(logging.WARNING, logger="handprop.graphs"):
        got, step, _ = train(net, graphed(ReplayGraphs(after=spoil)))
    np.testing.assert_array_equal(got, want)
    assert step.captures == 0 and "replayed gradient differs" in step.off_reason
    assert len(caplog.records) == 1 and GraphMismatchError.__name__  # one line


def test_a_network_moved_elsewhere_is_captured_again():
    net = make_net()
    model, opt = DataParallel(net), nn.GD(0.1)
    step = TrainingStep(model, opt, "auto", ReplayGraphs())
    X, y = data(40)
    for _ in range(3):
        step.train_pass(xps.asarray(X), xps.asarray(y))
    assert step.captures == 1 and step.replays == 1
    net.to(np).to(xps)  # new flat vectors: the graph's are gone
    for _ in range(3):
        step.train_pass(xps.asarray(X), xps.asarray(y))
    assert step.captures == 2 and step.replays == 2


def test_batchnorm_and_mpi_ranks_run_eagerly_saying_why(caplog, thread_ranks):
    items = ["dense 8", "batchnorm", "relu"]
    net = nn.Network.from_layers(items, (12,), 10, dtype=np.float64, rng=0).to(xps)
    with caplog.at_level(logging.WARNING, logger="handprop.graphs"):
        _, step, _ = train(net, graphed())
    assert step.captures == 0 and "batchnorm" in step.off_reason
    world = thread_ranks(2).rank(0)
    step = TrainingStep(DataParallel(make_net(), world), nn.GD(0.1), "auto", ReplayGraphs())
    assert not step._use_graphs() and "MPI ranks" in step.off_reason
    assert len(caplog.records) == 2


def test_on_numpy_auto_means_eager_and_says_nothing(caplog):
    with caplog.at_level(logging.WARNING, logger="handprop.graphs"):
        _, step, _ = train(make_net(xp=np), lambda model, opt: TrainingStep(model, opt, "auto"))
    assert step.graphs is None and step.captures == 0 and not caplog.records


def test_an_unknown_mode_is_refused():
    with pytest.raises(ValueError, match="graph must be one of auto, off, got 'on'"):
        TrainingStep(DataParallel(make_net()), nn.GD(0.1), "on")


# -- the config and a whole run ---------------------------------------------------------

RUN = """
dataset = "digits"
total = 600
train = 500
test = 100
hidden = [16]
activation = "relu"
dropout = 0.2
optimizer = "adam"
learning_rate = 0.01
batch_size = 50
epochs = 3
eval_every = 3
seed = 2
"""


def test_the_config_knows_the_graph_modes():
    assert GRAPH_NAMES == GRAPH_MODES


def test_graph_defaults_to_auto_and_round_trips(tmp_path):
    cfg = parse_toml_config(RUN, "r.toml")
    assert cfg.graph == "auto"
    off = parse_toml_config(RUN + 'graph = "off"\n', "r.toml")
    assert off.graph == "off" and 'graph = "off"' in to_toml(off)
    (tmp_path / "c.toml").write_text(to_toml(off))
    assert load_config(tmp_path / "c.toml") == off


def test_a_bad_graph_value_names_the_line():
    with pytest.raises(ConfigError) as err:
        parse_toml_config(RUN + 'graph = "on"\n', "r.toml")
    assert str(err.value) == "r.toml line 15: graph must be one of auto, off, got 'on'"


def test_a_run_with_graphs_learns_what_an_eager_run_learns(tmp_path, monkeypatch):
    """handprop train's own loop (fit, run_epoch, the diagnostics between the passes
    and the update) on a stand-in GPU: array-api-strict, graphs replayed in Python."""
    real = backend.device_namespace
    monkeypatch.setattr(backend, "device_namespace", lambda d: xps if d == "cuda" else real(d))
    made = []

    def graphs_for(xp):
        if xp is not xps:
            return None
        return lambda: made.append(ReplayGraphs()) or made[-1]

    monkeypatch.setattr(graphs_module, "graphs_for", graphs_for)
    cfg = parse_toml_config(RUN + f'out = "{tmp_path}"\ndevice = "cuda"\n', "r.toml")
    on = train_run(cfg, default_name="on", progress=False)
    off = train_run(cfg.replace(graph="off"), default_name="off", progress=False)
    assert len(made) == 1 and made[0].captures == 1 and made[0].launches > 10
    for name in ("model.npz",):
        a, b = nn.load(on.run_dir / name), nn.load(off.run_dir / name)
        np.testing.assert_allclose(a.params, b.params, rtol=1e-12, atol=1e-12)
    assert on.accuracy == off.accuracy


# -- real CUDA graphs, on a GPU machine ------------------------------------------------------

GPU = "cupy" in os.environ.get("HANDPROP_TEST_BACKENDS", "")


@pytest.fixture
def cupy_xp():
    if not GPU:
        pytest.skip("a GPU test: HANDPROP_TEST_BACKENDS=numpy,array_api_strict,cupy")
    try:
        return backend.device_namespace("cuda")
    except backend.DeviceError as exc:
        pytest.skip(f"cupy asked for, but {exc}")


@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_cublas_called_directly_computes_what_cupy_matmul_computes(cupy_xp, dtype):
    import cupy

    from handprop.nn.cuda import Cublas

    blas = Cublas()
    rng = cupy.random.default_rng(0)
    r = lambda *shape: rng.standard_normal(shape, dtype=dtype)  # noqa: E731
    X, W, G, S = r(9, 6), r(6, 4), r(9, 4), r(4, 9)
    Wm, cols, Gc = r(5, 12), r(12, 30), r(5, 30)
    W1, cols3, G3 = r(4, 9), r(3, 9, 25), r(3, 4, 25)
    products = [
        (X, W), (X.T, S.T), (G, W.T), (Wm, cols), (Gc, cols.T), (cols, Gc.T), (Wm.T, Gc),
        (W1, cols3), (G3, cupy.transpose(cols3, (0, 2, 1))), (W1.T, G3),
    ]  # fmt: skip
    tol = 1e-5 if dtype == "float32" else 1e-12
    for a, b in products:
        ours = blas.matmul(a, b)
        assert ours is not None, (a.shape, a.strides, b.shape, b.strides)
        cupy.testing.assert_allclose(ours, cupy.matmul(a, b), rtol=tol, atol=tol)


CNN = ["conv 4 3", "relu", "maxpool 2", "conv 8 3 pad=1", "relu", "maxpool 2", "dense 16"]
GPU_NETS = {
    "mlp-dropout": (["dense 32", "relu", "dropout 0.3", "dense 16", "tanh"], (12,)),
    "cnn": ([*CNN, "sigmoid", "dropout 0.5"], (1, 10, 10)),
}


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("kind", sorted(GPU_NETS))
def test_a_captured_cuda_graph_steps_as_the_eager_step_does(cupy_xp, kind, dtype):
    items, shape = GPU_NETS[kind]
    results = []
    for mode in ("off", "auto"):
        net = nn.Network.from_layers(items, shape, 10, dtype=dtype, rng=3).to(cupy_xp)
        model, opt = DataParallel(net), nn.Adam(1e-2)
        step = TrainingStep(model, opt, mode)
        rng = np.random.default_rng(0)
        X = backend.asarray(rng.random((100, *shape)).astype(dtype), cupy_xp)
        y = backend.asarray(rng.integers(0, 10, 100), cupy_xp, dtype=cupy_xp.int64)
        for epoch in range(3):
            r = np.random.default_rng([1, epoch])
            net.set_rng(r)
            run_epoch(model, opt, X, y, 32, r, lambda loss: None, step=step)
        results.append(backend.to_host(net.params))
        if mode == "auto":
            assert step.off_reason is None, step.off_reason
            # batches of 32, 32, 32, 4: eager, captured, replayed, eager; then 3 replays
            assert step.captures == 1 and step.replays == 1 + 3 + 3
    # the same kernels but cuBLAS called by CuPy or by handprop, which may sum in other
    # orders; Adam's steps amplify that where gradients are near 0 (as in test_device)
    tol = dict(rtol=1e-3, atol=1e-4) if dtype == np.float32 else dict(rtol=1e-7, atol=1e-9)
    np.testing.assert_allclose(results[1], results[0], **tol)


def test_the_seed_configs_full_batch_on_the_gpu_is_one_graph(cupy_xp):
    results = []
    for mode in ("off", "auto"):
        net = nn.Network.from_spec("64-100-10", rng=0).to(cupy_xp)
        model, opt = DataParallel(net), nn.GD(2.5)
        step = TrainingStep(model, opt, mode)
        rng = np.random.default_rng(0)
        X = backend.asarray(rng.random((500, 64), dtype=np.float32), cupy_xp)
        y = backend.asarray(rng.integers(0, 10, 500), cupy_xp, dtype=cupy_xp.int64)
        for _ in range(20):
            run_epoch(model, opt, X, y, 500, rng, lambda loss: None, step=step)
        results.append(backend.to_host(net.params))
        if mode == "auto":
            assert step.off_reason is None, step.off_reason
            (captured,) = step.captured.values()
            assert captured.bound == (True, True) and step.replays == 18
    np.testing.assert_allclose(results[1], results[0], rtol=1e-4, atol=1e-5)
