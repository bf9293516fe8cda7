"""``handprop compare``: scikit-learn's MLPClassifier on exactly a run's split."""

import json

import numpy as np
import pytest
from click.testing import CliRunner

from handprop.analysis.compare import compare_run, format_comparison, sklearn_params
from handprop.analysis.evaluate import evaluate_run
from handprop.cli import main
from handprop.config import parse_toml_config
from handprop.errors import ConfigError, DataError
from handprop.run import train_run
from handprop.run.reader import read_predictions

DIGITS = """
dataset = "digits"
total = 900
train = 700
test = 200
hidden = [16]
activation = "sigmoid"
learning_rate = 2.0
epochs = 25
eval_every = 25
seed = 5
"""


def config(tmp_path, extra=""):
    text = DIGITS + extra + f'out = "{tmp_path / "runs"}"\n'
    return parse_toml_config(text, "digits.toml")


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("compare")
    return train_run(config(tmp), default_name="digits", progress=False).run_dir


@pytest.fixture(scope="module")
def compared(run_dir):
    return compare_run(run_dir, progress=False)


def test_both_models_predict_the_very_same_test_samples(run_dir, compared):
    own = read_predictions(run_dir / "predictions.csv")
    for name in ("default", "analogue"):
        other = read_predictions(run_dir / f"predictions_sklearn_{name}.csv")
        np.testing.assert_array_equal(other.index, own.index)
        np.testing.assert_array_equal(other.y_true, own.y_true)
        np.testing.assert_allclose(other.P.sum(axis=1), 1.0, atol=1e-4)
        assert other.P.shape == own.P.shape
        entry = compared["models"][f"sklearn_{name}"]
        assert entry["accuracy"] == pytest.approx(np.mean(other.y_pred == other.y_true))
        assert entry["accuracy"] > 0.8  # both learn digits
        assert entry["train_seconds"] > 0


def test_the_analogue_is_the_runs_own_algorithm(compared):
    analogue = compared["models"]["sklearn_analogue"]
    p = analogue["params"]
    assert p["hidden_layer_sizes"] == [16] and p["activation"] == "logistic"
    assert p["solver"] == "sgd" and p["batch_size"] == 700  # full batch
    assert (p["momentum"], p["alpha"], p["learning_rate_init"]) == (0.0, 0.0, 2.0)
    assert p["shuffle"] is False and p["max_iter"] == 25
    assert analogue["epochs"] == 25  # no early stop before the run's epoch count
    assert compared["models"]["sklearn_default"]["params"] == {
        "hidden_layer_sizes": [16],
        "random_state": 5,
    }


def test_comparison_json_and_evaluate_show_the_times(run_dir, compared):
    saved = json.loads((run_dir / "comparison.json").read_text())
    assert list(saved["models"]) == ["handprop", "sklearn_default", "sklearn_analogue"]
    assert saved["split"] == {"train": 700, "test": 200, "dtype": "float32"}
    result = evaluate_run(run_dir)
    seconds = {m: v.get("train_seconds") for m, v in result["models"].items()}
    assert seconds["sklearn_analogue"] == saved["models"]["sklearn_analogue"]["train_seconds"]
    assert all(isinstance(s, float) for s in seconds.values())
    text = format_comparison(compared)
    assert "scikit-learn (analogue)" in text and "time (s)" in text


def test_only_one_model_keeps_the_other_result(run_dir, compared):
    again = compare_run(run_dir, models=("sklearn_default",), progress=False)
    assert again["models"]["sklearn_analogue"] == compared["models"]["sklearn_analogue"]
    # scikit-learn is seeded from the run's seed: the same model again
    assert again["models"]["sklearn_default"]["accuracy"] == pytest.approx(
        compared["models"]["sklearn_default"]["accuracy"]
    )


def test_params_follow_a_mini_batch_adam_run(tmp_path):
    cfg = config(
        tmp_path,
        'optimizer = "adam"\nbatch_size = 64\nweight_decay = 0.001\nloss = "mse"\ndropout = 0.2\n',
    )
    params, notes = sklearn_params("sklearn_analogue", cfg, 700)
    assert params["solver"] == "adam" and params["batch_size"] == 64 and params["shuffle"]
    assert params["alpha"] == pytest.approx(0.064)  # weight decay times the batch size
    assert any("mse" in n for n in notes) and any("dropout" in n for n in notes)
    cfg = config(tmp_path, 'optimizer = "nesterov"\nbatch_size = 32\nmomentum = 0.8\n')
    params, _ = sklearn_params("sklearn_analogue", cfg, 700)
    assert params["solver"] == "sgd" and params["momentum"] == 0.8
    assert params["nesterovs_momentum"] is True


def test_a_changed_split_is_refused(tmp_path, run_dir):
    import shutil

    copy = tmp_path / "copy"
    shutil.copytree(run_dir, copy)
    with np.load(copy / "split.npz") as z:
        train_idx, test_idx = z["train_idx"], z["test_idx"]
    np.savez(copy / "split.npz", train_idx=train_idx[::-1], test_idx=test_idx)
    with pytest.raises(DataError, match="train_idx differs"):
        compare_run(copy, progress=False)
    (copy / "split.npz").unlink()
    with pytest.raises(DataError, match="split.npz: file not found"):
        compare_run(copy, progress=False)


def test_an_unfinished_or_cnn_run_is_refused(tmp_path, run_dir):
    import shutil

    copy = tmp_path / "copy"
    shutil.copytree(run_dir, copy)
    metrics = json.loads((copy / "metrics.json").read_text())
    (copy / "metrics.json").write_text(json.dumps({**metrics, "status": "diverged"}))
    with pytest.raises(DataError, match="not completed"):
        compare_run(copy, progress=False)
    (copy / "metrics.json").write_text(json.dumps(metrics))
    text = (copy / "config.toml").read_text().replace("hidden = [16]", "")
    (copy / "config.toml").write_text(text + 'layers = ["conv 4 3", "maxpool 2"]\n')
    with pytest.raises(ConfigError, match="fully-connected"):
        compare_run(copy, progress=False)


def test_a_folder_that_is_no_run_is_refused(tmp_path, run_dir):
    with pytest.raises(DataError, match="no metrics.json; not a handprop run folder$"):
        compare_run(tmp_path, progress=False)
    grid = tmp_path / "grid"
    grid.mkdir()
    (grid / "summary.csv").write_text("run,status\n")
    with pytest.raises(DataError, match="an experiment grid"):
        compare_run(grid, progress=False)


def test_cli_prints_the_table(run_dir, compared):
    result = CliRunner().invoke(main, ["compare", str(run_dir), "--only", "default", "-q"])
    assert result.exit_code == 0, result.output
    assert "scikit-learn (default)" in result.output and "handprop" in result.output


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (("split_seed = 5", "split_seed = 6"), "split_seed is 6, but the run's was 5"),
        (("test = 200", "test = 150"), "test is 150, but the run's was 200"),
        (("train = 700", "train = 600"), "train is 600, but the run's was 700"),
        (("validation = 0.0", "validation = 0.1"),
         "validation is 0.1 (70 samples), but the run's was 0 samples"),
        (('dataset = "digits"', 'dataset = "mnist"'),
         "dataset is 'mnist', but the run's was 'digits'"),
    ],
)  # fmt: skip
def test_an_edited_config_is_named_not_the_dataset_files(tmp_path, run_dir, edit, message):
    import shutil

    copy = tmp_path / "copy"
    shutil.copytree(run_dir, copy)
    text = (copy / "config.toml").read_text()
    assert f"\n{edit[0]}\n" in text
    (copy / "config.toml").write_text(text.replace(f"\n{edit[0]}\n", f"\n{edit[1]}\n"))
    with pytest.raises(ConfigError) as info:
        compare_run(copy, progress=False)
    assert str(info.value) == (
        f"{copy / 'config.toml'}: {message} (its metrics.json); the config was edited "
        f"after the run: put {message.split()[0]} back, compare trains on the run's own split"
    )
    result = CliRunner().invoke(main, ["compare", str(copy), "-q"])
    assert result.exit_code == 1 and result.output == f"handprop: error: {info.value}\n"
