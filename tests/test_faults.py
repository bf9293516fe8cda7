"""Losing nothing: run folders handprop did not make, two runs at once, kills, signals,
edited configs, bad checkpoints, full disks and unwritable outputs.

The kill and signal tests run the real command in a subprocess of its own session, the
way a terminal, ``timeout`` or a cluster's scheduler would stop it.
"""

import errno
import json
import os
import signal
import subprocess
import sys
import threading
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from handprop.cli import main
from handprop.config import parse_toml_config
from handprop.errors import ConfigError, OutputError
from handprop.grids.grid import read_grid, run_grid, summary_markdown
from handprop.run import resume_run, train_run
from handprop.run.claim import GRID_MARKER, RUN_MARKER, FolderLock, make_folder, make_or_adopt

TINY = (
    'dataset = "digits"\ntotal = 400\ntrain = 300\ntest = 100\nhidden = [8]\n'
    "learning_rate = 2.0\neval_every = 500\n"
)
GRID_HEADER = "run_name,d,dtrain,dtest,m,alpha,epochs,dataset"


def run(*args):
    return CliRunner().invoke(main, list(map(str, args)), catch_exceptions=False)


def tiny_config(tmp_path: Path, epochs: int, name: str = "tiny", extra: str = "") -> Path:
    path = tmp_path / f"{name}.toml"
    path.write_text(TINY + f"epochs = {epochs}\n" + extra)
    return path


def one_error_line(result) -> str:
    assert result.exit_code == 1, result.output
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("handprop: error: "), result.output
    return lines[0]


def checkpoint_epoch(run_dir: Path) -> int:
    with np.load(run_dir / "checkpoint.npz") as ck:
        return int(ck["epoch"])


# -- folders handprop did not make ------------------------------------------------------


def test_a_grid_never_touches_a_folder_it_did_not_make(tmp_path):
    grid = tmp_path / "g.csv"
    grid.write_text(
        f"{GRID_HEADER}\nthesis,400,300,100,8,2.0,5,digits\nok,400,300,100,8,2.0,5,digits\n"
    )
    users = tmp_path / "out" / "thesis"
    users.mkdir(parents=True)
    (users / "chapter1.txt").write_text("years of work")
    # the grid folder itself holds the user's folder: it is not handprop's
    line = one_error_line(run("experiments", grid, "--out", tmp_path / "out", "-q"))
    assert "out: exists and was not made by handprop" in line
    # inside a grid folder handprop made, the clash fails that row only
    out = tmp_path / "grid"
    out.mkdir()
    make_or_adopt(out, GRID_MARKER)  # an empty folder holds nothing to lose: taken
    (out / "thesis").mkdir()
    (out / "thesis" / "chapter1.txt").write_text("years of work")
    summaries = run_grid(read_grid(grid), out, progress=False)
    assert [s.status for s in summaries] == ["failed", "completed"]
    assert "was not made by handprop" in summaries[0].message
    assert (users / "chapter1.txt").read_text() == "years of work"
    assert sorted(p.name for p in (out / "thesis").iterdir()) == ["chapter1.txt"]


def test_a_grid_row_starts_again_in_its_own_folder_keeping_other_files(tmp_path):
    grid = tmp_path / "g.csv"
    grid.write_text(f"{GRID_HEADER}\na,400,300,100,8,2.0,5,digits\n")
    out = tmp_path / "out"
    [first] = run_grid(read_grid(grid), out, progress=False)
    row = out / "a"
    (row / "metrics.json").write_text('{"status": "diverged"}')  # say it failed
    (row / "notes.txt").write_text("mine")
    [again] = run_grid(read_grid(grid), out, progress=False)
    assert again.status == "completed" and again.accuracy == first.accuracy
    assert (row / "notes.txt").read_text() == "mine"


def test_two_runs_started_together_get_two_folders(tmp_path, command):
    config = tiny_config(tmp_path, 300)
    a = command("train", config, "--out", "out", "--seed", "1", "-q")
    b = command("train", config, "--out", "out", "--seed", "2", "-q")
    assert a.finish()[0] == 0 and b.finish()[0] == 0
    seeds = sorted(
        parse_toml_config((d / "config.toml").read_text(), "c").seed
        for d in (tmp_path / "out").iterdir()
    )
    assert seeds == [1, 2]
    assert {d.name for d in (tmp_path / "out").iterdir()} == {"tiny", "tiny-2"}


def test_folder_creation_is_exclusive_under_a_race(tmp_path):
    made: list[Path] = []
    barrier = threading.Barrier(8)

    def make() -> None:
        barrier.wait()
        made.append(make_folder(tmp_path, "run"))

    threads = [threading.Thread(target=make) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(set(made)) == 8
    assert all((d / RUN_MARKER).is_file() for d in made)


def test_a_folder_in_use_is_locked_against_a_second_process(tmp_path):
    folder = make_folder(tmp_path, "run")
    code = (
        "import sys; from handprop.run.claim import FolderLock\n"
        "try:\n    FolderLock(sys.argv[1])\nexcept Exception as e:\n    print(e)\n"
    )
    with FolderLock(folder), FolderLock(folder):  # re-entrant within a process
        out = subprocess.run(
            [sys.executable, "-c", code, str(folder)], capture_output=True, text=True
        ).stdout
    assert "another handprop process is training in this folder now" in out
    with pytest.raises(OutputError, match="was not made by handprop"):
        FolderLock(tmp_path)


def test_make_or_adopt_refuses_a_file_and_a_users_folder(tmp_path):
    (tmp_path / "f").write_text("x")
    with pytest.raises(OutputError, match="exists and is not a folder"):
        make_or_adopt(tmp_path / "f")
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "x").write_text("x")
    with pytest.raises(OutputError, match="was not made by handprop"):
        make_or_adopt(tmp_path / "d")
    assert make_or_adopt(tmp_path / "new") == (tmp_path / "new", True)
    assert make_or_adopt(tmp_path / "new") == (tmp_path / "new", False)


# -- kills, signals and resuming ---------------------------------------------------------


def test_kill_9_loses_at_most_the_checkpoint_interval(tmp_path, command):
    config = tiny_config(tmp_path, 6000)
    c = command("train", config, "--out", "out", "-q", "--checkpoint-every", "0.05")
    run_dir = tmp_path / "out" / "tiny"
    c.wait_for(lambda: (run_dir / "checkpoint.npz").is_file())
    c.proc.kill()  # SIGKILL: no handler runs
    c.finish()
    assert 0 < checkpoint_epoch(run_dir) < 6000
    resumed = run("train", "--resume", run_dir, "-q")
    assert resumed.exit_code == 0, resumed.output
    assert not list(run_dir.glob(".*.tmp"))  # what the kill left mid-write is gone
    whole = train_run(parse_toml_config(config.read_text(), "c").replace(out=str(tmp_path / "w")))
    with np.load(run_dir / "model.npz") as a, np.load(whole.run_dir / "model.npz") as b:
        assert np.array_equal(a["params"], b["params"])


@pytest.mark.parametrize(("signum", "status"), [(signal.SIGTERM, 143), (signal.SIGINT, 130)])
def test_sigterm_and_ctrl_c_checkpoint_and_resume(tmp_path, command, signum, status):
    config = tiny_config(tmp_path, 20000)
    c = command("train", config, "--out", "out", "-q", "--checkpoint-every", "0.05")
    run_dir = tmp_path / "out" / "tiny"
    c.wait_for(lambda: (run_dir / "checkpoint.npz").is_file())
    os.killpg(c.proc.pid, signum)
    code, _, err = c.finish()
    assert code == status
    assert f"continue with `handprop train --resume {Path('out') / 'tiny'}`" in err
    assert "Traceback" not in err
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert metrics["status"] == "interrupted"
    assert checkpoint_epoch(run_dir) == metrics["epochs_completed"]


def test_a_run_killed_before_its_first_checkpoint_is_resumable(tmp_path):
    cfg = parse_toml_config(TINY + f'epochs = 50\nout = "{tmp_path}"\n', "c")
    done = train_run(cfg, default_name="r", progress=False)
    for name in ("checkpoint.npz", "model.npz", "predictions.csv", "metrics.json"):
        (done.run_dir / name).unlink(missing_ok=True)  # as if killed at epoch 10
    again = resume_run(done.run_dir, progress=False)
    assert again.status == "completed" and again.accuracy == done.accuracy
    assert again.run_dir == done.run_dir  # the same folder, not r-2


def interrupted_run(tmp_path: Path, extra: str = "") -> Path:
    """A run stopped by Ctrl-C after its 5th step, with its checkpoint."""
    from handprop import nn

    cfg = parse_toml_config(TINY + f'epochs = 40\nout = "{tmp_path}"\n' + extra, "c")
    real_step = nn.Optimizer.step

    def interrupt(self, params, grads):
        if self.t == 5:
            raise KeyboardInterrupt
        real_step(self, params, grads)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(nn.Optimizer, "step", interrupt)
        with pytest.raises(KeyboardInterrupt):
            train_run(cfg, default_name="r", progress=False)
    return tmp_path / "r"


@pytest.mark.parametrize(
    ("edit", "field"),
    [
        (("learning_rate = 2.0", "learning_rate = 0.5"), "learning_rate was 2.0"),
        (("epochs = 40", "epochs = 10"), "use --epochs N"),
        (('optimizer = "gd"', 'optimizer = "sgd"'), "optimizer was 'gd'"),
        (("seed = 0", "seed = 3"), "seed was 0"),
    ],
)
def test_resume_refuses_an_edited_config_naming_the_field(tmp_path, edit, field):
    run_dir = interrupted_run(tmp_path)
    config = run_dir / "config.toml"
    config.write_text(config.read_text().replace(*edit))
    with pytest.raises(ConfigError, match="when the checkpoint was written") as info:
        resume_run(run_dir, progress=False)
    assert field in str(info.value) and str(config) in str(info.value)


def test_resume_may_move_the_data_and_raise_the_epochs(tmp_path):
    run_dir = interrupted_run(tmp_path)
    config = run_dir / "config.toml"
    config.write_text(config.read_text().replace("# data_dir = (not set)", 'data_dir = "x"'))
    result = resume_run(run_dir, progress=False, epochs=60)
    assert result.status == "completed" and result.epochs_completed == 60
    assert "epochs = 60" in config.read_text()


def test_a_resumed_one_cycle_run_steps_at_the_rates_of_an_uninterrupted_one(tmp_path):
    """The one-cycle rate moves at every step; a checkpoint (at an epoch's end) carries
    no position within an epoch, and none is needed: each epoch starts its steps anew."""
    extra = 'optimizer = "sgd"\nbatch_size = 64\nschedule = "onecycle"\n'
    run_dir = interrupted_run(tmp_path / "cut", extra)  # in its second epoch (5 steps each)
    assert resume_run(run_dir, progress=False).status == "completed"
    cfg = parse_toml_config(TINY + f'epochs = 40\nout = "{tmp_path}"\n' + extra, "c")
    whole = train_run(cfg, default_name="whole", progress=False)
    with np.load(run_dir / "model.npz") as a, np.load(whole.run_dir / "model.npz") as b:
        assert np.array_equal(a["params"], b["params"])


def test_resume_refuses_other_epochs_under_a_cosine_schedule(tmp_path):
    run_dir = interrupted_run(tmp_path, 'schedule = "cosine"\n')
    with pytest.raises(ConfigError, match="cosine schedule is shaped by the number of epochs"):
        resume_run(run_dir, progress=False, epochs=80)


def rewrite_checkpoint(run_dir: Path, **changes) -> None:
    path = run_dir / "checkpoint.npz"
    with np.load(path) as ck:
        arrays = {k: ck[k] for k in ck.files}
    arrays.update(changes)
    arrays = {k: v for k, v in arrays.items() if v is not None}
    with open(path, "wb") as f:
        np.savez(f, **arrays)


@pytest.mark.parametrize(
    ("damage", "message"),
    [
        ("truncate", "truncated or not a .npz file"),
        ("epoch", "epoch must be an integer >= 0, got -5"),
        ("params", "its parameters are float32[3]"),
        ("nan", "its parameters are not all finite"),
        ("object", "it holds Python objects, which handprop never loads"),
        ("missing", "it has no 'seconds' array"),
        ("best", "'best' must hold a loss and two whole numbers >= 0, got [inf, inf, 0.0]"),
        ("opt_nan", "its 'opt_m' is not all finite"),
    ],
)
def test_a_bad_checkpoint_is_one_line(tmp_path, damage, message):
    run_dir = interrupted_run(tmp_path, 'optimizer = "adam"\nbatch_size = 100\n')
    path = run_dir / "checkpoint.npz"
    if damage == "best":  # int(inf) would raise OverflowError, a traceback
        rewrite_checkpoint(run_dir, best=np.array([np.inf, np.inf, 0.0]))
    elif damage == "opt_nan":  # the resumed run's first step would make NaN parameters
        with np.load(path) as ck:
            rewrite_checkpoint(run_dir, opt_m=np.full_like(ck["opt_m"], np.nan))
    elif damage == "truncate":
        path.write_bytes(path.read_bytes()[:200])
    elif damage == "epoch":
        rewrite_checkpoint(run_dir, epoch=np.array(-5))
    elif damage == "params":
        rewrite_checkpoint(run_dir, params=np.zeros(3, np.float32))
    elif damage == "nan":
        with np.load(path) as ck:
            rewrite_checkpoint(run_dir, params=np.full_like(ck["params"], np.nan))
    elif damage == "object":
        with open(path, "wb") as f:
            np.savez(f, params=np.array([{"x": 1}], dtype=object))
    else:
        rewrite_checkpoint(run_dir, seconds=None)
    line = one_error_line(run("train", "--resume", run_dir, "-q"))
    assert f"{path}: not a usable checkpoint" in line and message in line
    assert "allow_pickle" not in line


@pytest.mark.parametrize(
    ("averaged", "message"),
    [
        (7, "'averaged' must count the epochs in its average (0 to 5), got 7"),
        (0, "'averaged' must count the epochs in its average (0 to 5), got 0"),
        (None, "its average does not match its parameters"),
    ],
)
def test_a_bad_weight_average_in_a_checkpoint_is_one_line(tmp_path, averaged, message):
    # full-batch steps: 5 epochs done, the average of epochs 2 to 5 saved
    run_dir = interrupted_run(tmp_path, "average_from = 2\n")
    with np.load(run_dir / "checkpoint.npz") as ck:
        assert ck["averaged"] == 4 and ck["average"].shape == ck["params"].shape
        if averaged is None:
            rewrite_checkpoint(run_dir, average=ck["average"][:3])
        else:
            rewrite_checkpoint(run_dir, averaged=np.array(averaged))
    line = one_error_line(run("train", "--resume", run_dir, "-q"))
    assert "not a usable checkpoint" in line and message in line


def test_a_weight_average_in_the_checkpoint_of_a_run_without_one_is_refused(tmp_path):
    run_dir = interrupted_run(tmp_path)
    with np.load(run_dir / "checkpoint.npz") as ck:
        rewrite_checkpoint(run_dir, average=ck["params"], averaged=np.array(1))
    line = one_error_line(run("train", "--resume", run_dir, "-q"))
    assert "it holds a weight average, but the run's config has no average_from" in line


@pytest.mark.parametrize("value", ["nan", "NaN", "inf", "-inf", "1e400", "0", "-1", "ten"])
@pytest.mark.parametrize("subcommand", ["train", "experiments"])
def test_checkpoint_every_must_be_a_finite_number_of_seconds(tmp_path, subcommand, value):
    """click's FloatRange lets "nan" through (it fails every comparison), which turned
    the periodic checkpoints off without a word; now it is one line, before any file."""
    source = tiny_config(tmp_path, 1)
    if subcommand == "experiments":
        source = tmp_path / "g.csv"
        source.write_text(GRID_HEADER + "\nr,400,300,100,8,2.0,1,digits\n")
    line = one_error_line(
        run(subcommand, source, "--out", tmp_path / "out", f"--checkpoint-every={value}")
    )
    assert line == (
        f"handprop: error: --checkpoint-every must be a finite number of seconds > 0, got {value!r}"
    )
    assert not (tmp_path / "out").exists()


def test_checkpoint_every_takes_seconds(tmp_path):
    result = run(
        "train", tiny_config(tmp_path, 2), "--out", tmp_path, "-q", "--checkpoint-every", "0.5"
    )
    assert result.exit_code == 0, result.output


def test_a_wrong_length_optimizer_state_is_refused(tmp_path):
    run_dir = interrupted_run(tmp_path, 'optimizer = "adam"\nbatch_size = 100\n')
    rewrite_checkpoint(run_dir, opt_m=np.zeros(7, np.float32))
    line = one_error_line(run("train", "--resume", run_dir, "-q"))
    assert "adam state 'm' is float32[7], expected float32[610]" in line


def test_resume_refuses_a_folder_handprop_did_not_make(tmp_path):
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "checkpoint.npz").write_bytes(b"")
    line = one_error_line(run("train", "--resume", tmp_path / "mine"))
    assert "not a run folder made by handprop" in line


# -- grids stopped part-way --------------------------------------------------------------


@pytest.mark.parametrize(
    ("signum", "to_group", "status"),
    [
        (signal.SIGINT, True, 130),  # Ctrl-C in a terminal reaches every process
        (signal.SIGTERM, False, 143),  # `timeout`, `docker stop`: the grid's process alone
    ],
)
def test_a_parallel_grid_stops_its_rows_cancels_the_queue_and_writes_the_summary(
    tmp_path, command, signum, to_group, status
):
    grid = tmp_path / "g.csv"
    rows = [f"r{i},400,300,100,8,2.0,200000,digits" for i in range(4)]
    grid.write_text(GRID_HEADER + "\n" + "\n".join(rows) + "\n")
    c = command("experiments", grid, "--out", "out", "--jobs", "2", "--checkpoint-every", "0.05")
    out = tmp_path / "out"
    c.wait_for(
        lambda: sum((out / r).joinpath("checkpoint.npz").is_file() for r in ("r0", "r1")) == 2
    )
    if to_group:
        os.killpg(c.proc.pid, signum)
    else:
        c.proc.send_signal(signum)
    code, _, err = c.finish(timeout=60)
    assert code == status, err
    assert "Traceback" not in err and "Aborted" not in err
    from handprop.run.reader import read_table

    _, body = read_table(out / "summary.csv")
    statuses = {cells[0]: cells[1] for cells in body}
    assert statuses == {
        "r0": "interrupted",
        "r1": "interrupted",
        "r2": "cancelled",
        "r3": "cancelled",
    }
    assert not (out / "r2").exists() and not (out / "r3").exists()
    for r in ("r0", "r1"):
        assert checkpoint_epoch(out / r) > 0


def test_a_sequential_grid_interrupted_writes_the_summary(tmp_path, ctrl_c_after_step):
    grid = tmp_path / "g.csv"
    grid.write_text(f"{GRID_HEADER}\na,400,300,100,8,2.0,5,digits\nb,400,300,100,8,2.0,5,digits\n")
    ctrl_c_after_step(3)
    result = CliRunner().invoke(main, ["experiments", str(grid), "--out", str(tmp_path / "o")])
    assert result.exit_code == 130
    summary = (tmp_path / "o" / "summary.csv").read_text()
    assert "a,interrupted" in summary and "b,cancelled" in summary


def test_summary_markdown_keeps_each_run_on_its_own_row():
    from handprop.grids.grid import RunSummary

    text = summary_markdown([RunSummary("a", "failed", message="x | y\nz")])
    assert text.splitlines()[2] == "| a |  |  |  |  | failed: x \\| y z |"


# -- outputs that cannot be written -----------------------------------------------------


def test_out_that_cannot_be_a_folder_is_one_line(tmp_path):
    config = tiny_config(tmp_path, 5)
    (tmp_path / "file").write_text("x")
    line = one_error_line(run("train", config, "--out", tmp_path / "file", "-q"))
    assert "file: not a folder; --out must name a folder" in line
    line = one_error_line(run("train", config, "--out", "/proc/handprop-test", "-q"))
    assert "/proc/handprop-test: cannot make the folder" in line


def enospc(*args, **kwargs):
    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


def test_a_full_disk_is_one_line_and_leaves_no_partial_file(tmp_path, monkeypatch):
    config = tiny_config(tmp_path, 5)
    monkeypatch.setattr("os.fsync", enospc)  # every atomic write fails on its way to disk
    line = one_error_line(run("train", config, "--out", tmp_path / "out", "-q"))
    assert "config.toml: cannot write: No space left on device" in line
    leftovers = [p.name for p in (tmp_path / "out").rglob("*") if p.suffix == ".tmp"]
    assert leftovers == []


def test_a_full_disk_in_figures_compare_and_grids_is_one_line(tmp_path, monkeypatch):
    cfg = parse_toml_config(TINY + f'epochs = 5\nout = "{tmp_path}"\n', "c")
    run_dir = train_run(cfg, default_name="r", progress=False).run_dir
    grid = tmp_path / "g.csv"
    grid.write_text(f"{GRID_HEADER}\na,400,300,100,8,2.0,5,digits\n")
    monkeypatch.setattr("os.fsync", enospc)
    for args in (
        ["figures", run_dir],
        ["compare", run_dir, "--only", "default", "-q"],
        ["report", run_dir],
    ):
        line = one_error_line(run(*args))
        assert "No space left on device" in line, args
    # a grid names each row that failed, then the summary it could not write
    result = run("experiments", grid, "--out", tmp_path / "g", "-q")
    assert result.exit_code == 1
    full = "cannot write: No space left on device"
    assert result.output.splitlines() == [
        f"a: failed ({tmp_path / 'g' / 'a' / 'config.toml'}: {full})",
        f"handprop: error: {tmp_path / 'g' / 'summary.csv'}: {full}",
    ]
    assert not list(tmp_path.rglob("*.tmp"))


def test_a_read_only_folder_is_one_line(tmp_path, monkeypatch):
    config = tiny_config(tmp_path, 5)

    def read_only(*args, **kwargs):
        raise OSError(errno.EROFS, os.strerror(errno.EROFS))

    monkeypatch.setattr(Path, "mkdir", read_only)
    line = one_error_line(run("train", config, "--out", tmp_path / "ro" / "runs", "-q"))
    assert "runs: cannot make the folder: Read-only file system" in line


def test_a_grid_row_too_large_for_memory_fails_alone(tmp_path):
    grid = tmp_path / "g.csv"
    grid.write_text(
        f"{GRID_HEADER}\nok,400,300,100,8,2.0,5,digits\n"
        "huge,400,300,100,1000000000,2.0,5,digits\nok2,400,300,100,8,2.0,5,digits\n"
    )
    out = tmp_path / "out"
    summaries = run_grid(read_grid(grid), out, progress=False)
    assert [s.status for s in summaries] == ["completed", "failed", "completed"]
    assert "64-1000000000-10" in summaries[1].message
    assert "would need about 573.7 GiB" in summaries[1].message
    assert not (out / "huge").exists()  # refused before it began: no folder left


@pytest.mark.parametrize(
    ("name", "problem"),
    [
        ("summary.csv", "is a file handprop writes"),
        ("a|b", "it holds '|'"),
        ("x" * 300, "bytes long"),
        (".handprop-run", "starts with '.'"),
    ],
)
def test_run_names_that_would_break_a_grid_are_refused(tmp_path, name, problem):
    grid = tmp_path / "g.csv"
    grid.write_text(f'{GRID_HEADER}\n"{name}",400,300,100,8,2.0,5,digits\n')
    with pytest.raises(ConfigError, match="row 2 column run_name") as info:
        read_grid(grid)
    assert problem in str(info.value)
