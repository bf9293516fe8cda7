"""Reading run folders: the formats of docs/formats.md and their error messages.

``write_run`` and ``write_grid`` fabricate run folders exactly as docs/formats.md lays
them out; test_evaluate, test_figures and test_report build on them.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from handprop.errors import ConfigError, DataError
from handprop.run.reader import (
    GridFolder,
    RunFolder,
    find_key,
    is_grid,
    read_history,
    read_predictions,
)

CLASS_NAMES = ["circle", "cross", "bar"]
#: the fake dataset: 30 images of 8x8 in 3 classes; the last 12 are the test set
N_IMAGES, TEST_INDEX = 30, np.arange(18, 30)
Y_TRUE = np.array([0, 0, 0, 0, 1, 1, 1, 1, 2, 2, 2, 2])
# class 2 is never predicted: 6 of 12 correct
Y_PRED = np.array([0, 0, 0, 1, 1, 1, 1, 0, 0, 1, 1, 1])


def fake_images() -> np.ndarray:
    """(30, 8, 8) uint8 images: a seeded pattern, enough to show in a grid of mistakes."""
    rng = np.random.default_rng(0)
    return rng.integers(0, 256, size=(N_IMAGES, 8, 8), dtype=np.uint8)


def probabilities(y_pred: np.ndarray, k: int = 3, seed: int = 0) -> np.ndarray:
    """(n, k) rows summing to 1 whose argmax is y_pred."""
    rng = np.random.default_rng(seed)
    P = rng.uniform(0.0, 0.3, size=(len(y_pred), k))
    P[np.arange(len(y_pred)), y_pred] = rng.uniform(0.5, 1.0, size=len(y_pred))
    return P / P.sum(axis=1, keepdims=True)


def predictions_text(index: np.ndarray, y_true: np.ndarray, y_pred: np.ndarray, seed=0) -> str:
    P = probabilities(y_pred, seed=seed)
    k = P.shape[1]
    lines = ["index,true,pred," + ",".join(f"p{j}" for j in range(k))]
    for i, t, p, row in zip(index, y_true, y_pred, P, strict=True):
        lines.append(f"{i},{t},{p}," + ",".join(f"{v:.6f}" for v in row))
    return "\n".join(lines) + "\n"


def write_run(
    folder: Path,
    *,
    comparisons: bool = False,
    history: bool = True,
    hidden: int = 16,
    epochs: int = 6,
    train: int = 18,
    y_pred: np.ndarray = Y_PRED,
    model: bool = True,
    diagnostics: bool = True,
) -> Path:
    """A complete run folder per docs/formats.md; the model is 64-hidden-3 on 8x8 images
    with its initial weights (only the first-layer figure reads it)."""
    folder.mkdir(parents=True, exist_ok=True)
    if model:
        from handprop import nn

        net = nn.Network.from_spec([64, hidden, 3], meta={"image_shape": [8, 8]})
        nn.save(net, folder / "model.npz")
    (folder / "predictions.csv").write_text(predictions_text(TEST_INDEX, Y_TRUE, y_pred))
    if comparisons:
        sk_default = np.where(np.arange(12) % 5 == 0, (Y_TRUE + 1) % 3, Y_TRUE)
        sk_analogue = Y_TRUE.copy()
        for name, pred, seed in (("default", sk_default, 1), ("analogue", sk_analogue, 2)):
            text = predictions_text(TEST_INDEX, Y_TRUE, pred, seed)
            (folder / f"predictions_sklearn_{name}.csv").write_text(text)
    if history:
        rows = ["epoch,loss,train_acc,test_acc,seconds"]
        for e in range(1, epochs + 1):
            acc = f"{0.4 + 0.05 * e:.3f},{0.35 + 0.04 * e:.3f}" if e % 2 == 0 else ","
            rows.append(f"{e},{1.2 / e:.4f},{acc},{0.01 * e:.2f}")
        (folder / "history.csv").write_text("\n".join(rows) + "\n")
    if diagnostics:
        (folder / "diagnostics.csv").write_text(diagnostics_text(epochs, hidden))
    acc = float((y_pred == Y_TRUE).mean())
    metrics = {
        "status": "completed",
        "message": None,
        "accuracy": acc,
        "class_names": CLASS_NAMES,
        "train_seconds": 0.06,
        "epochs_completed": epochs,
        "final_loss": 0.2,
        "n_params": 64 * hidden + hidden + hidden * 3 + 3,
        "dataset": "fake3",
        "split": {"kind": "original", "total": 30, "train": train, "test": 12, "seed": 0},
    }
    (folder / "metrics.json").write_text(json.dumps(metrics, indent=2))
    # flat, every field written out, as handprop.config.to_toml writes it
    (folder / "config.toml").write_text(
        "# handprop run config\n\n"
        f"total = 30\ntrain = {train}\ntest = 12\nhidden = [{hidden}]\n"
        f'learning_rate = 2.5\nepochs = {epochs}\ndataset = "fake3"\n'
        '# data_dir = (not set)  # data directory\nseed = 0\nsplit = "original"\n'
        'activation = ["sigmoid"]\nloss = "cross_entropy"\n'
    )
    return folder


def diagnostics_text(epochs: int, hidden: int) -> str:
    """diagnostics.csv of a 64-hidden-3 sigmoid network evaluated every other epoch."""
    from handprop.run.diagnostics import diagnostics_csv

    rows = []
    for e in range(2, epochs + 1, 2):
        for number, name, act in (
            (1, f"dense 64-{hidden}", "sigmoid"),
            (2, f"dense {hidden}-3", "softmax"),
        ):
            rows.append(
                {
                    "epoch": e,
                    "layer": number,
                    "name": name,
                    "activation": act,
                    "grad_norm": 0.5 / e / number,
                    "weight_norm": 1.0 + 0.1 * e,
                    "update_ratio": 0.01 / e if e > 2 else None,
                    "saturated": 0.02 * e if act == "sigmoid" else None,
                    "dead": None,
                }
            )
    return diagnostics_csv(rows)


def write_grid(folder: Path, runs: dict[str, dict]) -> Path:
    """An experiment grid: one run folder per entry (``write_run`` keywords) + summary.csv."""
    rows = ["run_name,dtrain,m,epochs,accuracy"]
    for name, kwargs in runs.items():
        write_run(folder / name, **kwargs)
        rows.append(
            f"{name},{kwargs.get('train', 18)},{kwargs.get('hidden', 16)},"
            f"{kwargs.get('epochs', 6)},0.5833"
        )
    (folder / "summary.csv").write_text("\n".join(rows) + "\n")
    return folder


# --- predictions.csv ---------------------------------------------------------------------


def test_reads_predictions(tmp_path):
    run = RunFolder(write_run(tmp_path / "run"))
    P = run.predictions
    assert (P.n, P.k) == (12, 3)
    np.testing.assert_array_equal(P.index, TEST_INDEX)
    np.testing.assert_array_equal(P.y_true, Y_TRUE)
    np.testing.assert_array_equal(P.y_pred, Y_PRED)
    assert P.index.dtype == np.int64
    np.testing.assert_allclose(P.P.sum(axis=1), 1.0, atol=1e-5)
    np.testing.assert_array_equal(P.P.argmax(axis=1), Y_PRED)
    assert run.class_names == CLASS_NAMES


def _bad_predictions(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "predictions.csv"
    path.write_text(text)
    return path


GOOD_HEADER = "index,true,pred,p0,p1,p2\n"
GOOD_ROW = "5,0,0,0.8,0.1,0.1\n"


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("", r"predictions.csv: file is empty"),
        ("idx,true,pred,p0,p1,p2\n" + GOOD_ROW, r"predictions.csv line 1: expected header"),
        ("index,true,pred\n" + GOOD_ROW, r"line 1: expected header"),
        ("index,true,pred,p0,p2,p1\n" + GOOD_ROW, r"line 1: expected header"),
        (GOOD_HEADER, r"no prediction rows"),
        (GOOD_HEADER + GOOD_ROW + "6,1,1,0.1,0.9\n", r"line 3: expected 6 columns, got 5"),
        (GOOD_HEADER + GOOD_ROW + "6,1,1,0.1,0.9,0,0\n", r"line 3: expected 6 columns, got 7"),
        (GOOD_HEADER + GOOD_ROW * 2 + "7,1,1,0.1,abc,0\n", r"line 4, column p1: .*'abc'"),
        (GOOD_HEADER + "7,1,1.5,0.1,0.9,0\n", r"line 2, column pred: expected an integer"),
        (GOOD_HEADER + "x,1,1,0.1,0.9,0\n", r"line 2, column index: expected an integer"),
        (GOOD_HEADER + "7,3,1,0.1,0.9,0\n", r"line 2, column true: class id must be in \[0, 3\)"),
        (GOOD_HEADER + "7,1,-1,0.1,0.9,0\n", r"line 2, column pred: class id"),
        (GOOD_HEADER + "7,1,1,nan,0.9,0\n", r"line 2, column p0: expected a finite number"),
    ],
)
def test_malformed_predictions_name_file_and_line(tmp_path, text, message):
    path = _bad_predictions(tmp_path, text)
    with pytest.raises(DataError, match=message) as info:
        read_predictions(path)
    assert str(path) in str(info.value)


def test_blank_lines_are_skipped_and_counted(tmp_path):
    path = _bad_predictions(tmp_path, GOOD_HEADER + "\n" + GOOD_ROW + "\n6,1,x,0,1,0\n")
    with pytest.raises(DataError, match="line 5, column pred"):
        read_predictions(path)


def test_missing_predictions_say_why(tmp_path):
    run = write_run(tmp_path / "run")
    (run / "predictions.csv").unlink()
    metrics = json.loads((run / "metrics.json").read_text())
    metrics["status"] = "interrupted"
    (run / "metrics.json").write_text(json.dumps(metrics))
    with pytest.raises(DataError, match=r"predictions.csv: file not found .*interrupted"):
        _ = RunFolder(run).predictions


#: a predictions.csv edited by hand (issue 27): each is one line naming the line and
#: the column, never an OverflowError from numpy
EDITED = [
    ("99999999999999999999999999,0,0,0.8,0.1,0.1\n",
     r"line 2, column index: sample index must be at most 9,223,372,036,854,775,807 "
     r"\(an int64's largest\), got 99999999999999999999999999$"),
    ("9" * 5000 + ",0,0,0.8,0.1,0.1\n",
     r"line 2, column index: sample index must be at most .*got '9{30}'\.\.\. "
     r"\(5,000 characters\)$"),
    ("-5,0,0,0.8,0.1,0.1\n", r"line 2, column index: sample index must be >= 0, got -5$"),
    ("5,-" + "9" * 5000 + ",0,0.8,0.1,0.1\n",
     r"line 2, column true: class id must be in \[0, 3\), got '-9{29}'\.\.\. \(5,001"),
    ("5,0," + "1" * 30 + ",0.8,0.1,0.1\n", r"line 2, column pred: class id must be in"),
    ("five,0,0,0.8,0.1,0.1\n", r"line 2, column index: expected an integer, got 'five'$"),
    ("5,0,0,0.8," + "1" * 400 + ",0.1\n",
     r"line 2, column p1: expected a finite number, got '1{30}'\.\.\. \(400 characters\)$"),
    ("5,0,0,0.8,NaN,0.1\n", r"line 2, column p1: expected a finite number, got 'NaN'$"),
    ("5,0,0,0.8,0.1\n", r"line 2: expected 6 columns, got 5$"),
]  # fmt: skip


@pytest.mark.parametrize(("row", "message"), EDITED)
def test_an_edited_predictions_csv_is_one_line(tmp_path, row, message):
    path = _bad_predictions(tmp_path, GOOD_HEADER + row)
    with pytest.raises(DataError, match=message) as info:
        read_predictions(path)
    assert str(info.value).startswith(f"{path} line 2")
    assert "\n" not in str(info.value) and len(str(info.value)) < 300


# --- run folder ---------------------------------------------------------------------------


def test_missing_run_folder_is_a_config_error(tmp_path):
    with pytest.raises(ConfigError, match="nowhere: run folder not found"):
        RunFolder(tmp_path / "nowhere")
    (tmp_path / "file").write_text("x")
    with pytest.raises(ConfigError, match="not a folder"):
        RunFolder(tmp_path / "file")


def test_class_names_fall_back_to_the_number_of_prob_columns(tmp_path):
    run = write_run(tmp_path / "run")
    (run / "metrics.json").unlink()
    assert RunFolder(run).class_names == ["0", "1", "2"]


def test_comparisons_are_read_in_a_fixed_order(tmp_path):
    run = RunFolder(write_run(tmp_path / "run", comparisons=True))
    assert list(run.models) == ["handprop", "sklearn_default", "sklearn_analogue"]
    np.testing.assert_array_equal(run.comparisons["sklearn_analogue"].y_pred, Y_TRUE)


def test_comparison_on_other_samples_is_refused(tmp_path):
    folder = write_run(tmp_path / "run")
    text = predictions_text(TEST_INDEX + 1, Y_TRUE, Y_TRUE)
    (folder / "predictions_sklearn_default.csv").write_text(text)
    with pytest.raises(DataError, match="not the same test samples"):
        _ = RunFolder(folder).models


def test_config_and_dataset_lookup(tmp_path):
    run = RunFolder(write_run(tmp_path / "run", hidden=32))
    assert run.config["hidden"] == [32]
    assert run.dataset == "fake3"
    assert run.data_dir is None  # not set: the default
    assert find_key({"a": {"b": {"epochs": 3}}}, "epochs") == 3
    assert find_key({"a": 1}, "epochs") is None


def test_malformed_config_names_the_line(tmp_path):
    folder = write_run(tmp_path / "run")
    (folder / "config.toml").write_text('[data]\ndataset = "fake3"\nepochs = = 3\n')
    with pytest.raises(ConfigError, match=r"config.toml: not valid TOML: .*line 3"):
        _ = RunFolder(folder).config


def test_malformed_metrics_names_the_line(tmp_path):
    folder = write_run(tmp_path / "run")
    (folder / "metrics.json").write_text('{\n  "accuracy": 0.5,\n  "status": \n}\n')
    with pytest.raises(DataError, match=r"metrics.json line 4: not valid JSON"):
        _ = RunFolder(folder).metrics
    (folder / "metrics.json").write_text("[1, 2]")
    with pytest.raises(DataError, match="expected a JSON object"):
        _ = RunFolder(folder).metrics


# --- history.csv --------------------------------------------------------------------------


def test_history_has_nan_where_accuracy_was_not_evaluated(tmp_path):
    h = RunFolder(write_run(tmp_path / "run", epochs=4)).history
    np.testing.assert_array_equal(h["epoch"], [1, 2, 3, 4])
    assert np.isnan(h["test_acc"][0]) and h["test_acc"][1] == pytest.approx(0.43)
    np.testing.assert_allclose(h["loss"], [1.2, 0.6, 0.4, 0.3])


def test_history_missing_columns_are_nan(tmp_path):
    path = tmp_path / "history.csv"
    path.write_text("epoch,loss\n1,0.5\n2,0.25\n")
    h = read_history(path)
    assert np.isnan(h["train_acc"]).all() and h["seconds"].shape == (2,)


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("epoch,train_acc\n1,0.5\n", r"line 1: header lacks column 'loss'"),
        ("epoch,loss,test_acc\n1,0.5\n", r"line 2: expected 3 columns, got 2"),
        ("epoch,loss,test_acc\n1,0.5,0.9\n2,,0.9\n", r"line 3, column loss"),
        ("epoch,loss,test_acc\n1,0.5,high\n", r"line 2, column test_acc: .*'high'"),
    ],
)
def test_malformed_history(tmp_path, text, message):
    path = tmp_path / "history.csv"
    path.write_text(text)
    with pytest.raises(DataError, match=message):
        read_history(path)


# --- grids --------------------------------------------------------------------------------


def test_grid_folder_lists_its_runs(tmp_path):
    grid = write_grid(tmp_path / "grid", {"b": {"epochs": 4}, "a": {"epochs": 8}})
    (grid / "notes").mkdir()  # not a run folder: ignored
    assert is_grid(grid) and not is_grid(grid / "a")
    g = GridFolder(grid)
    assert [r.name for r in g.runs] == ["a", "b"]
    header, rows = g.summary
    assert header[0] == "run_name" and len(rows) == 2


def test_empty_folder_is_not_a_grid(tmp_path):
    with pytest.raises(ConfigError, match="no run folders inside"):
        GridFolder(tmp_path)


def test_a_config_names_its_latest_run(tmp_path, monkeypatch):
    from handprop.run.claim import make_folder
    from handprop.run.reader import latest_run

    monkeypatch.chdir(tmp_path)
    config = tmp_path / "quick.toml"
    config.write_text('dataset = "digits"\nsplit = "standard"\nlearning_rate = 1.0\nepochs = 2\n')
    with pytest.raises(ConfigError, match="no run of this config under runs/ yet"):
        latest_run(config)
    for _ in range(11):
        make_folder("runs", "quick")
    (tmp_path / "runs" / "quick-12").mkdir()  # not made by handprop: never chosen
    assert latest_run(config) == Path("runs") / "quick-11"
    run = write_run(tmp_path / "runs" / "quick-11")
    assert RunFolder(config).path == run.relative_to(tmp_path)
