"""handprop export: the ONNX graph of an MLP (sigmoid and ReLU) and a CNN, checked by
onnx.checker and run by onnxruntime against handprop's predict_proba on a test set.

Needs the onnx extra (onnx, onnxruntime); skipped, saying which, when absent.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
from click.testing import CliRunner

from handprop.cli import main
from handprop.nn import Adam, Network, save

onnx = pytest.importorskip("onnx", reason="onnx not installed (pip install -e '.[onnx]')")
ort = pytest.importorskip(
    "onnxruntime", reason="onnxruntime not installed (pip install -e '.[onnx]')"
)


@pytest.fixture(scope="module")
def digits():
    from handprop.data import load_dataset, normalize

    ds = load_dataset("digits")
    X = normalize(ds.images, ds.pixel_max)
    return X[:1500], ds.labels[:1500], X[1500:], ds.labels[1500:]


def fit(net: Network, X: np.ndarray, y: np.ndarray, epochs: int = 8) -> Network:
    """A few epochs of Adam on mini-batches: trained weights, not the initial ones."""
    opt = Adam(lr=0.01)
    rng = np.random.default_rng(0)
    X = X.reshape(len(X), *net.input_shape)
    for _ in range(epochs):
        order = rng.permutation(len(X))
        for i in range(0, len(X), 64):
            rows = order[i : i + 64]
            net.loss_and_grad(X[rows], y[rows])
            opt.step(net.params, net.grads)
    return net


META = {"image_shape": [8, 8], "pixel_max": 16.0, "dataset": "digits",
        "class_names": [str(i) for i in range(10)]}  # fmt: skip


def networks():
    yield "mlp-sigmoid", Network.from_spec("64-32-10", activation="sigmoid", rng=0, meta=META)
    yield (
        "mlp-relu",
        Network.from_spec(
            "64-32-16-10", activation="relu", init="he_normal", rng=0, meta=META, dropout=0.2
        ),
    )
    yield (
        "mlp-tanh-mse",
        Network.from_spec("64-24-10", activation="tanh", loss="mse", rng=0, meta=META),
    )
    yield "cnn", Network.from_layers(
        ["conv 8 3 pad=1", "relu", "maxpool 2", "conv 8 3", "tanh", "avgpool 1",
         "dense 32", "sigmoid", "dropout 0.5"],
        (1, 8, 8), 10, rng=0, meta=META,
    )  # fmt: skip
    yield "cnn-batchnorm", Network.from_layers(
        ["conv 8 3 pad=1", "batchnorm", "relu", "maxpool 2",
         "dense 32", "batchnorm momentum=0.3", "relu"],
        (1, 8, 8), 10, rng=0, meta=META,
    )  # fmt: skip


@pytest.mark.parametrize("kind", [name for name, _ in networks()])
def test_the_onnx_graph_gives_handprops_probabilities(tmp_path, digits, kind):
    X_train, y_train, X_test, y_test = digits
    net = fit(dict(networks())[kind], X_train, y_train)
    save(net, tmp_path / "model.npz")
    result = CliRunner().invoke(main, ["export", str(tmp_path / "model.npz"), "--format", "onnx"])
    assert result.exit_code == 0, result.output
    assert "onnx.checker passed; onnxruntime agrees" in result.output

    model = onnx.load(tmp_path / "model.onnx")
    onnx.checker.check_model(model, full_check=True)
    ops = [node.op_type for node in model.graph.node]
    assert "Dropout" not in ops and ops[-1] in ("Softmax", "Div")
    if kind == "cnn":
        assert {"Conv", "MaxPool", "AveragePool", "Flatten", "Gemm", "Relu", "Tanh"} <= set(ops)
    if kind == "cnn-batchnorm":  # per channel after the conv, per feature after the dense
        assert ops.count("BatchNormalization") == 2
    batch = model.graph.input[0].type.tensor_type.shape.dim[0]
    assert batch.dim_param == "batch"  # dynamic batch dimension
    props = {p.key: p.value for p in model.metadata_props}
    assert (
        props["handprop.pixel_max"] == "16" and "divided by 16" in props["handprop.normalization"]
    )
    assert json.loads(props["handprop.class_names"]) == META["class_names"]

    session = ort.InferenceSession(str(tmp_path / "model.onnx"), providers=["CPUExecutionProvider"])
    X = X_test.reshape(len(X_test), *net.input_shape)
    expected = net.predict_proba(X)
    for batch_size in (len(X), 1):  # the whole test set, and one image
        got = session.run(["probabilities"], {"input": X[:batch_size]})[0]
        assert got.shape == expected[:batch_size].shape
        np.testing.assert_allclose(got, expected[:batch_size], atol=1e-5, rtol=0)
    assert (expected.argmax(axis=1) == y_test).mean() > 0.5  # trained: far above chance


def test_the_default_file_is_never_overwritten(tmp_path):
    net = Network.from_spec("64-8-10", rng=0, meta=META)
    run = tmp_path / "run"
    run.mkdir()
    save(net, run / "model.npz")
    assert CliRunner().invoke(main, ["export", str(run)]).exit_code == 0
    (run / "model.onnx").write_bytes(b"mine")
    result = CliRunner().invoke(main, ["export", str(run)])
    assert result.exit_code == 1
    assert "model.onnx: already exists; give -o FILE" in result.output
    assert (run / "model.onnx").read_bytes() == b"mine"
    (tmp_path / "notes.txt").write_text("keep")
    result = CliRunner().invoke(main, ["export", str(run), "-o", str(tmp_path / "notes.txt")])
    assert result.exit_code == 1 and "is not an .onnx file" in result.output
    assert (tmp_path / "notes.txt").read_text() == "keep"
    # an .onnx file named with -o is what the user asked for: replaced, atomically
    result = CliRunner().invoke(main, ["export", str(run), "-o", str(run / "model.onnx")])
    assert result.exit_code == 0, result.output
    onnx.checker.check_model(onnx.load(run / "model.onnx"))
    assert [p.name for p in run.iterdir() if p.name.startswith(".")] == []
