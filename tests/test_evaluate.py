"""``handprop evaluate``: recomputed metrics, their tables and JSON, and the CLI."""

from __future__ import annotations

import json
import re

import numpy as np
import pytest
from click.testing import CliRunner
from sklearn.metrics import accuracy_score, precision_recall_fscore_support
from sklearn.metrics import confusion_matrix as sk_confusion

from handprop.analysis.evaluate import evaluate_run, format_evaluation, format_table
from handprop.errors import ConfigError, DataError
from test_runs import CLASS_NAMES, Y_PRED, Y_TRUE, write_run


def test_hand_computed_metrics_with_a_class_never_predicted(tmp_path):
    m = evaluate_run(write_run(tmp_path / "run"))["models"]["handprop"]
    # rows true circle/cross/bar; bar (2) is never predicted
    assert m["confusion_matrix"] == [[3, 1, 0], [1, 3, 0], [1, 3, 0]]
    assert m["accuracy"] == pytest.approx(6 / 12)
    assert (m["n_correct"], m["n_incorrect"]) == (6, 6)
    # precision: circle 3/5, cross 3/7, bar 0/0 -> 0; recall: 3/4, 3/4, 0/4
    assert m["per_class"]["precision"] == pytest.approx([3 / 5, 3 / 7, 0.0])
    assert m["per_class"]["recall"] == pytest.approx([0.75, 0.75, 0.0])
    assert m["per_class"]["support"] == [4, 4, 4]
    # most confused: bar->cross 3, then ties of 1 in (true, pred) order
    assert m["top_confusions"][:2] == [
        {"true": "bar", "pred": "cross", "count": 3},
        {"true": "circle", "pred": "cross", "count": 1},
    ]


def test_metrics_match_scikit_learn(tmp_path):
    result = evaluate_run(write_run(tmp_path / "run"))
    m = result["models"]["handprop"]
    assert m["accuracy"] == pytest.approx(accuracy_score(Y_TRUE, Y_PRED))
    np.testing.assert_array_equal(m["confusion_matrix"], sk_confusion(Y_TRUE, Y_PRED))
    p, r, f, s = precision_recall_fscore_support(Y_TRUE, Y_PRED, zero_division=0)
    np.testing.assert_allclose(m["per_class"]["precision"], p)
    np.testing.assert_allclose(m["per_class"]["recall"], r)
    np.testing.assert_allclose(m["per_class"]["f1"], f)
    np.testing.assert_array_equal(m["per_class"]["support"], s)
    for average in ("macro", "weighted"):
        p, r, f, _ = precision_recall_fscore_support(
            Y_TRUE, Y_PRED, average=average, zero_division=0
        )
        assert m["averages"][average]["f1"] == pytest.approx(f)
        assert m["averages"][average]["precision"] == pytest.approx(p)
        assert m["averages"][average]["recall"] == pytest.approx(r)


def test_text_output_has_aligned_tables(tmp_path):
    text = format_evaluation(evaluate_run(write_run(tmp_path / "run")))
    lines = text.splitlines()
    assert re.search(r"^accuracy +50\.00%$", text, re.MULTILINE)
    header = next(line for line in lines if line.startswith("class "))
    rows = [line for line in lines if line.split()[:1] and line.split()[0] in CLASS_NAMES]
    # right-aligned numbers: every row of the per-class table ends where its header does
    per_class = [r for r in rows if len(r.split()) == 5]
    assert len(per_class) == 3
    assert all(len(r) == len(header) for r in per_class)
    assert "\nbar              0.0000  0.0000  0.0000        4\n" in text
    assert "confusion matrix" in text and "most confused pairs" in text
    assert "models" not in lines  # no comparison without comparison files


def test_comparison_models_side_by_side(tmp_path):
    result = evaluate_run(write_run(tmp_path / "run", comparisons=True))
    assert list(result["models"]) == ["handprop", "sklearn_default", "sklearn_analogue"]
    assert result["models"]["sklearn_analogue"]["accuracy"] == 1.0
    text = format_evaluation(result)
    assert "scikit-learn (analogue)   100.00%    1.0000" in text
    assert "handprop                   50.00%" in text


def test_format_table_alignment():
    table = format_table(("name", "value"), [["a", 1], ["long name", 22.5]])
    assert table.splitlines() == [
        "name       value",
        "---------  -----",
        "a              1",
        "long name   22.5",
    ]


def test_a_perfect_run_lists_no_confusions(tmp_path):
    text = format_evaluation(evaluate_run(write_run(tmp_path / "run", y_pred=Y_TRUE)))
    assert "every test sample is classified correctly" in text


def test_recorded_accuracy_mismatch_is_noted(tmp_path):
    folder = write_run(tmp_path / "run")
    metrics = json.loads((folder / "metrics.json").read_text())
    metrics["accuracy"] = 0.9
    (folder / "metrics.json").write_text(json.dumps(metrics))
    assert "metrics.json records accuracy 90.00%" in format_evaluation(evaluate_run(folder))


# --- the command --------------------------------------------------------------------------


def _command():
    from handprop.cli.evaluate import command

    return command


def test_cli_prints_tables(tmp_path):
    result = CliRunner().invoke(_command(), [str(write_run(tmp_path / "run"))])
    assert result.exit_code == 0, result.output
    assert "50.00%" in result.output and "per class" in result.output


def test_cli_json(tmp_path):
    folder = write_run(tmp_path / "run", comparisons=True)
    result = CliRunner().invoke(_command(), [str(folder), "--json", "--top", "2"])
    assert result.exit_code == 0, result.output
    data = json.loads(result.output)
    assert data["class_names"] == CLASS_NAMES
    assert data["models"]["handprop"]["accuracy"] == 0.5
    assert len(data["models"]["handprop"]["top_confusions"]) == 2
    assert data["models"]["sklearn_default"]["confusion_matrix"][0][0] == 3


@pytest.mark.parametrize(
    ("setup", "error", "message"),
    [
        (lambda run: run / "missing", ConfigError, "run folder not found"),
        (lambda run: (run / "predictions.csv").write_text("a,b\n") and run, DataError, "line 1"),
    ],
)
def test_cli_user_errors_raise_handprop_errors(tmp_path, setup, error, message):
    folder = setup(write_run(tmp_path / "run"))
    result = CliRunner().invoke(_command(), [str(folder)])
    assert result.exit_code == 1
    assert isinstance(result.exception, error)
    assert message in str(result.exception)


def test_main_prints_one_line_for_a_user_error(tmp_path):
    from handprop.cli import main

    if "evaluate" not in main.commands:
        pytest.skip("evaluate is not registered in handprop.cli.COMMAND_MODULES yet")
    result = CliRunner().invoke(main, ["evaluate", str(tmp_path / "missing")])
    assert result.exit_code == 1
    assert result.output.strip().count("\n") == 0
    assert "handprop: error:" in result.output and "run folder not found" in result.output


@pytest.mark.parametrize(
    ("first_cell", "message"),
    [
        ("1" + "0" * 30, "line 2, column index: sample index must be at most "
         "9,223,372,036,854,775,807 (an int64's largest), got 1" + "0" * 30),
        ("-18", "line 2, column index: sample index must be >= 0, got -18"),
        ("eighteen", "line 2, column index: expected an integer, got 'eighteen'"),
    ],
)  # fmt: skip
def test_an_edited_predictions_index_is_one_line(tmp_path, first_cell, message):
    from handprop.cli import main

    folder = write_run(tmp_path / "run")
    path = folder / "predictions.csv"
    lines = path.read_text().splitlines()
    lines[1] = first_cell + lines[1][lines[1].index(",") :]
    path.write_text("\n".join(lines) + "\n")
    result = CliRunner().invoke(main, ["evaluate", str(folder)])
    assert result.exit_code == 1, result.output
    assert result.output == f"handprop: error: {path} {message}\n"
