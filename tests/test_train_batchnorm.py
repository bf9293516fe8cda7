"""Training with batch normalization, elastic distortions and PyTorch's initialisation:
configs, runs that resume bit-exactly, ensembles of runs (digits, offline, seconds)."""

import json

import numpy as np
import pytest
from click.testing import CliRunner

from handprop import nn
from handprop.cli import main
from handprop.config import parse_toml_config
from handprop.errors import ConfigError
from handprop.run import build_network, load_split, train_run
from handprop.run.build import init_like_pytorch

CNN = """
dataset = "digits"
total = 600
train = 500
test = 100
layers = ["conv 4 3 pad=1", "batchnorm", "relu", "maxpool 2", "dense 16", "batchnorm", "relu"]
init = "pytorch"
optimizer = "adam"
learning_rate = 0.003
batch_size = 50
epochs = 8
eval_every = 4
augment_shift = 1
augment_elastic_alpha = 2.0
augment_elastic_sigma = 1.5
"""


def config(tmp_path, text=CNN, **changes):
    cfg = parse_toml_config(text + f'out = "{tmp_path}"\n', "bn.toml")
    return cfg.replace(**changes) if changes else cfg


def test_elastic_fields_are_validated(tmp_path):
    for bad, match in [
        ("augment_elastic_alpha = -1", "augment_elastic_alpha must be a finite number >= 0"),
        ("augment_elastic_sigma = 0", "augment_elastic_sigma must be a finite number > 0"),
    ]:
        with pytest.raises(ConfigError, match=match):
            text = CNN.replace("augment_elastic_alpha = 2.0", "")
            text = text.replace("augment_elastic_sigma = 1.5", "")
            parse_toml_config(text + bad, "x.toml")
    no_batches = CNN.replace("batch_size = 50", "").replace("augment_shift = 1", "")
    with pytest.raises(ConfigError, match="line 14: augmentation is applied per mini-batch"):
        parse_toml_config(no_batches, "x.toml")
    assert config(tmp_path).augment_elastic_sigma == 1.5


def test_pytorch_init_draws_weights_and_biases_within_one_over_sqrt_fan_in(tmp_path):
    cfg = config(tmp_path)
    net = build_network(cfg, load_split(cfg, progress=False))
    conv, bn, dense = net.layers[0], net.layers[1], net.layers[5]
    for layer, fan_in in [(conv, 1 * 3 * 3), (dense, 4 * 4 * 4)]:
        bound = 1 / np.sqrt(fan_in)
        for array in (layer.W, layer.b):
            assert np.abs(array).max() <= bound and np.abs(array).max() > 0.8 * bound
    assert (bn.gamma == 1).all() and (bn.beta == 0).all() and (bn.running_var == 1).all()
    again = nn.Network.from_architecture(net.architecture())
    init_like_pytorch(again, np.random.default_rng(cfg.seed))
    np.testing.assert_array_equal(again.layers[0].W, conv.W)  # seeded


def test_a_batchnorm_cnn_with_elastic_distortions_resumes_bit_exactly(
    tmp_path, monkeypatch, cut_and_resumed
):
    cfg = config(tmp_path)
    full = train_run(cfg, default_name="full", progress=False)
    assert full.status == "completed" and full.accuracy > 0.7
    net = nn.load(full.run_dir / "model.npz")
    bn = net.layers[1]
    assert bn.kind == "batchnorm" and not (bn.running_var == 1).all()  # averages moved

    resumed = cut_and_resumed(cfg, 55)  # cut in the sixth epoch (10 batches per epoch)
    # weights and the running averages alike: they live in the saved parameter vector
    np.testing.assert_array_equal(resumed.params, net.params)


def test_a_grid_of_runs_is_evaluated_and_predicted_as_one_ensemble(tmp_path):
    grid = tmp_path / "grid"
    # the original split draws its test set from the seed: the same seed, other models
    runs = [train_run(config(grid, seed=1, epochs=4), default_name="s1", progress=False)]
    runs += [
        train_run(config(grid, epochs=4, learning_rate=lr), default_name=f"lr{lr}", progress=False)
        for lr in (0.003, 0.002, 0.005)
    ]
    result = CliRunner().invoke(main, ["evaluate", str(runs[0].run_dir), str(runs[1].run_dir)])
    assert result.exit_code == 1
    assert "other test samples" in result.output and "must agree" in result.output
    members = [str(r.run_dir) for r in runs[1:]]
    result = CliRunner().invoke(main, ["evaluate", *members, "--json"])
    assert result.exit_code == 0, result.output
    out = json.loads(result.output)
    assert next(iter(out["models"])) == "ensemble" and out["members"] == members
    P = np.mean([nn.load(r.run_dir / "model.npz").predict_proba(_test_X(r)) for r in runs[1:]],
                axis=0)  # fmt: skip
    y = _test_y(runs[1])
    assert out["models"]["ensemble"]["accuracy"] == pytest.approx((P.argmax(1) == y).mean())
    seconds = sum(r.train_seconds for r in runs[1:])
    assert out["models"]["ensemble"]["train_seconds"] == pytest.approx(seconds, rel=1e-3)
    # a grid folder as a whole: --ensemble, else a hint to use it
    (grid / runs[0].run_dir.name).rename(tmp_path / "aside")
    result = CliRunner().invoke(main, ["evaluate", str(grid)])
    assert result.exit_code == 1 and "--ensemble" in result.output
    result = CliRunner().invoke(main, ["evaluate", str(grid), "--ensemble"])
    assert result.exit_code == 0, result.output
    assert "ensemble of 3 runs" in result.output and "members:" in result.output

    # predict: several models average their probabilities
    from handprop.data import load_dataset

    ds = load_dataset("digits")
    csv = tmp_path / "rows.csv"
    rows = ds.images[:5].reshape(5, -1)
    lines = [",".join(map(str, [ds.labels[i], *rows[i]])) for i in range(5)]  # label first
    csv.write_text("\n".join(lines) + "\n")
    result = CliRunner().invoke(main, ["predict", *members, str(csv), "--top", "10"])
    assert result.exit_code == 0, result.output
    X = (rows / ds.pixel_max).reshape(5, 1, 8, 8)
    P = np.mean([nn.load(f"{m}/model.npz").predict_proba(X) for m in members], axis=0)
    first = result.stdout.splitlines()[0]  # "ensemble of ..." goes to stderr
    assert f"-> {P[0].argmax()}" in first and f"{P[0].max():.3f}" in first
    # models of other inputs or classes are refused, naming the file
    other = nn.Network.from_spec("64-10-3", meta={"image_shape": [8, 8], "pixel_max": 16.0})
    nn.save(other, tmp_path / "other.npz")
    result = CliRunner().invoke(
        main, ["predict", members[0], str(tmp_path / "other.npz"), str(csv)]
    )
    assert result.exit_code == 1
    assert "other.npz" in result.output and "must agree on input shape and classes" in result.output


def _test_X(run):
    from handprop.data import load_dataset, normalize

    ds = load_dataset("digits")
    idx = np.load(run.run_dir / "split.npz")["test_idx"]
    return normalize(ds.images[idx], ds.pixel_max).reshape(len(idx), 1, 8, 8)


def _test_y(run):
    from handprop.data import load_dataset

    idx = np.load(run.run_dir / "split.npz")["test_idx"]
    return load_dataset("digits").labels[idx]


def test_recalibration_averages_the_batch_statistics_of_clean_data(rng):
    from handprop.run.fit import recalibrate_batchnorm

    net = nn.Network.from_layers(["dense 4", "batchnorm", "relu", "dropout 0.5"], (3,), 2, rng=0)
    net.forward(rng.normal(size=(8, 3)).astype(np.float32), training=True)  # moves them
    X = rng.normal(2.0, 3.0, size=(10, 3)).astype(np.float32)
    recalibrate_batchnorm(net, X, batch=5)
    bn, drop = net.layers[1], net.layers[3]
    Z = net.layers[0].forward(X).astype(np.float64)
    halves = (Z[:5], Z[5:])
    np.testing.assert_allclose(bn.running_mean, np.mean([h.mean(0) for h in halves], 0), rtol=1e-5)
    np.testing.assert_allclose(
        bn.running_var, np.mean([h.var(0, ddof=1) for h in halves], 0), rtol=1e-5
    )
    assert bn.momentum == 0.1 and drop.p == 0.5  # put back


def test_a_run_can_recalibrate_its_batchnorm_statistics(tmp_path):
    cfg = config(tmp_path, epochs=3, batchnorm_stats="recalibrate")
    result = train_run(cfg, default_name="recal", progress=False)
    assert result.status == "completed"
    net = nn.load(result.run_dir / "model.npz")
    plain = nn.load(train_run(config(tmp_path, epochs=3), progress=False).run_dir / "model.npz")
    bn, bn0 = net.layers[1], plain.layers[1]
    np.testing.assert_array_equal(bn.gamma, bn0.gamma)  # the same training ...
    assert not np.array_equal(bn.running_mean, bn0.running_mean)  # ... other statistics
    with pytest.raises(ConfigError, match="batchnorm_stats must be one of running, recalibrate"):
        config(tmp_path, batchnorm_stats="clean")


# -- weight averaging ------------------------------------------------------------------------

AVERAGED = CNN.replace("eval_every = 4", 'eval_every = 4\nbatchnorm_stats = "recalibrate"')


def test_weight_average_is_the_mean_of_the_vectors_it_saw():
    from handprop.run.callbacks import WeightAverage

    rng = np.random.default_rng(0)
    vectors = rng.normal(size=(5, 7)).astype(np.float32)
    average = WeightAverage(start=1)
    for v in vectors:
        average.update(v.copy())
    np.testing.assert_allclose(average.mean, vectors.mean(axis=0), rtol=1e-6, atol=1e-7)
    assert average.count == 5 and average.mean.dtype == np.float32
    assert average.state()["averaged"] == 5
    assert WeightAverage(start=None).state() == {}


def test_an_averaged_run_ends_on_the_mean_of_its_last_epochs_with_their_own_statistics(
    tmp_path, monkeypatch
):
    from handprop.run.callbacks import WeightAverage

    seen = []
    update = WeightAverage.update

    def keep(self, params):
        seen.append(np.array(params))
        update(self, params)

    monkeypatch.setattr(WeightAverage, "update", keep)
    cfg = config(tmp_path, AVERAGED, average_from=6)
    run = train_run(cfg, default_name="averaged", progress=False)
    assert run.status == "completed" and len(seen) == 3  # epochs 6, 7 and 8
    net = nn.load(run.run_dir / "model.npz")
    learned = net.layout.mask(("W", "b", "gamma", "beta"))
    mean = np.mean(seen, axis=0)
    np.testing.assert_allclose(net.params[learned], mean[learned], rtol=1e-5, atol=1e-6)
    # batchnorm's statistics are the averaged weights' own, not those of any epoch's
    stats = ~learned
    assert not any(np.allclose(net.params[stats], s[stats]) for s in seen)
    metrics = json.loads((run.run_dir / "metrics.json").read_text())
    assert metrics["weight_average"] == {"from_epoch": 6, "epochs": 3}
    assert metrics["accuracy"] > 0.7
    # the history's last accuracy is the last epoch's own parameters'
    history = (run.run_dir / "history.csv").read_text().splitlines()
    assert history[-1].startswith("8,")

    # the averaging changes no step: the same run without it has the same history
    plain = train_run(config(tmp_path, AVERAGED), default_name="plain", progress=False)
    assert _history(run) == _history(plain)
    assert not np.array_equal(nn.load(plain.run_dir / "model.npz").params, net.params)


def _history(run):
    """history.csv's rows without their seconds (the one column that differs by run)."""
    lines = (run.run_dir / "history.csv").read_text().splitlines()
    return [line.rsplit(",", 1)[0] for line in lines]


@pytest.mark.parametrize("step", [45, 65])  # before the averaging starts; in its second epoch
def test_an_averaged_run_resumes_bit_exactly(tmp_path, cut_and_resumed, step):
    cfg = config(tmp_path, AVERAGED, average_from=6)
    full = train_run(cfg, default_name="full", progress=False)
    resumed = cut_and_resumed(cfg, step)
    np.testing.assert_array_equal(resumed.params, nn.load(full.run_dir / "model.npz").params)


def test_averaging_is_refused_where_it_cannot_be_the_result(tmp_path):
    with pytest.raises(ConfigError, match="line 17: average_from = 9 is after the last epoch"):
        parse_toml_config(AVERAGED + "average_from = 9\n", "x.toml")
    with pytest.raises(ConfigError, match="weight averaging and a validation split"):
        parse_toml_config(AVERAGED + "average_from = 2\nvalidation = 0.1\n", "x.toml")
    # averaged weights with the running batchnorm statistics of other weights
    bn_with_settings = CNN.replace('"batchnorm"', '"BatchNorm momentum=0.2"')
    for text in (CNN, bn_with_settings):
        with pytest.raises(
            ConfigError, match="line 16: averaged weights need batchnorm statistics"
        ):
            parse_toml_config(text + "average_from = 2\n", "x.toml")
    with pytest.raises(ConfigError, match='override: .* set batchnorm_stats = "recalibrate"'):
        config(tmp_path, CNN, average_from=2)
    # a network without batchnorm averages with no more to set
    plain = CNN.replace('"batchnorm", ', "")
    assert parse_toml_config(plain + "average_from = 2\n", "x.toml").average_from == 2
