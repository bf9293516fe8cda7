"""Training over MPI: N ranks reach the serial run's parameters, and faults end the job.

Each test launches ``mpiexec -n N handprop train ...`` in a session of its own, bounded
in time, and kills whatever is left of it when it ends, failed or not. They need the
``mpi`` extra (mpi4py and an MPI with ``mpiexec``); ``.ci/run`` installs it.
"""

import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("mpi4py", reason='MPI tests need the mpi extra: pip install -e ".[mpi]"')
MPIEXEC = shutil.which("mpiexec")
pytestmark = pytest.mark.skipif(MPIEXEC is None, reason="no mpiexec on PATH (the mpi extra)")

HANDPROP = [sys.executable, "-c", "from handprop.cli import main; main()"]

CONFIGS = {
    # the seed's algorithm: sigmoid, full-batch gradient descent
    "seed": 'hidden = [16]\nlearning_rate = 2.0\nepochs = 30\nactivation = "sigmoid"\n',
    # mini-batch Adam with dropout: each rank draws its rows of the batch's masks
    "adam-dropout": (
        'hidden = [24, 16]\nactivation = "relu"\ndropout = 0.3\noptimizer = "adam"\n'
        "learning_rate = 0.003\nbatch_size = 50\nepochs = 3\naugment_shift = 1\n"
    ),
    # a small CNN on the 8x8 digits
    "cnn": (
        'layers = ["conv 4 3 pad=1", "relu", "maxpool 2", "dense 16", "relu"]\n'
        'optimizer = "adam"\nlearning_rate = 0.003\nbatch_size = 64\nepochs = 2\n'
    ),
    # batchnorm: every rank normalizes with the whole batch's statistics (an Allreduce).
    # Momentum, not Adam: a bias right before batchnorm has a gradient of 0 up to
    # rounding, which Adam's m / sqrt(v) would blow up to steps of the learning rate
    "cnn-batchnorm": (
        'layers = ["conv 4 3 pad=1", "batchnorm", "relu", "maxpool 2", "dense 16", '
        '"batchnorm", "relu"]\noptimizer = "momentum"\nlearning_rate = 0.05\n'
        "batch_size = 64\nepochs = 2\n"
    ),
}
DATA = 'dataset = "digits"\ntotal = 600\ntrain = 500\ntest = 100\neval_every = 1\n'


class Job:
    """``mpiexec ARGS`` in its own session; :meth:`stop` kills it and its ranks."""

    def __init__(self, *args: str, cwd: Path) -> None:
        self.proc = subprocess.Popen(
            [MPIEXEC, *args],
            cwd=cwd,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            start_new_session=True,
        )

    def finish(self, timeout: float = 120) -> tuple[int, str, str]:
        out, err = self.proc.communicate(timeout=timeout)
        return self.proc.returncode, out, err

    def stop(self) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.communicate()


@pytest.fixture
def mpiexec(tmp_path):
    jobs: list[Job] = []

    def start(*args: str) -> Job:
        jobs.append(Job(*args, cwd=tmp_path))
        return jobs[-1]

    yield start
    for job in jobs:  # never leave ranks behind, even when the test failed
        job.stop()


def config(tmp_path: Path, name: str, epochs: int | None = None, extra: str = "") -> Path:
    path = tmp_path / f"{name}.toml"
    text = DATA + CONFIGS[name] + extra
    if epochs is not None:
        text = "\n".join(
            f"epochs = {epochs}" if line.startswith("epochs =") else line
            for line in text.splitlines()
        )
    path.write_text(text + "\n")
    return path


def two_ranks(config_0: Path, config_1: Path) -> list[str]:
    """mpiexec's arguments for 2 ranks that train different configs (MPMD)."""
    one = ["-n", "1", *HANDPROP, "train"]
    return [*one, str(config_0), "-q", ":", *one, str(config_1), "-q"]


def params(run_dir: Path) -> np.ndarray:
    with np.load(run_dir / "model.npz") as f:
        return f["params"]


def train_serial(tmp_path: Path, cfg: Path) -> str:
    """``handprop train CFG --out serial`` in one process, which must succeed; its stderr."""
    serial = subprocess.run(
        [*HANDPROP, "train", str(cfg), "--out", "serial", "-q"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert serial.returncode == 0, serial.stderr
    return serial.stderr


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_n_ranks_reach_the_serial_parameters(tmp_path, mpiexec, name):
    cfg = config(tmp_path, name)
    train_serial(tmp_path, cfg)
    expected = params(tmp_path / "serial" / name)
    for n in (1, 2, 3):
        code, out, err = mpiexec(
            "-n", str(n), *HANDPROP, "train", str(cfg), "--out", f"n{n}", "-q"
        ).finish()
        assert code == 0, err
        assert out.count("test accuracy") == 1  # rank 0 alone reports
        got = params(tmp_path / f"n{n}" / name)
        # float32 sums in another order: within 1e-5 of the parameters' scale
        scale = np.abs(expected).max()
        assert np.abs(got - expected).max() <= 1e-5 * scale, (n, np.abs(got - expected).max())
        assert sorted(p.name for p in (tmp_path / f"n{n}").iterdir()) == [name]


def test_each_rank_splits_its_rows_over_worker_processes(tmp_path, mpiexec, monkeypatch):
    """Two threads a rank: each rank's block of a CNN's batch goes to its own worker
    processes (the batch is large enough to split), and batchnorm's sums travel from
    the workers to their rank, then over the ranks."""
    monkeypatch.setenv("HANDPROP_THREADS", "2")
    monkeypatch.delenv("HANDPROP_WORKERS", raising=False)
    cfg = tmp_path / "wide.toml"
    cfg.write_text(
        DATA + 'layers = ["conv 64 3 pad=1", "batchnorm", "relu", "conv 64 3 pad=1", '
        '"batchnorm", "relu", "maxpool 2", "dense 10", "relu"]\noptimizer = "momentum"\n'
        "learning_rate = 0.01\nbatch_size = 128\nepochs = 1\n"
    )
    assert "could not start" not in train_serial(tmp_path, cfg)
    code, _, err = mpiexec("-n", "2", *HANDPROP, "train", str(cfg), "--out", "n2", "-q").finish()
    assert code == 0 and "could not start" not in err, err
    expected, got = params(tmp_path / "serial" / "wide"), params(tmp_path / "n2" / "wide")
    assert np.abs(got - expected).max() <= 1e-5 * np.abs(expected).max()


def test_an_error_on_one_rank_ends_every_rank_with_its_message(tmp_path, mpiexec):
    good = config(tmp_path, "seed", epochs=100000)
    bad = tmp_path / "bad.toml"
    bad.write_text(good.read_text().replace("hidden = [16]", "hidden = [-3]"))
    start = time.monotonic()
    job = mpiexec(*two_ranks(good, bad))
    code, _, err = job.finish(timeout=60)
    assert code == 1, err
    assert time.monotonic() - start < 30
    # a start-up error: rank 0 says it, naming rank 1, and the job ends without Abort
    last = err.strip().splitlines()[-1]
    assert last.startswith("handprop: error: [rank 1 of 2] "), err
    assert "hidden must be a positive integer" in last
    assert err.count("handprop: error:") == 1
    assert "Traceback" not in err and "Abort" not in err


def test_ranks_with_different_configs_are_refused_at_start_up(tmp_path, mpiexec):
    a = config(tmp_path, "seed")
    b = tmp_path / "b.toml"
    b.write_text(a.read_text() + "seed = 5\n")
    job = mpiexec(*two_ranks(a, b))
    code, _, err = job.finish(timeout=60)
    assert code != 0
    assert "the config on rank 1 differs from rank 0's" in err
    assert not list(tmp_path.glob("runs/*/model.npz"))


@pytest.mark.parametrize(("signum", "status"), [(signal.SIGTERM, 143), (signal.SIGINT, 130)])
def test_a_signal_stops_every_rank_after_one_checkpoint_and_resumes(
    tmp_path, mpiexec, signum, status
):
    cfg = config(tmp_path, "seed", epochs=20000)
    cfg.write_text(cfg.read_text().replace("eval_every = 1\n", "eval_every = 1000\n"))
    job = mpiexec(
        "-n", "2", *HANDPROP, "train", str(cfg), "--out", "out", "-q", "--checkpoint-every", "0.05"
    )
    run_dir = tmp_path / "out" / "seed"
    deadline = time.monotonic() + 60
    while not (run_dir / "checkpoint.npz").is_file():
        assert job.proc.poll() is None, job.finish()
        assert time.monotonic() < deadline
        time.sleep(0.05)
    job.proc.send_signal(signum)  # to mpiexec, which hands it to the ranks
    code, _, err = job.finish(timeout=60)
    assert code == status, err
    assert err.count("continue with `handprop train --resume") == 1  # rank 0 alone
    assert "Traceback" not in err
    code, _, err = mpiexec("-n", "2", *HANDPROP, "train", "--resume", str(run_dir), "-q").finish()
    assert code == 0, err
    serial = subprocess.run(
        [*HANDPROP, "train", str(cfg), "--out", "serial", "-q"], cwd=tmp_path, timeout=120
    )
    assert serial.returncode == 0
    expected = params(tmp_path / "serial" / "seed")
    assert np.abs(params(run_dir) - expected).max() <= 1e-5 * np.abs(expected).max()


def last_line(text: str) -> str:
    lines = text.strip().splitlines()
    return lines[-1] if lines else ""


@pytest.mark.parametrize(
    ("name", "edit", "message"),
    [
        # every rank reads the config the same way
        (
            "learning_rate",
            {"learning_rate = 2.0": "learning_rate = -0.5"},
            "{cfg} line 7: learning_rate must be a finite number > 0, got -0.5",
        ),
        # every rank looks for the data and finds nothing
        (
            "data_dir",
            {'dataset = "digits"': 'dataset = "mnist"\ndata_dir = "/nonexistent/handprop-data"'},
            "/nonexistent/handprop-data: no such data directory",
        ),
    ],
)
def test_a_start_up_error_is_handprops_last_line_on_every_rank(
    tmp_path, mpiexec, name, edit, message
):
    """No MPI_Abort when every rank knows of the error: rank 0 prints it once, every rank
    exits 1, and MPICH adds no `Abort(1) on node ...` line after it."""
    text = config(tmp_path, "seed").read_text()
    for old, new in edit.items():
        text = text.replace(old, new)
    cfg = tmp_path / f"{name}.toml"
    cfg.write_text(text)
    code, out, err = mpiexec("-n", "2", *HANDPROP, "train", str(cfg), "-q").finish(timeout=60)
    assert code == 1, err
    assert last_line(err) == "handprop: error: " + message.format(cfg=cfg), err
    assert err.count("handprop: error:") == 1, err  # once, from rank 0
    assert "Abort" not in err and "Traceback" not in err and out == "", (out, err)
    assert not (tmp_path / "runs").exists()


def test_a_start_up_error_on_rank_0_alone_ends_every_rank_without_abort(tmp_path, mpiexec):
    """Rank 0 alone makes the run folder: when it cannot, the other ranks hear of it at
    their next start-up collective, and all exit 1 after rank 0's one line."""
    cfg = config(tmp_path, "seed")
    (tmp_path / "blocker").write_text("a file where --out wants a folder\n")
    code, _, err = mpiexec(
        "-n", "2", *HANDPROP, "train", str(cfg), "--out", "blocker/out", "-q"
    ).finish(timeout=60)
    assert code == 1, err
    assert last_line(err).startswith("handprop: error: [rank 0 of 2] blocker/out: "), err
    assert err.count("handprop: error:") == 1, err
    assert "Abort" not in err and "Traceback" not in err
    assert (tmp_path / "blocker").read_text() == "a file where --out wants a folder\n"


def test_experiments_refuses_to_run_as_several_ranks(tmp_path, mpiexec):
    grid = tmp_path / "g.csv"
    grid.write_text(
        "run_name,d,dtrain,dtest,m,alpha,epochs,dataset\nr,400,300,100,8,2.0,3,digits\n"
    )
    code, out, err = mpiexec(
        "-n", "2", *HANDPROP, "experiments", str(grid), "--out", "out", "-q"
    ).finish(timeout=60)
    assert code == 1, err
    assert out == ""
    assert err.strip().splitlines() == [
        "handprop: error: handprop experiments runs as one process, not as 2 MPI ranks "
        "(each rank would run all of it, colliding with the others): a grid fans its rows "
        "out with --jobs N, or on a Dask cluster with --scheduler; mpiexec -n N goes with "
        "handprop train"
    ]
    assert not (tmp_path / "out").exists()
