"""Epoch time of data-parallel training on N MPI ranks, one thread each (issue 14).

    mpiexec -n 1 python -m benchmarks.mpi_epoch
    mpiexec -n 2 python -m benchmarks.mpi_epoch

Every rank runs the training loop's own pass (``DataParallel(net, world).train_pass``,
its rows of each batch, one Allreduce per step) and the optimizer step, with one thread
and BLAS held to one thread, so that N ranks compare like with like with one. Two cases:
the seed epoch (784-100-10 sigmoid, full batch of 18000 MNIST images, gradient descent)
and the CNN of ``experiments/cnn.toml`` at batch 128 with Adam, timed over
``--cnn-steps`` steps and scaled to the 469 steps of a 60000-image epoch. Rank 0 prints
medians over the repeats; pass them to ``python -m benchmarks.scaling --reuse
--measured seed:N=SECONDS --measured cnn128:N=SECONDS``.
"""

from __future__ import annotations

import argparse
import os
import time

import numpy as np

from benchmarks.common import median

os.environ.setdefault("HANDPROP_THREADS", "1")  # before handprop reads it


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--cnn-steps", type=int, default=20)
    args = parser.parse_args()

    from threadpoolctl import threadpool_limits

    from benchmarks.data import default_data_dir, load_mnist
    from benchmarks.mpi_allreduce import cnn_layers
    from handprop.nn import GD, Adam, Network
    from handprop.scale import DataParallel, mpi

    world = mpi.world()
    threadpool_limits(1, user_api="blas")
    mnist, why = load_mnist(default_data_dir())
    source = "MNIST" if mnist is not None else f"synthetic ({why})"
    if mnist is None:
        rng = np.random.default_rng(0)
        X = rng.random((60000, 784), dtype=np.float32)
        y = rng.integers(0, 10, 60000)
    else:
        X, y = mnist.train
    results = {}

    seed = DataParallel(Network.from_spec("784-100-10", activation="sigmoid", rng=0), world)
    gd = GD(2.5)
    Xs, ys = np.ascontiguousarray(X[:18000]), y[:18000]

    def seed_epoch() -> None:
        seed.train_pass(Xs, ys)
        gd.step(seed.params, seed.grads)

    results["seed"] = timed(seed_epoch, args.repeats, world)

    net = Network.from_layers(cnn_layers(), (1, 28, 28), 10, init="he_uniform", rng=0)
    cnn, adam = DataParallel(net, world), Adam(1e-3)
    Xc = X[: 128 * args.cnn_steps].reshape(-1, 1, 28, 28)
    yc = y[: 128 * args.cnn_steps]

    def cnn_steps() -> None:
        for start in range(0, len(yc), 128):
            cnn.train_pass(Xc[start : start + 128], yc[start : start + 128])
            adam.step(cnn.params, cnn.grads)

    steps = timed(cnn_steps, max(1, args.repeats // 2), world)
    results["cnn128"] = steps * (60000 / 128) / args.cnn_steps
    if world.rank == 0:
        print(f"{world.size} rank(s), 1 thread each, data: {source}")
        print(f"seed epoch (18000, full batch): {results['seed'] * 1e3:.1f} ms")
        print(
            f"CNN epoch at batch 128 (from {args.cnn_steps} steps, scaled to 469): "
            f"{results['cnn128']:.2f} s"
        )
        print(
            "measured: "
            + " ".join(f"--measured {k}:{world.size}={v:.4g}" for k, v in results.items())
        )


def timed(fn, repeats: int, world) -> float:
    """Median seconds of ``fn`` over ``repeats`` calls after one warm-up, every rank
    starting together (the slowest rank's time is the step's)."""
    fn()
    times = []
    sync = np.zeros(1)
    for _ in range(repeats):
        world.sum(sync)  # a barrier
        start = time.perf_counter()
        fn()
        elapsed = np.array([time.perf_counter() - start])
        world.sum(elapsed)  # the mean over ranks; they finish together after the reduce
        times.append(float(elapsed[0]) / world.size)
    return median(times)


if __name__ == "__main__":
    main()
