"""The shards of a CNN's training batch in worker processes: the threads' numbers, and
no worker left behind or waited on forever, whatever ends first."""

import json
import logging
import os
import re
import signal
import sys
import time
from pathlib import Path

import numpy as np
import pytest

import handprop.scale.processes as processes_module
from handprop.errors import ConfigError
from handprop.nn import GD, Adam, Network, SoftmaxCrossEntropy
from handprop.scale import DataParallel
from handprop.scale.processes import WorkerExitError, Workers, worker_kind

CNN = ["conv 4 3 pad=1", "batchnorm", "relu", "maxpool 2", "conv 5 3", "relu"]
CNN += ["dense 6", "dropout 0.3", "relu"]


def cnn(items=CNN, shape=(2, 8, 8)):
    loss = SoftmaxCrossEntropy(smoothing=0.1)
    return Network.from_layers(items, shape, 3, loss, "glorot_normal", np.float64, rng=0)


def steps(model, X, y, count=3):
    """``count`` Adam steps, each with its own dropout masks; the parameters after."""
    opt = Adam(0.01)
    for step in range(count):
        model.net.set_rng(np.random.default_rng(step))
        loss, out = model.train_pass(X, y)
        opt.step(model.params, model.grads)
    return loss, out, model.params.copy()


@pytest.fixture
def workers_are(monkeypatch):
    """``workers_are("threads" | "processes")`` sets HANDPROP_WORKERS."""
    return lambda kind: monkeypatch.setenv("HANDPROP_WORKERS", kind)


def loss_of(model, X, y):
    """One training pass's loss, with the dropout masks of seed 0."""
    model.net.set_rng(np.random.default_rng(0))
    return model.train_pass(X, y)[0]


def worker_pids(model):
    return [proc.pid for proc in model._workers.procs]


def gone(pid: int) -> bool:
    """The process has ended (a zombie left to its parent counts as ended)."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, ProcessLookupError):
        return True
    return state in ("Z", "X")


def wait_until(condition, seconds=20.0):
    deadline = time.monotonic() + seconds
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.02)


@pytest.mark.parametrize("threads", [2, 3])
def test_processes_train_as_threads_and_one_thread_do(split_all, workers_are, threads, rng):
    """Batchnorm over the whole batch, each shard's rows of the dropout masks, label
    smoothing, Adam: three steps on worker processes end where the threads end, to the
    bit, and where one thread ends, to rounding."""
    X, y = rng.normal(size=(13, 2, 8, 8)), rng.integers(0, 3, size=13)
    split_all(1)
    alone = steps(DataParallel(cnn()), X, y)
    split_all(threads)
    results = {}
    for kind in ("threads", "processes"):
        workers_are(kind)
        model = DataParallel(cnn())
        results[kind] = steps(model, X, y)
        assert isinstance(model._workers, Workers) == (kind == "processes")
        model.close()
    for expected, got in zip(results["threads"], results["processes"], strict=True):
        np.testing.assert_array_equal(got, expected)
    loss, out, params = results["processes"]
    assert loss == pytest.approx(alone[0], rel=1e-12)
    np.testing.assert_allclose(out, alone[1], rtol=1e-10, atol=1e-13)
    # weights and batchnorm's running averages (moved by shard 0 alone, once a step);
    # Adam scales the rounding of the biases before batchnorm (gradient 0) up to 1e-11
    np.testing.assert_allclose(params, alone[2], rtol=1e-8, atol=1e-10)


def test_a_larger_batch_starts_new_workers_and_close_ends_them(split_all, rng):
    split_all(2)
    model = DataParallel(cnn())
    model.train_pass(rng.normal(size=(6, 2, 8, 8)), rng.integers(0, 3, size=6))
    first = worker_pids(model)
    X, y = rng.normal(size=(20, 2, 8, 8)), rng.integers(0, 3, size=20)
    loss = loss_of(model, X, y)
    second = worker_pids(model)
    assert second != first and all(gone(pid) for pid in first)
    model.close()
    assert model._workers is None and all(gone(pid) for pid in second)
    # started again when needed, the same numbers
    assert loss_of(model, X, y) == loss
    model.close()


def test_partial_fit_keeps_its_workers_and_fit_ends_them(split_all, workers_are, rng):
    from handprop.sklearn import HandpropClassifier

    split_all(2)
    workers_are("processes")
    X, y = rng.random((64, 8, 8)), rng.integers(0, 3, size=64)
    clf = HandpropClassifier(
        layers=["conv 4 3", "relu", "dense 6", "relu"],
        optimizer="adam",
        learning_rate=0.01,
        batch_size=32,
        epochs=2,
        random_state=0,
    )
    clf.partial_fit(X, y, classes=[0, 1, 2])
    first = worker_pids(clf._model)
    clf.partial_fit(X, y)  # the next epoch on the same workers
    assert worker_pids(clf._model) == first and not any(gone(pid) for pid in first)
    assert clf.n_iter_ == 2
    clf.fit(X, y)  # a new network: partial_fit's workers end, and fit's end with the fit
    assert all(gone(pid) for pid in first) and clf._model._workers is None


def test_a_worker_that_dies_is_one_line_and_the_next_step_starts_anew(split_all, rng):
    split_all(2)
    model = DataParallel(cnn())
    X, y = rng.normal(size=(10, 2, 8, 8)), rng.integers(0, 3, size=10)
    loss = loss_of(model, X, y)
    (pid,) = worker_pids(model)
    os.kill(pid, signal.SIGKILL)
    wait_until(lambda: gone(pid))
    with pytest.raises(WorkerExitError, match=r"worker process 1 ended \(exit status -9\)"):
        model.train_pass(X, y)
    assert model._workers is None  # closed: a half-done step's workers are not reused
    assert loss_of(model, X, y) == loss
    model.close()


def test_a_workers_error_is_raised_here_as_itself(rng):
    net = cnn()
    X = rng.normal(size=(8, 2, 8, 8))
    workers = Workers(net, 2, 4, X)
    try:
        assert workers.ready() is None
        # a step of more rows than the worker has room for: its reshape fails there
        workers.conns[0].send(("step", 9, 8, 0, {}, np.zeros(9, dtype=np.int64)))
        with pytest.raises(ValueError, match="reshape"):
            workers.receive(1, "done")
    finally:
        workers.close()
    assert all(gone(proc.pid) for proc in workers.procs)


def test_workers_that_cannot_start_leave_the_shards_to_threads(
    split_all, workers_are, rng, monkeypatch, tmp_path, caplog
):
    split_all(2)
    X, y = rng.normal(size=(10, 2, 8, 8)), rng.integers(0, 3, size=10)
    workers_are("threads")
    expected = steps(DataParallel(cnn()), X, y)
    workers_are("processes")
    failing = tmp_path / "python"
    failing.write_text("#!/bin/sh\necho 'no handprop here' >&2\nexit 3\n")
    failing.chmod(0o755)
    for executable, why in [
        (str(failing), r"worker process 1 ended \(exit status 3\): no handprop here"),
        (str(tmp_path / "missing"), "No such file or directory"),
    ]:
        monkeypatch.setattr(sys, "executable", executable)
        model = DataParallel(cnn())
        with caplog.at_level(logging.WARNING, logger="handprop.scale.parallel"):
            result = steps(model, X, y)
        assert model._workers is False  # not tried again at every step
        (record,) = [r for r in caplog.records if "could not start" in r.getMessage()]
        assert record.getMessage().startswith("handprop: worker processes could not start (")
        assert re.search(why, record.getMessage())
        np.testing.assert_array_equal(result[2], expected[2])
        caplog.clear()


def test_a_network_that_cannot_be_sent_to_a_worker_trains_on_threads(split_all, rng, caplog):
    """A layer class of the user's own that a worker could not import (here a local
    one, which does not even pickle): the shards stay on threads, said once."""
    from handprop.nn import ReLU

    class Mine(ReLU):
        pass

    net = cnn()
    layers = [Mine() if isinstance(layer, ReLU) else layer for layer in net.layers]
    mine = Network(layers, net.input_shape, net.loss, net.dtype)
    mine.params[...] = net.params
    split_all(2)
    model = DataParallel(mine)
    X, y = rng.normal(size=(10, 2, 8, 8)), rng.integers(0, 3, size=10)
    with caplog.at_level(logging.WARNING, logger="handprop.scale.parallel"):
        loss = loss_of(model, X, y)
    assert model._workers is False
    assert "its network cannot be sent to a worker" in caplog.text
    assert loss == loss_of(DataParallel(cnn()), X, y)


def test_handprop_workers_names_processes_or_threads(monkeypatch):
    monkeypatch.delenv("HANDPROP_WORKERS", raising=False)
    assert worker_kind() == "processes"
    monkeypatch.setenv("HANDPROP_WORKERS", "threads")
    assert worker_kind() == "threads"
    monkeypatch.setenv("HANDPROP_WORKERS", "thread")
    with pytest.raises(
        ConfigError, match="HANDPROP_WORKERS must be one of processes, threads, got 'thread'"
    ):
        worker_kind()
    with pytest.raises(ConfigError, match="HANDPROP_WORKERS"):
        DataParallel(cnn())  # refused when the model is made, not in its first step


def test_a_dense_network_keeps_its_shards_on_threads(split_all, rng):
    split_all(2)
    model = DataParallel(Network.from_spec("12-9-4", dtype=np.float64))
    model.train_pass(rng.normal(size=(10, 12)), rng.integers(0, 4, size=10))
    GD(0.1).step(model.params, model.grads)
    assert model._workers is None


#: a CNN on 8x8 digits whose training batch is worth splitting over two workers (the
#: default thresholds of DataParallel.split), for the command line's tests
CNN_DIGITS = """
dataset = "digits"
total = 600
train = 500
test = 100
layers = ["conv 64 3 pad=1", "relu", "conv 64 3 pad=1", "relu", "maxpool 2", "dense 10", "relu"]
batch_size = 128
learning_rate = 0.01
optimizer = "adam"
"""


def serving_workers(session: int) -> list[int]:
    """The pids of worker processes in process group ``session``, still running."""
    pids = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            cmdline = (entry / "cmdline").read_bytes()
            pgid = os.getpgid(int(entry.name))
        except (OSError, ProcessLookupError):
            continue
        serving = b"handprop.scale.processes import serve" in cmdline and pgid == session
        if serving and not gone(int(entry.name)):
            pids.append(int(entry.name))
    return pids


@pytest.mark.parametrize(("signum", "status"), [(signal.SIGINT, 130), (signal.SIGTERM, 143)])
def test_ctrl_c_to_every_process_stops_the_run_and_its_workers(
    tmp_path, command, monkeypatch, signum, status
):
    """Ctrl-C reaches the workers too: they ignore it, the run stops after a step and
    checkpoints as it does alone, and its workers end."""
    monkeypatch.setenv("HANDPROP_THREADS", "2")
    monkeypatch.delenv("HANDPROP_WORKERS", raising=False)
    config = tmp_path / "cnn.toml"
    config.write_text(CNN_DIGITS + "epochs = 5000\n")
    c = command("train", config, "--out", "out", "-q", "--checkpoint-every", "0.05")
    run_dir = tmp_path / "out" / "cnn"
    c.wait_for(lambda: (run_dir / "checkpoint.npz").is_file() and serving_workers(c.proc.pid))
    os.killpg(c.proc.pid, signum)
    code, _, err = c.finish()
    assert code == status, err
    assert "Traceback" not in err and "continue with `handprop train --resume" in err
    assert json.loads((run_dir / "metrics.json").read_text())["status"] == "interrupted"
    wait_until(lambda: not serving_workers(c.proc.pid))


def test_workers_end_when_their_owner_is_killed(tmp_path, command, monkeypatch):
    monkeypatch.setenv("HANDPROP_THREADS", "2")
    monkeypatch.delenv("HANDPROP_WORKERS", raising=False)
    config = tmp_path / "cnn.toml"
    config.write_text(CNN_DIGITS + "epochs = 5000\n")
    c = command("train", config, "--out", "out", "-q")
    c.wait_for(lambda: serving_workers(c.proc.pid))
    workers = serving_workers(c.proc.pid)
    c.proc.kill()  # SIGKILL to the owner alone: no handler of its runs
    c.finish()
    wait_until(lambda: all(gone(pid) for pid in workers))


def test_a_run_on_workers_is_the_run_on_threads(tmp_path, monkeypatch):
    """The command line's run: the same model whichever kind of worker trains it."""
    from click.testing import CliRunner

    from handprop.cli import main

    monkeypatch.setenv("HANDPROP_THREADS", "2")
    config = tmp_path / "cnn.toml"
    config.write_text(CNN_DIGITS + "epochs = 2\n")
    params = {}
    for kind in ("processes", "threads"):
        monkeypatch.setenv("HANDPROP_WORKERS", kind)
        out = tmp_path / kind
        result = CliRunner().invoke(main, ["train", str(config), "--out", str(out), "-q"])
        assert result.exit_code == 0, result.output
        with np.load(out / "cnn" / "model.npz") as model:
            params[kind] = model["params"]
    np.testing.assert_array_equal(params["processes"], params["threads"])


def test_the_shared_memory_is_named_nowhere(split_all, rng, tmp_path, monkeypatch):
    """Nothing of the workers is left in the temporary folder, however they end."""
    monkeypatch.setenv("TMPDIR", str(tmp_path))
    monkeypatch.setattr(processes_module.tempfile, "tempdir", None)
    split_all(2)
    model = DataParallel(cnn())
    model.train_pass(rng.normal(size=(10, 2, 8, 8)), rng.integers(0, 3, size=10))
    assert list(tmp_path.iterdir()) == []
    model.close()
