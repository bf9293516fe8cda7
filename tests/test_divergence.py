"""The divergence guard on scikit-learn's digits (offline, fast): a run whose loss,
parameters or test outputs turn NaN or infinite ends "diverged", names the epoch and
suggests a smaller rate, exits 1, and never leaves a model or predictions behind, in
full batches, mini-batches, on the last step, and as a grid row."""

import csv
import json

import numpy as np
import pytest
from click.testing import CliRunner

from handprop import nn
from handprop.cli import main
from handprop.config import parse_toml_config
from handprop.run import train_run

DIGITS = """
dataset = "digits"
total = 600
train = 500
test = 100
hidden = [16]
learning_rate = 2.0
eval_every = 100
"""
#: what only a completed run holds
RESULTS = {"model.npz", "predictions.csv"}


def config(tmp_path, extra=""):
    return parse_toml_config(DIGITS + extra + f'out = "{tmp_path / "runs"}"\n', "d.toml")


def diverged(result, epoch: int, what: str) -> dict:
    """Check that ``result`` diverged in ``epoch`` (``what`` became NaN or inf) and left
    no result; its metrics.json."""
    assert result.status == "diverged", result
    assert f"{what} at epoch {epoch} with learning rate" in result.message, result.message
    assert "try a smaller learning rate" in result.message
    d = result.run_dir
    names = {p.name for p in d.iterdir()}
    assert not names & RESULTS, names
    assert {"config.toml", "split.npz", "history.csv", "metrics.json"} <= names
    metrics = json.loads((d / "metrics.json").read_text())
    assert metrics["status"] == "diverged" and metrics["message"] == result.message
    assert "accuracy" not in metrics and metrics["epochs_completed"] == epoch - 1
    with (d / "history.csv").open() as f:
        rows = list(csv.DictReader(f))
    # the history holds the epochs before, every loss finite
    assert [int(r["epoch"]) for r in rows] == list(range(1, epoch))
    assert all(np.isfinite(float(r["loss"])) for r in rows)
    return metrics


@pytest.mark.parametrize("epochs", [1, 3])
def test_full_batch_gd_whose_first_step_makes_the_parameters_nan(tmp_path, epochs):
    # lr 1e39 is inf in float32: the first step's loss is finite, its update is not;
    # with one epoch that step is the last, and no later loss would see it
    cfg = config(tmp_path, f"epochs = {epochs}\n").replace(learning_rate=1e39)
    result = train_run(cfg, default_name="gd", progress=False)
    diverged(result, 1, "the parameters became nan")
    assert "(e.g. 1e+38)" in result.message


@pytest.mark.parametrize("optimizer", ["sgd", "momentum", "adam", "rmsprop"])
def test_mini_batch_optimizers_diverge_in_the_epoch_it_happens(tmp_path, optimizer):
    cfg = config(tmp_path, f'optimizer = "{optimizer}"\nbatch_size = 50\nepochs = 3\n')
    result = train_run(cfg.replace(learning_rate=1e39), default_name=optimizer, progress=False)
    diverged(result, 1, "became nan")


@pytest.mark.parametrize(("last", "epoch"), [(5, 1), (10, 2)])
def test_an_epochs_last_mini_batch_step_making_a_parameter_inf_is_seen(
    tmp_path, monkeypatch, last, epoch
):
    """The last step of an epoch (5 batches of 100) makes one weight inf; its loss comes
    with the next step, or never (the run's last step). The run stops in that epoch."""
    real_step = nn.Optimizer.step

    def step(self, params, grads):
        real_step(self, params, grads)
        if self.t == last:
            params[-1] = np.inf  # an output bias

    monkeypatch.setattr(nn.Optimizer, "step", step)
    cfg = config(tmp_path, 'optimizer = "sgd"\nbatch_size = 100\nepochs = 2\n')
    result = train_run(cfg.replace(learning_rate=0.5), default_name="last", progress=False)
    diverged(result, epoch, "the parameters became inf")


def test_finite_parameters_whose_outputs_overflow_are_no_result(tmp_path, monkeypatch):
    """The last step leaves every parameter finite (3e38 in float32) but the forward
    pass overflows: the test outputs are NaN, and the run is not completed."""
    real_step = nn.Optimizer.step

    def step(self, params, grads):
        real_step(self, params, grads)
        params[...] = 3e38

    monkeypatch.setattr(nn.Optimizer, "step", step)
    result = train_run(config(tmp_path, "epochs = 1\n"), default_name="big", progress=False)
    assert result.status == "diverged"
    assert "the network's outputs became nan at epoch 1" in result.message
    assert not {p.name for p in result.run_dir.iterdir()} & RESULTS


def test_a_huge_weight_decay_diverges_and_is_named(tmp_path):
    cfg = config(tmp_path, "weight_decay = 1e30\nepochs = 2\n")
    result = train_run(cfg, default_name="decay", progress=False)
    diverged(result, 2, "the parameters became inf")
    assert "learning rate 2 and weight_decay 1e+30" in result.message
    assert "or weight_decay (e.g. 1e+29)" in result.message


def test_train_says_so_in_one_line_and_exits_1(tmp_path):
    path = tmp_path / "boom.toml"
    path.write_text(DIGITS.replace("2.0", "1e39") + f'epochs = 1\nout = "{tmp_path}"\n')
    result = CliRunner().invoke(main, ["train", str(path), "-q"], catch_exceptions=False)
    assert result.exit_code == 1, result.output
    assert result.output.splitlines() == [
        "handprop: error: the parameters became nan at epoch 1 with learning rate 1e+39; "
        f"try a smaller learning rate (e.g. 1e+38) (recorded in {tmp_path / 'boom'})"
    ]
    assert not (tmp_path / "boom" / "model.npz").exists()


def test_a_grid_row_diverging_at_its_last_step_is_diverged_in_the_summary(tmp_path):
    grid = tmp_path / "g.csv"
    grid.write_text(
        "run_name,d,dtrain,dtest,m,alpha,epochs,dataset\n"
        "fine,600,500,100,16,2.0,2,digits\n"
        "boom,600,500,100,16,1e39,1,digits\n"
    )
    out = tmp_path / "out"
    for _ in range(2):  # the second time the diverged row is tried again, and diverges
        result = CliRunner().invoke(
            main, ["experiments", str(grid), "--out", str(out), "-q"], catch_exceptions=False
        )
        assert result.exit_code == 1, result.output
        assert "boom: diverged (the parameters became nan at epoch 1" in result.output
        with (out / "summary.csv").open() as f:
            table = {r["run"]: r for r in csv.DictReader(f)}
        assert table["fine"]["status"] == "completed"
        assert table["boom"]["status"] == "diverged" and table["boom"]["accuracy"] == ""
        assert "smaller learning rate" in table["boom"]["message"]
        assert not {p.name for p in (out / "boom").iterdir()} & RESULTS


@pytest.mark.parametrize("batch", ["", "batch_size = 100\n"])
def test_the_guard_works_on_a_device(tmp_path, monkeypatch, batch):
    """On a device (array-api-strict standing in for CuPy: any NumPy call on the device
    path fails) the losses are read once per epoch and the parameters checked there."""
    from handprop.nn import backend

    xp = pytest.importorskip("array_api_strict")
    pytest.importorskip("array_api_compat")
    real = backend.device_namespace
    monkeypatch.setattr(backend, "device_namespace", lambda d: xp if d == "cuda" else real(d))
    cfg = config(tmp_path, f'device = "cuda"\nepochs = 1\n{batch}')
    result = train_run(cfg.replace(learning_rate=1e39), default_name="gpu", progress=False)
    diverged(result, 1, "became nan")
