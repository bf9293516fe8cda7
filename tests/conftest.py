import contextlib
import hashlib
import os
import signal
import subprocess
import sys
import threading
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest


def mnist_dir() -> Path | None:
    """Real MNIST for the tests: the folder ``HANDPROP_TEST_MNIST`` names, and nothing
    else (a user's clone has no folder beside it to fall back on). None when unset; a
    value that names no folder is a mistake, not a reason to skip."""
    value = os.environ.get("HANDPROP_TEST_MNIST")
    if not value:
        return None
    if not Path(value).is_dir():
        raise pytest.UsageError(f"HANDPROP_TEST_MNIST={value}: not a folder")
    return Path(value)


def pytest_collection_modifyitems(config, items):
    """A test marked ``mnist`` (it reads real MNIST) skips, saying how to run it, when
    ``HANDPROP_TEST_MNIST`` is unset."""
    if mnist_dir() is not None:
        return
    skip = pytest.mark.skip(
        reason="needs real MNIST: set HANDPROP_TEST_MNIST to a folder with its IDX files"
    )
    for item in items:
        if "mnist" in item.keywords:
            item.add_marker(skip)


@pytest.fixture
def rng() -> np.random.Generator:
    return np.random.default_rng(20261124)


@pytest.fixture
def ctrl_c_after_step(monkeypatch):
    """``ctrl_c_after_step(k)``: every optimizer raises KeyboardInterrupt (a Ctrl-C) when
    asked for step k + 1; ``ctrl_c_after_step(None)`` lets it step again."""
    from handprop import nn

    real_step = nn.Optimizer.step

    def arm(k: int | None) -> None:
        def step(self, params, grads):
            if k is not None and self.t == k:
                raise KeyboardInterrupt
            real_step(self, params, grads)

        monkeypatch.setattr(nn.Optimizer, "step", step)

    return arm


@pytest.fixture
def cut_and_resumed(ctrl_c_after_step, tmp_path):
    """``cut_and_resumed(cfg, step)``: ``cfg`` (whose ``out`` is ``tmp_path``) trained as
    run "cut" until a Ctrl-C after ``step`` optimizer steps, then resumed; returns the
    resumed run's saved network."""
    from handprop import nn
    from handprop.run import resume_run, train_run

    def run(cfg, step: int):
        ctrl_c_after_step(step)
        with pytest.raises(KeyboardInterrupt):
            train_run(cfg, default_name="cut", progress=False)
        ctrl_c_after_step(None)
        resumed = resume_run(tmp_path / "cut", progress=False)
        return nn.load(resumed.run_dir / "model.npz")

    return run


class ThreadRanks:
    """``size`` ranks of a world played by threads of this process: ``sum`` is an
    Allreduce through a shared buffer and a barrier, as MPI's would be."""

    def __init__(self, size: int) -> None:
        self.size = size
        self.barrier = threading.Barrier(size, timeout=20)
        self.parts: list = [None] * size

    def rank(self, r: int):
        world = self

        class Rank:
            rank, size, stop_signal = r, world.size, 0

            def sum(self, array):
                world.parts[r] = array.copy()
                world.barrier.wait()
                total = np.sum(world.parts, axis=0)
                world.barrier.wait()
                array[...] = total

            def broadcast(self, value):
                return value

        return Rank()

    def run(self, fn) -> None:
        """``fn(r)`` for every rank r, each on a thread of its own, side by side."""
        threads = [threading.Thread(target=fn, args=(r,)) for r in range(self.size)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()


@pytest.fixture
def thread_ranks():
    """``thread_ranks(size)``: a world of ``size`` ranks played by threads."""
    return ThreadRanks


@pytest.fixture
def split_all(monkeypatch):
    """Split every batch of at least two rows per thread: ``split_all(threads)`` sets the
    thread count; the defaults come back after the test."""
    import handprop.scale.parallel as parallel_module
    from handprop.nn.threads import set_threads

    monkeypatch.setattr(parallel_module, "MIN_SHARD_MACS", 0)
    monkeypatch.setattr(parallel_module, "MIN_SHARD_MACS_PER_PARAM", 0)
    monkeypatch.setattr(parallel_module, "MIN_CONV_SHARD_MACS_PER_PARAM", 0)
    yield set_threads
    set_threads(None)


#: the array namespaces the backend tests run the layers on; a GPU machine adds cupy
#: (``HANDPROP_TEST_BACKENDS=numpy,array_api_strict,cupy``, as benchmarks/gpu_check.sh does)
BACKENDS = os.environ.get("HANDPROP_TEST_BACKENDS", "numpy,array_api_strict").split(",")


@pytest.fixture(params=BACKENDS)
def xp(request):
    """An array namespace the network's passes run in: NumPy, array-api-strict (which
    refuses every call outside the standard, so a NumPy leak fails on a CPU) or CuPy."""
    name = request.param.strip()
    if name == "numpy":
        return np
    if name == "cupy":
        from handprop.nn import backend

        try:
            return backend.device_namespace("cuda")
        except backend.DeviceError as exc:
            pytest.skip(f"cupy asked for, but {exc}")
    return pytest.importorskip(name)


def pin_dataset(monkeypatch, name: str, arrs: dict, system_dirs: tuple[str, ...] = ()):
    """Register dataset ``name``, MNIST-like, whose pinned checksums are those of the IDX
    files of ``arrs`` (file name -> array); gone after the test."""
    from handprop.data import idx_bytes
    from handprop.data.registry import DATASETS, FileSpec

    files = tuple(
        FileSpec(n, sha256=hashlib.sha256(idx_bytes(a)).hexdigest(), size=len(idx_bytes(a)))
        for n, a in arrs.items()
    )
    spec = replace(DATASETS["mnist"], name=name, files=files, mirrors=(), system_dirs=system_dirs)
    monkeypatch.setitem(DATASETS, name, spec)
    return spec


def write_dataset(directory: Path, arrs: dict, compress: bool = True) -> Path:
    """The IDX files of ``arrs`` (file name -> array) in ``directory``, gzipped or not."""
    from handprop.data import write_idx

    directory.mkdir(parents=True, exist_ok=True)
    for n, a in arrs.items():
        write_idx(directory / (n + ".gz" * compress), a, compress=compress)
    return directory


class Command:
    """``handprop ARGS`` in a subprocess of its own session (its own process group)."""

    def __init__(self, *args, cwd: Path) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, "-c", "from handprop.cli import main; main()", *map(str, args)],
            cwd=cwd,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            start_new_session=True,
        )

    def wait_for(self, condition, timeout: float = 60.0) -> None:
        deadline = time.monotonic() + timeout
        while not condition():
            if self.proc.poll() is not None:
                raise AssertionError(f"ended early: {self.proc.communicate()}")
            assert time.monotonic() < deadline, "timed out waiting"
            time.sleep(0.02)

    def finish(self, timeout: float = 120.0) -> tuple[int, str, str]:
        out, err = self.proc.communicate(timeout=timeout)
        return self.proc.returncode, out, err

    def kill_group(self) -> None:
        """SIGKILL to the group (the workers of a killed grid are in it too)."""
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.proc.pid, signal.SIGKILL)
        if self.proc.returncode is None:
            self.proc.communicate(timeout=30)


@pytest.fixture
def command(tmp_path):
    started: list[Command] = []

    def start(*args) -> Command:
        started.append(Command(*args, cwd=tmp_path))
        return started[-1]

    yield start
    for c in started:  # never leave a run, a grid or a worker behind, even on failure
        c.kill_group()


class FileServer:
    """A file server of ``root`` on 127.0.0.1 (an ephemeral port) for download tests;
    ``close`` stops it."""

    def __init__(self, root: Path):
        import http.server

        class Quiet(http.server.SimpleHTTPRequestHandler):
            def __init__(self, *args, **kwargs):
                super().__init__(*args, directory=str(root), **kwargs)

            def log_message(self, *args):
                pass

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Quiet)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self.thread.start()

    def close(self):
        self.httpd.shutdown()
        self.httpd.server_close()
        self.thread.join()


#: a small run on scikit-learn's 8x8 digits (offline), as a TOML config's text
DIGITS_CONFIG = """
dataset = "digits"
total = 1797
train = 1500
test = 297
hidden = [24]
activation = "sigmoid"
learning_rate = 2.0
epochs = 60
eval_every = 20
seed = 3
"""
