"""A saved network as an ONNX graph, built from handprop's own layer list.

Each layer adds its own node(s) (its ``onnx`` method, given an :class:`OnnxGraph`; nn
never imports onnx), the ONNX operator that computes the same function: Dense -> Gemm
(``X @ W + b``, W kept as handprop stores it, (d_in, d_out)), Conv2D -> Conv (the same
cross-correlation, weights (c_out, c_in, k, k)), MaxPool2D/AvgPool2D -> MaxPool/
AveragePool, Flatten -> Flatten, BatchNorm -> BatchNormalization (inference: its
running mean and variance, per feature (n, d) or per channel (n, c, h, w)),
Sigmoid/Tanh/ReLU -> Sigmoid/Tanh/Relu; Identity and
Dropout (the identity at inference) are left out. The output is the class
probabilities, as ``Network.predict_proba`` gives them: Softmax over the logits for
cross-entropy, the sigmoid outputs divided by their sum for mse. The parameters are
initializers, the batch dimension is dynamic (``batch``), and the input's scale (pixels
divided by ``pixel_max``, in [0, 1], white on black) is written in the metadata.

Needs the ``onnx`` extra (``onnx``; ``onnxruntime`` for the check), imported here
only.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np

from handprop import __version__
from handprop.errors import ConfigError, OutputError
from handprop.nn import Layer, Network
from handprop.nn.spec import listed

#: ONNX opset and IR version written: opset 17 (2022) is read by every current runtime
OPSET = 17
IR_VERSION = 8
#: onnxruntime must agree with predict_proba to this, or nothing is written
CHECK_TOLERANCE = 1e-5
#: random inputs the export is checked on
CHECK_SAMPLES = 64


def _onnx():
    try:
        import onnx
    except ImportError:
        raise ConfigError(
            'ONNX export needs the onnx extra (onnx is missing): pip install -e ".[onnx]"'
        ) from None
    return onnx


class OnnxGraph:
    """The nodes and initializers a network's layers add, each through its ``onnx``
    method (:meth:`handprop.nn.Layer.onnx`), in the network's dtype."""

    def __init__(self, dtype: np.dtype) -> None:
        from onnx import helper, numpy_helper

        self._helper, self._numpy_helper = helper, numpy_helper
        self.dtype = dtype
        self.nodes: list[Any] = []
        self.inits: list[Any] = []
        #: the tensor the next node reads: the graph's input, then each node's output
        self.current = "input"

    def weight(self, array: np.ndarray, name: str) -> str:
        """An initializer holding ``array`` in the graph's dtype; returns its name."""
        tensor = np.ascontiguousarray(array, self.dtype)
        self.inits.append(self._numpy_helper.from_array(tensor, name))
        return name

    def node(self, op: str, inputs: list[str], label: str, **attrs: Any) -> str:
        """A node named ``label`` whose output ``<label>_out`` the next node reads."""
        out = f"{label}_out"
        self.nodes.append(self._helper.make_node(op, inputs, [out], name=label, **attrs))
        self.current = out
        return out


def has_onnx(cls: type[Layer]) -> bool:
    """Whether a layer kind says how it is written in ONNX (its own ``onnx``, or
    ``onnx_op`` for the default one)."""
    return cls.onnx is not Layer.onnx or cls.onnx_op is not None


def to_onnx(net: Network, name: str = "handprop") -> Any:
    """The network as an ``onnx.ModelProto``: input ``input`` (batch, *input_shape),
    output ``probabilities`` (batch, n_classes). ConfigError names a layer that has no
    ONNX form here."""
    onnx = _onnx()
    from onnx import TensorProto, helper, numpy_helper

    elem = TensorProto.FLOAT if net.dtype == np.float32 else TensorProto.DOUBLE
    g = OnnxGraph(net.dtype)
    for i, layer in enumerate(net.layers):
        if not has_onnx(type(layer)):
            known = ", ".join(cls.kind for cls in listed() if has_onnx(cls))
            raise ConfigError(
                f"layer {i} ({layer!r}) has no ONNX form in handprop export; known: {known}"
            )
        layer.onnx(g, f"{i}_{layer.kind}")
    current = g.current
    if net.loss_name == "cross_entropy":
        g.node("Softmax", [current], "probabilities", axis=1)
    elif net.loss_name == "mse":
        # predict_proba: A / max(sum A, tiny), row by row
        g.inits.append(numpy_helper.from_array(np.array([1], np.int64), "axes_1"))
        tiny = g.weight(np.array(np.finfo(net.dtype).tiny), "tiny")
        g.nodes.append(helper.make_node("ReduceSum", [current, "axes_1"], ["row_sum"], keepdims=1))
        g.nodes.append(helper.make_node("Max", ["row_sum", tiny], ["denominator"]))
        g.node("Div", [current, "denominator"], "probabilities")
    else:
        raise ConfigError(f"loss {net.loss_name!r} has no ONNX output in handprop export")
    g.nodes[-1].output[0] = "probabilities"  # the graph's output keeps its plain name

    graph = helper.make_graph(
        g.nodes,
        name,
        [helper.make_tensor_value_info("input", elem, ["batch", *net.input_shape])],
        [helper.make_tensor_value_info("probabilities", elem, ["batch", net.n_classes])],
        initializer=g.inits,
    )
    model = helper.make_model(
        graph,
        opset_imports=[helper.make_opsetid("", OPSET)],
        producer_name="handprop",
        producer_version=__version__,
        doc_string=f"{net.describe()}; {input_description(net)}",
    )
    model.ir_version = IR_VERSION
    helper.set_model_props(model, metadata(net))
    onnx.checker.check_model(model, full_check=True)
    return model


def input_description(net: Network) -> str:
    """How to make the input from pixels, in words (also in the model's metadata)."""
    pixel_max = float(net.meta.get("pixel_max", 255))
    shape = ", ".join(["batch", *map(str, net.input_shape)])
    return (
        f"input ({shape}) {net.dtype.name}: pixel values divided by {pixel_max:g}, so in "
        "[0, 1], white digit on black (MNIST-style); output: class probabilities"
    )


def metadata(net: Network) -> dict[str, str]:
    """The model's metadata_props: normalisation, classes, image shape, dataset."""
    names = net.meta.get("class_names") or [str(i) for i in range(net.n_classes)]
    props = {
        "handprop.normalization": input_description(net),
        "handprop.pixel_max": f"{float(net.meta.get('pixel_max', 255)):g}",
        "handprop.input_range": "[0, 1]",
        "handprop.class_names": json.dumps(names),
        "handprop.architecture": json.dumps(
            {k: v for k, v in net.architecture().items() if k != "meta"}
        ),
    }
    if net.meta.get("image_shape"):
        props["handprop.image_shape"] = json.dumps(list(net.meta["image_shape"]))
    if net.meta.get("dataset"):
        props["handprop.dataset"] = str(net.meta["dataset"])
    return props


def check_with_onnxruntime(
    model: Any, net: Network, X: np.ndarray | None = None, seed: int = 0
) -> float | None:
    """The largest |onnxruntime - predict_proba| over X (default: 64 random inputs in
    [0, 1]); None when onnxruntime is not installed."""
    try:
        import onnxruntime
    except ImportError:
        return None
    if X is None:
        X = np.random.default_rng(seed).random((CHECK_SAMPLES, *net.input_shape))
    X = X.astype(net.dtype)
    session = onnxruntime.InferenceSession(
        model.SerializeToString(), providers=["CPUExecutionProvider"]
    )
    got = session.run(["probabilities"], {"input": X})[0]
    return float(np.abs(got.astype(np.float64) - net.predict_proba(X)).max())


def export(
    net: Network, out: str | Path, name: str = "handprop", overwrite: bool = False
) -> tuple[Any, float | None]:
    """Write ``net`` as ONNX to ``out`` (atomically), after onnx.checker and, when
    onnxruntime is installed, a check against predict_proba. Returns the model and the
    largest difference found (None: not checked). An existing file is replaced only
    with ``overwrite``."""
    from handprop.atomic import atomic_write_bytes

    out = Path(out)
    if out.is_dir():
        raise OutputError(f"{out}: is a folder; give a file name such as model.onnx")
    if out.exists() and not overwrite:
        raise OutputError(f"{out}: already exists; give -o FILE to write elsewhere")
    model = to_onnx(net, name)
    diff = check_with_onnxruntime(model, net)
    if diff is not None and not diff <= CHECK_TOLERANCE:
        raise ConfigError(
            f"onnxruntime's probabilities differ from handprop's by {diff:.3g} "
            f"(more than {CHECK_TOLERANCE:g}); nothing written"
        )
    atomic_write_bytes(out, model.SerializeToString())
    return model, diff
