"""The original's experiment grid and the scikit-learn comparison on real MNIST (slow).

Run with ``python -m pytest -m slow``; MNIST is found through ``HANDPROP_TEST_MNIST``
only (skipped, saying so, without it). About three minutes on 2 cores.
"""

import csv
from pathlib import Path

import pytest
from click.testing import CliRunner

from conftest import mnist_dir
from handprop.cli import main

ROOT = Path(__file__).parents[1]
MNIST = mnist_dir()

pytestmark = [pytest.mark.slow, pytest.mark.mnist]


def cli(*args):
    result = CliRunner().invoke(main, [str(a) for a in args], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    return result.output


def test_the_original_grid_and_its_comparison(tmp_path):
    grid = tmp_path / "original"
    cli("experiments", ROOT / "experiments/original.csv", "--out", grid, "--data-dir", MNIST,
        "--jobs", 2, "-q")  # fmt: skip
    with (grid / "summary.csv").open() as f:
        rows = {row["run"]: row for row in csv.DictReader(f)}
    assert [rows[r]["status"] for r in rows] == ["completed"] * 3
    acc = {name: float(row["accuracy"]) for name, row in rows.items()}
    # the original saw accuracy grow with epochs and with data; 96.15% for 20k
    assert acc["baseline_300"] > 0.88
    assert acc["epochs_1000"] > acc["baseline_300"]
    assert acc["more_data_20k"] >= 0.96

    run = grid / "more_data_20k"
    out = cli("compare", run, "--data-dir", MNIST, "-q")
    assert "scikit-learn (analogue)" in out
    for name in ("sklearn_default", "sklearn_analogue"):
        assert (run / f"predictions_{name}.csv").is_file()
    cli("figures", grid)
    cli("report", grid)
    assert (grid / "report.html").stat().st_size > 10_000
