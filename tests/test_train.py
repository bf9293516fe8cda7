"""The training pipeline end to end on scikit-learn's bundled digits (offline, seconds)."""

import csv
import json
import signal
from pathlib import Path

import numpy as np
import pytest

from conftest import DIGITS_CONFIG
from handprop import nn
from handprop.config import parse_toml_config
from handprop.errors import Interrupted
from handprop.run import resume_run, train_run

DIGITS = DIGITS_CONFIG


@pytest.fixture
def cfg(tmp_path):
    return parse_toml_config(DIGITS + f'out = "{tmp_path / "runs"}"\n', "digits.toml")


def test_train_writes_a_complete_run_folder(cfg):
    result = train_run(cfg, default_name="digits", progress=False)
    d = result.run_dir
    assert d.name == "digits" and result.status == "completed"
    names = {p.name for p in d.iterdir()}
    assert names == {
        ".handprop-run",
        "config.toml",
        "model.npz",
        "split.npz",
        "history.csv",
        "predictions.csv",
        "metrics.json",
        "diagnostics.csv",
    }
    metrics = json.loads((d / "metrics.json").read_text())
    assert metrics["status"] == "completed"
    assert metrics["accuracy"] > 0.85
    assert metrics["epochs_completed"] == 60
    assert metrics["n_params"] == 64 * 24 + 24 + 24 * 10 + 10
    assert metrics["split"] == {
        "kind": "original",
        "total": 1797,
        "train": 1500,
        "test": 297,
        "validation": 0,
        "seed": 3,
    }
    assert np.array(metrics["confusion_matrix"]).sum() == 297

    with (d / "history.csv").open() as f:
        rows = list(csv.DictReader(f))
    assert [int(r["epoch"]) for r in rows] == list(range(1, 61))
    assert [r["epoch"] for r in rows if r["test_acc"]] == ["20", "40", "60"]
    assert float(rows[-1]["loss"]) < float(rows[0]["loss"])

    with (d / "predictions.csv").open() as f:
        preds = list(csv.reader(f))
    assert preds[0] == ["index", "true", "pred", *(f"p{j}" for j in range(10))]
    assert len(preds) == 298
    split = np.load(d / "split.npz")
    assert [int(r[0]) for r in preds[1:]] == split["test_idx"].tolist()
    assert not set(split["train_idx"]) & set(split["test_idx"])
    acc = np.mean([r[1] == r[2] for r in preds[1:]])
    assert acc == pytest.approx(metrics["accuracy"])

    net = nn.load(d / "model.npz")
    assert net.meta["class_names"] == [str(i) for i in range(10)]
    assert net.meta["image_shape"] == [8, 8]

    again = train_run(cfg, default_name="digits", progress=False)
    assert again.run_dir.name == "digits-2"  # a second run never overwrites the first
    assert again.metrics["accuracy"] == metrics["accuracy"]  # same config, same numbers


def test_interrupted_run_resumes_to_the_same_parameters(cfg, monkeypatch):
    full = train_run(cfg, default_name="full", progress=False)
    expected = nn.load(full.run_dir / "model.npz").params

    real_step = nn.GD.step

    def step_then_interrupt(self, params, grads):
        if self.t == 25:  # Ctrl-C during epoch 26
            raise KeyboardInterrupt
        real_step(self, params, grads)

    monkeypatch.setattr(nn.GD, "step", step_then_interrupt)
    with pytest.raises(Interrupted) as stop:
        train_run(cfg, default_name="cut", progress=False)
    run_dir = full.run_dir.parent / "cut"
    # the stop carries the result, for the command line to say where to resume from
    assert stop.value.signum == signal.SIGINT and stop.value.outcome.run_dir == run_dir
    assert stop.value.outcome.status == "interrupted"
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert metrics["status"] == "interrupted" and metrics["epochs_completed"] == 25
    assert "--resume" in metrics["message"]
    assert (run_dir / "checkpoint.npz").is_file() and not (run_dir / "model.npz").exists()
    monkeypatch.setattr(nn.GD, "step", real_step)

    resumed = resume_run(run_dir, progress=False)
    assert resumed.status == "completed"
    assert not (run_dir / "checkpoint.npz").exists()
    np.testing.assert_array_equal(nn.load(run_dir / "model.npz").params, expected)
    with (run_dir / "history.csv").open() as f:
        assert [int(r["epoch"]) for r in csv.DictReader(f)] == list(range(1, 61))


def test_divergence_stops_the_run_and_is_recorded(cfg):
    cfg = cfg.replace(learning_rate=1e30, activation=("identity",))
    result = train_run(cfg, default_name="boom", progress=False)
    assert result.status == "diverged"
    assert "at epoch" in result.message and "smaller learning rate" in result.message
    metrics = json.loads((result.run_dir / "metrics.json").read_text())
    assert metrics["status"] == "diverged" and metrics["message"] == result.message
    assert not (result.run_dir / "model.npz").exists()


def test_a_small_cnn_trains_with_augmentation_and_resumes_exactly(
    tmp_path, monkeypatch, cut_and_resumed
):
    cfg = parse_toml_config(
        'dataset = "digits"\ntotal = 600\ntrain = 500\ntest = 100\n'
        'layers = ["conv 4 3 pad=1", "relu", "maxpool 2", "dense 16", "relu", "dropout 0.2"]\n'
        'init = "he_normal"\noptimizer = "adam"\nlearning_rate = 0.003\nbatch_size = 50\n'
        "epochs = 12\neval_every = 6\naugment_shift = 1\naugment_rotate = 5\n"
        f'out = "{tmp_path}"\n',
        "cnn.toml",
    )
    full = train_run(cfg, default_name="full", progress=False)
    assert full.status == "completed" and full.accuracy > 0.5
    net = nn.load(full.run_dir / "model.npz")
    assert net.input_shape == (1, 8, 8) and net.layers[0].kind == "conv2d"

    resumed = cut_and_resumed(cfg, 55)  # cut in the sixth epoch (10 batches per epoch)
    np.testing.assert_array_equal(resumed.params, net.params)


def test_early_stopping_restores_the_best_parameters(tmp_path):
    cfg = parse_toml_config(
        DIGITS.replace("epochs = 60", "epochs = 400")
        .replace("eval_every = 20", "eval_every = 5")
        .replace("learning_rate = 2.0", "learning_rate = 0.05")
        + f'validation = 0.2\npatience = 3\nout = "{tmp_path}"\n'
        + 'optimizer = "adam"\nbatch_size = 32\n',
        "es.toml",
    )
    result = train_run(cfg, default_name="es", progress=False)
    es = result.metrics["early_stopping"]
    assert es["stopped_early"] and result.epochs_completed < 400
    assert result.metrics["split"]["validation"] == 300
    assert set(np.load(result.run_dir / "split.npz")) == {"train_idx", "test_idx", "val_idx"}
    import csv as _csv

    with (result.run_dir / "history.csv").open() as f:
        rows = [r for r in _csv.DictReader(f) if r["val_loss"]]
    best = min(rows, key=lambda r: float(r["val_loss"]))
    assert int(best["epoch"]) == es["best_epoch"]


# --- the split's seed ---------------------------------------------------------------------------

EXPERIMENTS = Path(__file__).parents[1] / "experiments"


def test_a_config_without_split_seed_splits_as_before(cfg):
    from handprop.data import load_dataset, original_split
    from handprop.run.build import carve_validation, split_indices

    ds = load_dataset("digits")
    assert cfg.split_seed is None
    train_idx, test_idx = split_indices(cfg, ds)
    old_train, old_test = original_split(len(ds.labels), 1797, 1500, 297, 3)  # by the seed
    np.testing.assert_array_equal(train_idx, old_train)
    np.testing.assert_array_equal(test_idx, old_test)
    fit, val = carve_validation(cfg.replace(validation=0.2), train_idx)
    order = np.random.default_rng([3, 1]).permutation(1500)  # the validation part, as before
    np.testing.assert_array_equal(val, np.sort(train_idx[order[:300]]))
    np.testing.assert_array_equal(fit, np.sort(train_idx[order[300:]]))


def test_split_seed_fixes_the_split_while_seed_varies_the_initialisation(cfg):
    cfg = cfg.replace(epochs=5, eval_every=5)
    base = train_run(cfg, default_name="base", progress=False)
    other = train_run(cfg.replace(seed=8, split_seed=3), default_name="other", progress=False)
    for key in ("train_idx", "test_idx"):
        np.testing.assert_array_equal(
            np.load(base.run_dir / "split.npz")[key], np.load(other.run_dir / "split.npz")[key]
        )
    params = [nn.load(r.run_dir / "model.npz").params for r in (base, other)]
    assert not np.array_equal(*params)
    # config.toml records the split's seed, also where the config left it to the seed
    saved = [parse_toml_config((r.run_dir / "config.toml").read_text(), "c") for r in (base, other)]
    assert [(s.seed, s.split_seed) for s in saved] == [(3, 3), (8, 3)]
    assert other.metrics["split"]["seed"] == 3


def test_a_resumed_run_keeps_its_split_seed(cfg, ctrl_c_after_step, tmp_path):
    from handprop.data import load_dataset
    from handprop.run.build import split_indices

    moved = cfg.replace(seed=8, split_seed=3, epochs=10, eval_every=5)
    ctrl_c_after_step(4)
    with pytest.raises(KeyboardInterrupt):
        train_run(moved, default_name="cut", progress=False)
    ctrl_c_after_step(None)
    resumed = resume_run(tmp_path / "runs" / "cut", progress=False)
    assert resumed.status == "completed"
    _, test_idx = split_indices(cfg, load_dataset("digits"))  # seed 3's split
    np.testing.assert_array_equal(np.load(resumed.run_dir / "split.npz")["test_idx"], test_idx)


def cli(*args):
    from click.testing import CliRunner

    from handprop.cli import main

    return CliRunner().invoke(main, list(map(str, args)), catch_exceptions=False)


def test_three_seeds_of_quickstart_form_an_ensemble(tmp_path):
    out = tmp_path / "ens"
    for seed in (0, 1, 2):
        result = cli("train", EXPERIMENTS / "quickstart.toml", "--seed", seed, "--out", out, "-q")
        assert result.exit_code == 0, result.output
    runs = [out / "quickstart", out / "quickstart-2", out / "quickstart-3"]
    saved = [parse_toml_config((r / "config.toml").read_text(), "c") for r in runs]
    assert [(s.seed, s.split_seed) for s in saved] == [(0, 0), (1, 0), (2, 0)]
    tests = [np.load(r / "split.npz")["test_idx"] for r in runs]
    assert all(np.array_equal(t, tests[0]) for t in tests)

    result = cli("evaluate", out, "--ensemble")
    assert result.exit_code == 0, result.output
    assert "ensemble of 3 runs" in result.output

    # --split-seed moves the split: such runs are no ensemble
    moved = tmp_path / "moved"
    for seed in (0, 1):
        args = ("--seed", seed, "--split-seed", seed, "--out", moved, "-q")
        assert cli("train", EXPERIMENTS / "quickstart.toml", *args).exit_code == 0
    result = cli("evaluate", moved, "--ensemble")
    assert result.exit_code != 0 and "other test samples" in result.output


def test_seed_does_not_go_with_resume(cfg):
    run = train_run(cfg.replace(epochs=2, eval_every=2), default_name="r", progress=False)
    result = cli("train", "--resume", run.run_dir, "--seed", "1")
    assert result.exit_code != 0
    assert "--seed goes with CONFIG; a resumed run keeps the seeds it began with" in result.output


def test_training_time_leaves_out_the_reports_but_not_the_validation(tmp_path, monkeypatch):
    """The seconds a run reports are its training's: the epochs, and the validation
    loss that early stopping decides on; not the training and test accuracies or the
    diagnostics, which only report. A fake clock moves 100 s in each report and 1000 s
    in each validation."""
    import importlib
    import types

    from handprop.run import callbacks

    fit = importlib.import_module("handprop.run.fit")  # the module, not run's fit()

    clock = [0.0]
    monkeypatch.setattr(fit, "time", types.SimpleNamespace(perf_counter=lambda: clock[0]))

    def slow(seconds, real):
        def run(*args, **kwargs):
            clock[0] += seconds
            return real(*args, **kwargs)

        return run

    monkeypatch.setattr(
        callbacks.Evaluate, "on_epoch_end", slow(100, callbacks.Evaluate.on_epoch_end)
    )
    monkeypatch.setattr(fit, "validate", slow(1000, fit.validate))
    cfg = parse_toml_config(DIGITS + f'out = "{tmp_path}"\n', "c").replace(epochs=3, eval_every=1)

    def seconds(result):
        with open(result.run_dir / "history.csv", newline="") as f:
            return [float(row["seconds"]) for row in csv.DictReader(f)], result.train_seconds

    plain = train_run(cfg, default_name="plain", progress=False)
    assert seconds(plain) == ([0, 0, 0], 0)
    held_out = train_run(cfg.replace(validation=0.2), default_name="val", progress=False)
    assert seconds(held_out) == ([1000, 2000, 3000], 3000)


def test_label_smoothing_reaches_every_shard_and_changes_what_is_learned(tmp_path):
    from handprop.errors import ConfigError
    from handprop.run import build_network, load_split
    from handprop.scale import DataParallel

    cfg = parse_toml_config(DIGITS + f'out = "{tmp_path}"\n', "c").replace(epochs=5)
    smoothed = cfg.replace(label_smoothing=0.1)
    net = build_network(smoothed, load_split(smoothed, progress=False))
    assert net.loss.smoothing == 0.1 and net.loss_name == "cross_entropy"
    assert all(shard.loss is net.loss for shard in DataParallel(net).shards(2))
    plain = train_run(cfg, default_name="plain", progress=False)
    smooth = train_run(smoothed, default_name="smooth", progress=False)
    assert "label_smoothing = 0.1" in (smooth.run_dir / "config.toml").read_text()
    with np.load(plain.run_dir / "model.npz") as a, np.load(smooth.run_dir / "model.npz") as b:
        assert not np.array_equal(a["params"], b["params"])
    with pytest.raises(ConfigError, match="label smoothing smooths the cross-entropy's targets"):
        cfg.replace(loss="mse", label_smoothing=0.1)
