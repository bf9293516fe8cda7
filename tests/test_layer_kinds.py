"""A new layer kind is one class and its tests (issue 28).

Two toy kinds are defined here and nowhere else: ``LeakyReLU`` (an activation with a
real-valued setting) and ``Scale`` (a learned gain per feature: a parameter slot). Each
declares what the rest of handprop reads of it (its layer-spec item, its ONNX node,
whether it is an activation), and with no other file touched they work in a config's
``layers`` items, a training run, its model file, ONNX export, the diagnostics, the
figures and the page.
"""

from __future__ import annotations

import csv
import json
from typing import Any

import numpy as np
import pytest

from handprop import nn
from handprop.config import parse_toml_config
from handprop.errors import ConfigError, ModelFileError, ShapeError
from handprop.nn import LAYERS, ItemSpec, Layer, Network, Setting, gradcheck_layer
from handprop.nn.passes import INFERENCE, Pass
from handprop.nn.spec import check_architecture, layer_words, parse_layer_item

Array = Any


@pytest.fixture
def toy_kinds():
    """The two toy classes; defining them registers them, the teardown removes them."""

    class LeakyReLU(Layer):
        """A = Z where Z > 0, else alpha Z.   dA/dZ = 1 where Z > 0, else alpha."""

        kind = "leaky_relu"
        spec = ItemSpec("leaky", (Setting("alpha", float),))  # "leaky", "leaky alpha=0.1"
        is_activation = True

        def __init__(self, alpha: float = 0.01) -> None:
            self.alpha = float(alpha)

        def forward(self, X: Array, ctx: Pass = INFERENCE) -> Array:
            if ctx.training:
                self._X = X
            return ctx.xp.where(X > 0, X, self.alpha * X)

        def backward(self, G: Array, ctx: Pass, need_input_grad: bool = True) -> Array:
            """dX = G where Z > 0, else alpha G."""
            return ctx.xp.where(self._X > 0, G, self.alpha * G)

        def get_config(self) -> dict[str, Any]:
            return {"alpha": self.alpha}

        def onnx(self, graph: Any, label: str) -> None:
            graph.node("LeakyRelu", [graph.current], label, alpha=self.alpha)

    class Scale(Layer):
        """A = X s, one learned gain per feature.   X: (n, d)  s: (d,)
        ds = sum_rows G X,  dX = G s."""

        kind = "scale"
        spec = ItemSpec("scale", input_size="d", flat_input=True)  # "scale": d from the shapes

        def __init__(self, d: int) -> None:
            self.d = int(d)

        def param_shapes(self) -> dict[str, tuple[int, ...]]:
            return {"s": (self.d,)}

        def init_params(self, scheme: str, rng: np.random.Generator) -> None:
            self.s[...] = 1

        def forward(self, X: Array, ctx: Pass = INFERENCE) -> Array:
            if ctx.training:
                self._X = X
            return X * self.s

        def backward(self, G: Array, ctx: Pass, need_input_grad: bool = True) -> Array:
            """ds = sum_rows G X, dX = G s."""
            self.ds[...] = ctx.xp.sum(G * self._X, axis=0)
            return G * self.s

        def get_config(self) -> dict[str, Any]:
            return {"d": self.d}

        def onnx(self, graph: Any, label: str) -> None:
            graph.node("Mul", [graph.current, graph.weight(self.s, f"{label}.s")], label)

    assert LAYERS["leaky_relu"] is LeakyReLU and LAYERS["scale"] is Scale
    yield LeakyReLU, Scale
    del LAYERS["leaky_relu"], LAYERS["scale"]


ITEMS = ["conv 4 3 pad=1", "leaky alpha=0.1", "maxpool 2", "dense 16", "scale", "leaky"]

CONFIG = f"""
dataset = "digits"
total = 600
train = 500
test = 100
layers = {json.dumps(ITEMS)}
optimizer = "adam"
learning_rate = 0.01
batch_size = 50
epochs = 3
eval_every = 1
seed = 0
"""


def test_each_toy_kind_passes_its_gradient_check(toy_kinds, rng):
    LeakyReLU, Scale = toy_kinds
    X = rng.normal(size=(5, 6))
    X[np.abs(X) < 0.05] = 0.5  # away from the kink
    assert max(gradcheck_layer(LeakyReLU(0.1), X, rng).values()) < 1e-7
    assert max(gradcheck_layer(Scale(6), X, rng).values()) < 1e-7


def test_the_items_of_a_new_kind_are_read_and_written_back(toy_kinds):
    LeakyReLU, Scale = toy_kinds
    assert parse_layer_item("leaky") == ("leaky_relu", {})
    assert parse_layer_item("leaky 0.2") == ("leaky_relu", {"alpha": 0.2})
    assert parse_layer_item("LEAKY alpha=0.2") == ("leaky_relu", {"alpha": 0.2})
    assert layer_words(LeakyReLU(0.2)) == "leaky alpha=0.2"
    assert layer_words(LeakyReLU()) == "leaky"  # the default is left out
    assert layer_words(Scale(16)) == "scale"  # its size comes from the shapes
    for item, message in [
        ("leaky x", r"layer 'leaky x': alpha must be a number, got 'x'"),
        ("leaky beta=1", r"layer 'leaky beta=1': unknown setting 'beta'; known: alpha"),
        ("leaky 0.1 0.2", r"layer 'leaky 0.1 0.2' takes at most 1 values \(alpha\)"),
        ("scale 3", r"layer 'scale 3' takes at most 0 values \(\)"),
        ("leaked", r"unknown layer 'leaked'; known: .*scale, .*leaky"),
    ]:
        with pytest.raises(ShapeError, match=message):
            Network.from_layers(["dense 4", item], (1, 8, 8), 3)
    net = Network.from_layers(["conv 2 3", *ITEMS[1:]], (1, 8, 8), 3, rng=0)
    kinds = [layer.kind for layer in net.layers]
    assert kinds[kinds.index("maxpool2d") + 1 :] == [
        "flatten",  # before dense, on images
        "dense",
        "scale",
        "leaky_relu",
        "dense",  # the output layer (softmax is in the loss)
    ]
    assert net.layers[kinds.index("scale")].d == 16  # the dense layer's output size
    assert "leaky alpha=0.1, maxpool 2, flatten, dense 16, scale, leaky" in net.describe()


def test_a_new_kind_trains_from_a_config_and_is_saved_exported_drawn_and_served(
    toy_kinds, tmp_path
):
    from handprop.analysis.figures import build_run_figures, first_layer_images
    from handprop.export import check_with_onnxruntime, to_onnx
    from handprop.run import train_run
    from handprop.run.diagnostics import DIAGNOSTICS_FILE, activation_health
    from handprop.run.reader import RunFolder
    from handprop.serve.models import load_served

    cfg = parse_toml_config(CONFIG + f'out = "{tmp_path}"\n', "toy.toml")
    result = train_run(cfg, default_name="toy", progress=False)
    assert result.status == "completed"
    run = result.run_dir

    # the model file: its kinds and settings as JSON, loaded back to the same network
    net = nn.load(run / "model.npz")
    layers = net.architecture()["layers"]
    assert {"type": "leaky_relu", "alpha": 0.1} in layers
    assert {"type": "scale", "d": 16} in layers
    scale = next(layer for layer in net.layers if layer.kind == "scale")
    assert not np.all(scale.s == 1)  # its slot of the flat vector was trained and saved
    nn.save(net, tmp_path / "again.npz")
    again = nn.load(tmp_path / "again.npz")
    np.testing.assert_array_equal(again.params, net.params)
    arch = net.architecture()
    arch["layers"][1]["alpha"] = "0.1"  # a model file's values are checked by their type
    with pytest.raises(ShapeError, match=r"layer 1 \(leaky_relu\): alpha must be a number"):
        check_architecture(arch)

    # ONNX: each toy kind's own node, the same probabilities as handprop's
    pytest.importorskip("onnx")
    model = to_onnx(net)
    ops = [node.op_type for node in model.graph.node]
    toy_nodes = ["Conv", "LeakyRelu", "MaxPool", "Flatten", "Gemm", "Mul", "LeakyRelu"]
    assert ops == [*toy_nodes, "Gemm", "Softmax"]
    assert model.graph.node[1].attribute[0].f == pytest.approx(0.1)
    assert "5_scale.s" in {init.name for init in model.graph.initializer}
    diff = check_with_onnxruntime(model, net)
    assert diff is None or diff < 1e-5

    # diagnostics: the toy activation is the one after the conv and the dense layer
    with open(run / DIAGNOSTICS_FILE, newline="") as f:
        rows = list(csv.DictReader(f))
    assert {(r["name"], r["activation"]) for r in rows} == {
        ("conv 1-4 3x3", "leaky_relu"),
        ("dense 64-16", "leaky_relu"),
        ("dense 16-10", "softmax"),
    }
    assert {(r["saturated"], r["dead"]) for r in rows} == {("", "")}
    assert activation_health("leaky_relu", np.ones((3, 2))) == (None, None)

    # figures: the run's figures, the conv filters as its first layer
    figures, skipped = build_run_figures(RunFolder(run))
    assert {"first_layer", "diagnostics"} <= {name for name, _ in figures}, skipped
    assert first_layer_images(net)[1] == "all 4 3x3 filters of the convolution"

    # the page: the model's description and its first layer's activation
    served = load_served(run / "model.npz", "toy", run)
    info = served.info()
    assert info["kind"] == "cnn"
    assert "leaky alpha=0.1" in info["description"] and "scale, leaky" in info["description"]
    answer = served.explain(np.random.default_rng(0).random((8, 8)))
    assert answer["first_layer"]["kind"] == "conv"
    assert answer["first_layer"]["activation"] == "leaky_relu"


def test_a_kind_without_an_onnx_form_is_named(toy_kinds):
    pytest.importorskip("onnx")
    from handprop.export import to_onnx

    class Square(Layer):
        kind = "square"

    try:
        net = Network.from_layers(["dense 4", "square"], (8,), 3, rng=0)
        with pytest.raises(ConfigError, match=r"layer 1 \(Square\(\)\) has no ONNX form .*"):
            to_onnx(net)
        with pytest.raises(ConfigError, match=r"known: .*leaky_relu"):
            to_onnx(net)
    finally:
        del LAYERS["square"]


def test_a_kind_or_word_taken_or_a_setting_not_an_argument_is_refused(toy_kinds):
    with pytest.raises(TypeError, match="layer kind 'dense' .* is taken by .*Dense"):

        class Dense2(Layer):
            kind = "dense"

    with pytest.raises(TypeError, match="word 'leaky'"):

        class Leaky2(Layer):
            kind = "leaky2"
            spec = ItemSpec("leaky")

    with pytest.raises(TypeError, match="Odd.spec names 'beta', not an argument of it"):

        class Odd(Layer):
            kind = "odd"
            spec = ItemSpec("odd", (Setting("beta"),))

    assert not {"leaky2", "odd"} & set(LAYERS)


def test_a_model_file_naming_an_unknown_kind_is_refused(toy_kinds, tmp_path):
    LeakyReLU, _ = toy_kinds
    net = Network.from_layers(["dense 4", "leaky"], (8,), 3, rng=0)
    nn.save(net, tmp_path / "m.npz")
    del LAYERS["leaky_relu"]  # a handprop without the kind
    try:
        with pytest.raises(ModelFileError, match="unknown type 'leaky_relu'"):
            nn.load(tmp_path / "m.npz")
    finally:
        LAYERS["leaky_relu"] = LeakyReLU
