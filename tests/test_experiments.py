"""Experiment grids on scikit-learn's digits: rows to run folders, resume, failures."""

import csv
import json
from pathlib import Path

import pytest

from handprop.config import parse_toml_config, to_toml
from handprop.errors import ConfigError, Interrupted
from handprop.grids.grid import read_grid, run_grid

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

    # again: completed runs are skipped (and stay completed), the failed one is tried again
    again = run_grid(read_grid(grid), out, progress=False)
    assert [s.status for s in again] == ["completed", "completed", "diverged"]
    assert [s.skipped for s in again] == [True, True, False]
    assert again[0].accuracy == summaries[0].accuracy


def test_an_interrupted_grid_resumes(tmp_path, monkeypatch, ctrl_c_after_step):
    from handprop.run import resume_run

    grid = write(tmp_path / "g.csv", "a,400,300,100,8,2.0,12,digits,4")
    rows = read_grid(grid)
    ctrl_c_after_step(5)
    with pytest.raises(Interrupted) as stop:
        run_grid(rows, tmp_path / "out", progress=False)
    ctrl_c_after_step(None)
    # the stop carries every row's summary, for the command line's table
    assert [(s.name, s.status) for s in stop.value.outcome] == [("a", "interrupted")]
    resumed = []
    monkeypatch.setattr(
        "handprop.run.resume_run",
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


def test_a_finished_grid_run_again_keeps_its_summary(tmp_path):
    from click.testing import CliRunner

    from handprop.cli import main

    grid = write(
        tmp_path / "g.csv", "a,400,300,100,8,2.0,6,digits,3", "b,400,300,100,12,2.0,6,digits,3"
    )
    out = tmp_path / "out"

    def experiments():
        args = ["experiments", str(grid), "--out", str(out), "-q"]
        result = CliRunner().invoke(main, args, catch_exceptions=False)
        assert result.exit_code == 0, result.output
        with (out / "summary.csv").open() as f:
            return result.output, list(csv.DictReader(f))

    first_output, first = experiments()
    again_output, again = experiments()
    assert [r["status"] for r in first] == ["completed", "completed"]
    columns = ("run", "status", "accuracy", "final_loss", "epochs", "message")
    assert [[r[c] for c in columns] for r in again] == [[r[c] for c in columns] for r in first]
    assert "a: skipped, already completed accuracy" in again_output  # the console says so
    assert "skipped" not in first_output and "skipped" not in (out / "summary.md").read_text()


DIGITS_BASE = (
    'dataset = "digits"\ntotal = 500\ntrain = 400\ntest = 100\nhidden = 8\n'
    "learning_rate = 2.0\nepochs = 4\neval_every = 4\n"
)


def test_a_seed_column_over_a_base_config_keeps_the_base_split(tmp_path):
    from handprop.analysis.evaluate import evaluate_ensemble

    base = parse_toml_config(DIGITS_BASE + "seed = 5\n", "base.toml")
    grid = write(tmp_path / "g.csv", "s0,0", "s1,1", "s2,2", header="run_name,seed")
    rows = read_grid(grid, base)
    assert [(r.config.seed, r.config.resolved_split_seed) for r in rows] == [(0, 5), (1, 5), (2, 5)]
    out = tmp_path / "out"
    assert [s.status for s in run_grid(rows, out, progress=False)] == ["completed"] * 3
    assert evaluate_ensemble([out])["run"] == "ensemble of 3 runs"  # one test set

    # a split_seed column moves it; without a base each row's seed is its split's too
    grid = write(tmp_path / "h.csv", "s0,0,0", "s1,1,1", header="run_name,seed,split_seed")
    assert [r.config.resolved_split_seed for r in read_grid(grid, base)] == [0, 1]
    grid = write(
        tmp_path / "k.csv",
        "s0,500,400,100,4,2.0,4,0",
        "s1,500,400,100,4,2.0,4,1",
        header="run_name,d,dtrain,dtest,m,alpha,epochs,seed",
    )
    rows = read_grid(grid)
    assert [(r.config.split_seed, r.config.resolved_split_seed) for r in rows] == [
        (None, 0),
        (None, 1),
    ]


def test_a_row_run_before_split_seed_existed_is_still_its_run(tmp_path):
    from handprop.grids.grid import existing_row

    def folder_of(cfg, name):
        # config.toml as handprop wrote it before split_seed: no such line
        folder = tmp_path / name
        folder.mkdir()
        text = "".join(
            line for line in to_toml(cfg).splitlines(keepends=True) if "split_seed" not in line
        )
        (folder / "config.toml").write_text(text)
        return folder

    standard = parse_toml_config('split = "standard"\nlearning_rate = 1e-3\nepochs = 2\n', "c")
    # a seed column over a base: the row now keeps the base's split seed (0)
    row = standard.replace(seed=1, split_seed=0)
    assert existing_row(row, folder_of(standard.replace(seed=1), "standard")) is None

    original = parse_toml_config(DIGITS_BASE, "c")
    row = original.replace(seed=1, split_seed=0)
    with pytest.raises(ConfigError, match="split with split_seed 1, the row asks for 0: a split"):
        existing_row(row, folder_of(original.replace(seed=1), "original"))
    # a row that gives split_seed 1 (or a grid without a base) continues it
    assert existing_row(original.replace(seed=1), tmp_path / "original") is None
    assert existing_row(row.replace(split_seed=1), tmp_path / "original") is None


def test_a_row_whose_config_toml_another_writer_wrote_is_still_its_run(tmp_path):
    """Grids compare parsed configs, never text: a folder written by an older handprop
    (another layout of the same values) is the same run and is skipped when complete."""
    from handprop.grids.grid import existing_row

    rows = read_grid(write(tmp_path / "g.csv", "a,500,400,100,8,2.0,4,digits,4"))
    out = tmp_path / "out"
    assert [s.status for s in run_grid(rows, out, progress=False)] == ["completed"]
    saved = parse_toml_config((out / "a" / "config.toml").read_text(), "config.toml")
    lines = "".join(  # every field of the run, as the hand-written writer put it: one line
        f"{k} = {json.dumps(list(v) if isinstance(v, tuple) else v)}\n"
        for k, v in saved.to_dict().items()
        if v is not None
    )
    (out / "a" / "config.toml").write_text("# handprop run config\n\n" + lines)
    assert (out / "a" / "config.toml").read_text() != to_toml(rows[0].config)
    summary = existing_row(rows[0].config, out / "a")
    assert summary is not None and summary.status == "completed" and summary.skipped
