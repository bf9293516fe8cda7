"""``python -m benchmarks.gpu_probe``: what this machine's CuPy does under CUDA graph
capture, step by step, each step's result or full traceback (issue 31; the first step of
benchmarks/gpu_check.sh's device checks, so that one run on a lent GPU says what failed).

1. the versions, and CuPy's ``Stream.begin_capture``;
2. an elementwise kernel captured and replayed;
3. ``cupy.matmul`` under capture (CuPy refuses cuBLAS there: cupy #6290);
4. handprop's own cuBLAS calls (``handprop.nn.cuda``) captured, for every layout of the
   Dense layer's products, against ``cupy.matmul``;
5. handprop's fused kernels captured (the softmax cross-entropy with its sum);
6. a :class:`~handprop.scale.TrainingStep` of 784-100-10 on the full batch and of
   cnn.toml's network on mini-batches, graphs against eager steps;
7. which fused kernels ran, and that none fell back to its unfused formula.

Exits 0 when every step passed, 1 otherwise; it never stops at a failed step.
"""

from __future__ import annotations

import sys
import time
import traceback
from collections.abc import Callable
from typing import Any

import numpy as np

FAILED: list[str] = []


def step(name: str, fn: Callable[[], Any]) -> Any:
    start = time.perf_counter()
    print(f"--- {name}", flush=True)
    try:
        out = fn()
    except Exception:
        FAILED.append(name)
        print(f"FAILED after {time.perf_counter() - start:.1f} s:", flush=True)
        traceback.print_exc()
        sys.stderr.flush()
        return None
    print(f"ok ({time.perf_counter() - start:.1f} s): {out}", flush=True)
    return out


def versions() -> str:
    import cupy

    from handprop.nn import backend

    backend.device_namespace("cuda")
    rt = cupy.cuda.runtime
    doc = (cupy.cuda.Stream.begin_capture.__doc__ or "").strip().splitlines()
    accel = getattr(cupy._core, "get_accelerators", lambda: "?")()
    return (
        f"cupy {cupy.__version__}, runtime {rt.runtimeGetVersion()}, driver "
        f"{rt.driverGetVersion()}, accelerators {accel}; begin_capture: {doc[:3]}"
    )


def capture(fn: Callable[[], Any]) -> tuple[Any, Any]:
    """(graph, result) of ``fn`` captured on a side stream, as handprop captures."""
    from handprop.nn.cuda import CudaGraphs

    graphs = CudaGraphs()
    pool = graphs.new_pool()
    graphs.run(fn, pool)  # the warm-up
    graph, result = graphs.capture(fn, pool)
    return graphs, (graph, result)


def elementwise() -> str:
    import cupy

    a = cupy.arange(10, dtype=cupy.float32)
    out = cupy.empty_like(a)
    graphs, (graph, _) = capture(lambda: cupy.multiply(a, 2, out=out))
    a += 1
    graphs.launch(graph)
    assert cupy.allclose(out, 2 * a), (out, a)
    return "replayed, reading the input's new values"


def cupy_matmul() -> str:
    import cupy

    a = cupy.ones((4, 4), dtype=cupy.float32)
    s = cupy.cuda.Stream(non_blocking=True)
    with s:
        s.begin_capture()
        try:
            cupy.matmul(a, a)
        except Exception as exc:
            s.end_capture()
            return f"refused, as expected: {type(exc).__name__}: {exc}"
        s.end_capture()
    return "CuPy captured cupy.matmul itself (no refusal on this version)"


def own_cublas() -> str:
    import cupy

    from handprop.nn import cuda

    rng = cupy.random.default_rng(0)

    def r(*shape: int) -> Any:
        return rng.standard_normal(shape, dtype=cupy.float32)

    X, W, G, A, S = r(900, 784), r(784, 100), r(900, 100), r(900, 100), r(10, 900)
    # Dense's products: X W, X^T G (dW), G W^T (dX), and A^T P (P a (k, n) transpose)
    products = [(X, W), (X.T, G), (G, W.T), (A.T, S.T)]
    outs = [cupy.empty((a.shape[0], b.shape[1]), dtype=cupy.float32) for a, b in products]

    def run() -> None:
        for (a, b), out in zip(products, outs, strict=True):
            cuda.matmul(a, b, out)

    graphs, (graph, _) = capture(run)
    X += 0.5  # the replay reads the new values
    graphs.launch(graph)
    worst = 0.0
    for (a, b), out in zip(products, outs, strict=True):
        want = cupy.matmul(a, b)
        worst = max(worst, float(cupy.max(cupy.abs(out - want)) / cupy.max(cupy.abs(want))))
    assert worst < 1e-4, worst
    return f"4 products replayed, max relative difference from cupy.matmul {worst:.2g}"


def fused_kernels() -> str:
    import cupy

    from handprop.nn import kernels

    rng = cupy.random.default_rng(1)
    Z = rng.standard_normal((1000, 10), dtype=cupy.float32)
    y = rng.integers(0, 10, 1000, dtype=cupy.int64)
    A = cupy.empty_like(Z)
    kept = {}

    def run() -> None:
        kernels.sigmoid(Z, A)
        kept["loss"], kept["G"] = kernels.softmax_cross_entropy(A, y, 1000)

    graphs, (graph, _) = capture(run)
    Z *= 2
    graphs.launch(graph)
    loss, G = kernels.softmax_cross_entropy.reference(1 / (1 + cupy.exp(-Z)), y, 1000)
    dl = abs(float(kept["loss"]) - float(loss))
    dg = float(cupy.max(cupy.abs(kept["G"] - G)))
    assert dl < 1e-5 and dg < 1e-6, (dl, dg)
    return f"sigmoid + softmax cross-entropy replayed: loss off by {dl:.2g}, G by {dg:.2g}"


def training_step(items: list[str] | None, shape: tuple[int, ...], batch: int, n: int) -> str:
    from handprop import nn
    from handprop.nn import backend
    from handprop.run import run_epoch
    from handprop.scale import DataParallel, TrainingStep

    xp = backend.device_namespace("cuda")
    rng = np.random.default_rng(0)
    X = backend.asarray(rng.random((n, *shape), dtype=np.float32), xp)
    y = backend.asarray(rng.integers(0, 10, n), xp, dtype=xp.int64)
    params, said = {}, {}
    for mode in ("off", "auto"):
        if items is None:
            net = nn.Network.from_spec([shape[0], 100, 10], rng=0).to(xp)
            opt = nn.GD(2.5)
        else:
            net = nn.Network.from_layers(items, shape, 10, rng=0).to(xp)
            opt = nn.Adam(1e-3)
        model = DataParallel(net)
        step_ = TrainingStep(model, opt, mode)
        for epoch in range(3):
            r = np.random.default_rng([0, epoch])
            net.set_rng(r)
            run_epoch(model, opt, X, y, batch, r, lambda loss: None, step=step_)
        params[mode] = backend.to_host(net.params)
        said[mode] = (step_.captures, step_.replays, step_.off_reason)
    a, b = params["auto"], params["off"]
    diff = float(np.max(np.abs(a - b)) / np.max(np.abs(b)))
    assert said["auto"][2] is None, said["auto"]
    assert diff < 1e-3, diff
    return f"(captures, replays, off) {said['auto']}; graph vs eager parameters {diff:.2g}"


def kernels_used() -> str:
    from handprop.nn.kernels import FUSED

    failed = {name: f.failed for name, f in FUSED.items() if f.failed}
    assert not failed, f"fell back to the unfused formula: {failed}"
    return "launched: " + ", ".join(name for name, f in FUSED.items() if f._launched)


def main() -> int:
    step("versions", versions)
    step("an elementwise kernel captured", elementwise)
    step("cupy.matmul under capture", cupy_matmul)
    step("handprop's cuBLAS calls captured", own_cublas)
    step("handprop's fused kernels captured", fused_kernels)
    step("full-batch step (784-100-10, GD)", lambda: training_step(None, (784,), 2000, 2000))
    cnn = ["conv 32 3", "relu", "maxpool 2", "conv 64 3", "relu", "maxpool 2", "dense 128"]
    cnn += ["relu", "dropout 0.5"]
    step("mini-batch step (cnn.toml, Adam)", lambda: training_step(cnn, (1, 28, 28), 128, 600))
    step("fused kernels: none fell back to the unfused formula", kernels_used)
    print(f"failed: {FAILED or 'none'}", flush=True)
    return 1 if FAILED else 0


if __name__ == "__main__":
    sys.exit(main())
