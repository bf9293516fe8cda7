"""Diagnostics of training: per-layer norms, update ratios and unit health."""

from __future__ import annotations

import math

import numpy as np
import pytest

from handprop import nn
from handprop.config import parse_toml_config
from handprop.run import resume_run, train_run
from handprop.run.diagnostics import (
    COLUMNS,
    SATURATION_DERIVATIVE,
    Diagnostics,
    activation_health,
    diagnostics_csv,
    watched_layers,
)
from handprop.run.reader import read_diagnostics, read_diagnostics_rows
from test_train import DIGITS


def test_sigmoid_saturation_is_a_derivative_below_the_threshold():
    # A(1 - A) < 0.01 <=> A < 0.0102 or A > 0.9898
    A = np.array([[0.001, 0.5, 0.995, 0.2], [0.9, 0.0101, 0.99, 0.011]])
    saturated, dead = activation_health("sigmoid", A)
    assert saturated == pytest.approx(4 / 8) and dead is None
    assert SATURATION_DERIVATIVE == 0.01


def test_tanh_saturation_and_relu_dead_units():
    # 1 - A^2 < 0.01 <=> |A| > 0.99499
    A = np.array([[0.999, -0.996, 0.5, 0.0]])
    assert activation_health("tanh", A) == (pytest.approx(0.5), None)
    # unit 0 is 0 on every row: dead; units 1 and 2 fire on some row
    R = np.array([[0.0, 1.0, 0.0], [0.0, 0.0, 2.0]])
    assert activation_health("relu", R) == (None, pytest.approx(1 / 3))
    assert activation_health("identity", R) == (None, None)


def test_watched_layers_name_each_layer_and_its_activation(rng):
    net = nn.Network.from_spec("64-32-16-10", activation=["tanh", "relu"], rng=rng)
    layers = watched_layers(net)
    assert [(w.name, w.activation) for w in layers] == [
        ("dense 64-32", "tanh"),
        ("dense 32-16", "relu"),
        ("dense 16-10", "softmax"),  # fused into the cross-entropy loss
    ]
    mse = nn.Network.from_spec("64-8-10", loss="mse", rng=rng)
    assert [w.activation for w in watched_layers(mse)] == ["sigmoid", "sigmoid"]
    cnn = nn.Network.from_layers(
        ["conv 4 3", "relu", "maxpool 2", "dense 8", "relu", "dropout 0.5"], (1, 8, 8), 10, rng=rng
    )
    assert [(w.name, w.activation) for w in watched_layers(cnn)] == [
        ("conv 1-4 3x3", "relu"),
        ("dense 36-8", "relu"),
        ("dense 8-10", "softmax"),
    ]


def test_one_step_of_gradient_descent_worked_out(rng):
    net = nn.Network.from_spec("5-4-3", activation="sigmoid", dtype=np.float64, rng=rng)
    opt = nn.OPTIMIZERS["gd"](0.5)
    diag = Diagnostics(net)
    X, y = rng.normal(size=(7, 5)), rng.integers(0, 3, size=7)
    W0 = [net.layers[i].W.copy() for i in (0, 2)]
    net.train_pass(X, y)
    diag.keep_before(net.params)  # as run_epoch does before an epoch's last step
    opt.step(net.params, net.grads)
    rows = diag.measure(1, X)
    assert [r["name"] for r in rows] == ["dense 5-4", "dense 4-3"]
    for row, i, w0 in zip(rows, (0, 2), W0, strict=True):
        layer = net.layers[i]
        assert row["grad_norm"] == pytest.approx(np.linalg.norm(layer.dW))
        assert row["weight_norm"] == pytest.approx(np.linalg.norm(layer.W))
        # plain GD: W - W0 = -lr dW, so the ratio is lr ||dW|| / ||W0||
        expected = 0.5 * np.linalg.norm(layer.dW) / np.linalg.norm(w0)
        assert row["update_ratio"] == pytest.approx(expected)
    assert rows[0]["saturated"] is not None and rows[1]["saturated"] is None


def test_csv_round_trip_keeps_empty_cells_and_non_finite_values(tmp_path):
    rows = [
        {"epoch": 10, "layer": 1, "name": "dense 64-32", "activation": "relu", "grad_norm": 0.5,
         "weight_norm": 2.0, "update_ratio": None, "saturated": None, "dead": 0.25},
        {"epoch": 10, "layer": 2, "name": "dense 32-10", "activation": "softmax",
         "grad_norm": math.inf, "weight_norm": 1.0, "update_ratio": 1e-3, "saturated": None,
         "dead": None},
    ]  # fmt: skip
    path = tmp_path / "diagnostics.csv"
    path.write_text(diagnostics_csv(rows))
    assert path.read_text().splitlines()[0] == ",".join(COLUMNS)
    assert read_diagnostics_rows(path) == rows
    layers = read_diagnostics(path)
    assert [layer.label for layer in layers] == ["dense 64-32 (relu)", "dense 32-10 (softmax)"]
    assert math.isnan(layers[0].values["update_ratio"][0])


@pytest.fixture
def cfg(tmp_path):
    return parse_toml_config(DIGITS + f'out = "{tmp_path / "runs"}"\n', "digits.toml")


def test_training_writes_diagnostics_at_every_evaluation(cfg):
    run_dir = train_run(cfg, default_name="digits", progress=False).run_dir
    layers = read_diagnostics(run_dir / "diagnostics.csv")
    assert [layer.name for layer in layers] == ["dense 64-24", "dense 24-10"]
    for layer in layers:
        assert layer.epoch.tolist() == [20, 40, 60]  # eval_every = 20
        for quantity in ("grad_norm", "weight_norm", "update_ratio"):
            assert np.all(layer.values[quantity] > 0)
    assert np.all((layers[0].values["saturated"] >= 0) & (layers[0].values["saturated"] <= 1))


def test_a_resumed_run_writes_the_diagnostics_of_an_uninterrupted_one(cfg, monkeypatch):
    full = train_run(cfg, default_name="full", progress=False).run_dir
    real_step = nn.GD.step

    def step_then_interrupt(self, params, grads):
        if self.t == 45:  # Ctrl-C during epoch 46, after the evaluations at 20 and 40
            raise KeyboardInterrupt
        real_step(self, params, grads)

    monkeypatch.setattr(nn.GD, "step", step_then_interrupt)
    with pytest.raises(KeyboardInterrupt):
        train_run(cfg, default_name="cut", progress=False)
    monkeypatch.setattr(nn.GD, "step", real_step)
    cut = full.parent / "cut"
    assert resume_run(cut, progress=False).status == "completed"
    expected = (full / "diagnostics.csv").read_text()
    assert (cut / "diagnostics.csv").read_text() == expected


def test_a_cosine_schedules_last_update_of_0_is_marked_not_dropped(tmp_path):
    from handprop.analysis.figures import ZERO_MARKER, diagnostics_figure

    text = DIGITS + f'schedule = "cosine"\nout = "{tmp_path / "runs"}"\n'
    cfg = parse_toml_config(text, "cosine.toml")
    run_dir = train_run(cfg, default_name="cosine", progress=False).run_dir
    layers = read_diagnostics(run_dir / "diagnostics.csv")
    for layer in layers:  # the last epoch steps at learning rate 0: nothing moves
        assert layer.values["update_ratio"][-1] == 0 and layer.epoch[-1] == 60
        assert np.all(layer.values["update_ratio"][:-1] > 0)
    ax = diagnostics_figure([("cosine", layers)]).axes[2]  # the update-ratio panel
    marks = [line for line in ax.get_lines() if line.get_marker() == ZERO_MARKER]
    assert [line.get_xdata().tolist() for line in marks] == [[60]] * len(layers)
    [note] = ax.get_legend().get_texts()
    assert note.get_text().startswith("epoch 60: update 0 (learning rate 0")
