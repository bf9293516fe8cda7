import os
import threading

import numpy as np
import pytest


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
    from handprop.train import resume_run, train_run

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
    import handprop.nn.parallel as parallel_module
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
