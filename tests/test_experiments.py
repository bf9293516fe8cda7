"""Experiment grids on scikit-learn's digits: rows to run folders, resume, failures."""

import csv
import json
from pathlib import Path

import pytest

from handprop.config import parse_toml_config
from handprop.errors import ConfigError
from handprop.experiments import read_grid, run_grid

HEADER = "run_name,d,dtrain,dtest,m,alpha,epochs,dataset,eval_every"
EXPERIMENTS = Path(__file__).parents[1] / "experiments"  # the configs the project ships


def write(path, *rows, header=HEADER):
    path.write_text("\n".join([header, *rows]) + "\n")
    return path


def test_grid_runs_every_row_and_writes_a_summary(tmp_path):
    grid = write(
        tmp_path / "grid.csv",
        "small,600,500,100,16,2.0,150,digits,50,",
        "wide,600,500,100,32,2.0,150,digits,50,",
        "boom,600,500,100,16,1e30,20,digits,10,identity",
        header=HEADER + ",activation",
    )
    rows = read_grid(grid)
    assert [r.name for r in rows] == ["small", "wide", "boom"]
    assert rows[1].config.hidden == (32,) and rows[0].config.learning_rate == 2.0
    seen = []
    out = tmp_path / "out"
    summaries = run_grid(rows, out, progress=False, on_done=seen.append)
    assert [s.status for s in summaries] == ["completed", "completed", "diverged"]
    assert summaries[0].accuracy > 0.5
    assert "smaller learning rate" in summaries[2].message
    with (out / "summary.csv").open() as f:
        table = list(csv.DictReader(f))
    assert [r["run"] for r in table] == ["small", "wide", "boom"]
    assert table[2]["status"] == "diverged"
    assert "| small |" in (out / "summary.md").read_text()

    # again: completed runs are skipped, the failed one is tried again
    again = run_grid(read_grid(grid), out, progress=False)
    assert [s.status for s in again] == ["skipped", "skipped", "diverged"]
    assert again[0].accuracy == summaries[0].accuracy


def test_an_interrupted_grid_resumes(tmp_path, monkeypatch, ctrl_c_after_step):
    from handprop.train import resume_run

    grid = write(tmp_path / "g.csv", "a,400,300,100,8,2.0,12,digits,4")
    rows = read_grid(grid)
    ctrl_c_after_step(5)
    with pytest.raises(KeyboardInterrupt):
        run_grid(rows, tmp_path / "out", progress=False)
    ctrl_c_after_step(None)
    resumed = []
    monkeypatch.setattr(
        "handprop.train.resume_run",
        lambda d, progress, **kw: resumed.append(d) or resume_run(d, progress, **kw),
    )
    [summary] = run_grid(rows, tmp_path / "out", progress=False)
    assert summary.status == "completed" and resumed
    metrics = json.loads((tmp_path / "out" / "a" / "metrics.json").read_text())
    assert metrics["epochs_completed"] == 12


def test_parallel_jobs_give_the_same_results(tmp_path):
    grid = write(
        tmp_path / "g.csv", "a,400,300,100,8,2.0,10,digits,5", "b,400,300,100,12,2.0,10,digits,5"
    )
    serial = run_grid(read_grid(grid), tmp_path / "s", progress=False)
    parallel = run_grid(read_grid(grid), tmp_path / "p", jobs=2, progress=False)
    assert [s.accuracy for s in serial] == [p.accuracy for p in parallel]


def test_base_config_fills_empty_cells(tmp_path):
    base = parse_toml_config(
        'dataset = "digits"\ntotal = 500\ntrain = 400\ntest = 100\nlearning_rate = 1.0\n'
        'epochs = 5\nactivation = "tanh"\nseed = 7\n',
        "base.toml",
    )
    grid = write(tmp_path / "g.csv", "x,,,,,0.5,", header="run_name,d,dtrain,dtest,m,alpha,epochs")
    [row] = read_grid(grid, base)
    cfg = row.config
    assert (cfg.total, cfg.learning_rate, cfg.epochs, cfg.seed) == (500, 0.5, 5, 7)
    assert cfg.activation == ("tanh",) and cfg.name == "x"


@pytest.mark.parametrize(
    "header, row, message",
    [
        (HEADER, "a,600,500,100,16,fast,20,digits,10", r"g.csv row 2 column alpha: .*'fast'"),
        (HEADER + ",colour", "a,600,500,100,16,2,20,digits,10,red", "unknown key 'colour'"),
        (HEADER, "a,600,500,100,16,2,20", "expected 9 cells"),
        (HEADER, "a,600,500,200,16,2,20,digits,10", "row 2 column dtest"),
        ("d,dtrain,dtest,m,alpha,epochs", "600,500,100,16,2,20", "needs a run_name column"),
        (HEADER, "../x,600,500,100,16,2,20,digits,10", "column run_name: it holds '/'"),
    ],
)
def test_bad_grids_are_refused_with_row_and_column(tmp_path, header, row, message):
    grid = write(tmp_path / "g.csv", row, header=header)
    with pytest.raises(ConfigError, match=message):
        read_grid(grid)


def test_duplicate_run_names_are_refused(tmp_path):
    grid = write(
        tmp_path / "g.csv", "a,600,500,100,16,2,20,digits,10", "a,600,500,100,8,2,20,digits,10"
    )
    with pytest.raises(ConfigError, match="row 3 column run_name: 'a' already used on row 2"):
        read_grid(grid)


def test_the_original_experiment_csv_parses():
    rows = read_grid(EXPERIMENTS / "original.csv")
    assert [(r.name, r.config.total, r.config.epochs) for r in rows] == [
        ("baseline_300", 5000, 300),
        ("epochs_1000", 5000, 1000),
        ("more_data_20k", 20000, 1000),
    ]


@pytest.mark.parametrize(
    "path", sorted([*EXPERIMENTS.glob("*.toml"), *EXPERIMENTS.glob("*.cfg")]), ids=lambda p: p.name
)
def test_every_shipped_config_loads(path):
    from handprop.config import load_config

    assert load_config(path).epochs >= 1


def test_the_cnn_ensemble_grid_is_three_seeds_of_cnn_wide():
    from handprop.config import load_config

    base = load_config(EXPERIMENTS / "cnn_wide.toml")
    rows = read_grid(EXPERIMENTS / "cnn_ensemble.csv", base)
    assert [(r.name, r.config.seed) for r in rows] == [("seed0", 0), ("seed1", 1), ("seed2", 2)]
    for row in rows:  # everything else is the base config's
        assert row.config.layers == base.layers and row.config.augment_rotate == 8
        assert row.config.epochs == 20 and row.config.split == "standard"


def test_a_grid_row_can_be_a_cnn(tmp_path):
    grid = write(
        tmp_path / "g.csv",
        'cnn,600,500,100,,0.01,2,digits,2,adam,32,"conv 4 3 pad=1; relu; maxpool 2; dense 16"',
        header=HEADER + ",optimizer,batch_size,layers",
    )
    rows = read_grid(grid)
    assert rows[0].config.layers == ("conv 4 3 pad=1", "relu", "maxpool 2", "dense 16")
    (summary,) = run_grid(rows, tmp_path / "out", progress=False)
    assert summary.status == "completed" and summary.accuracy > 0.3
    from handprop import nn

    net = nn.load(tmp_path / "out" / "cnn" / "model.npz")
    assert net.layers[0].kind == "conv2d" and net.input_shape == (1, 8, 8)
