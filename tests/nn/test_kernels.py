"""Every fused formula of handprop.nn.kernels against its unfused formula.

Three checks each: the unfused passes (the CPU path) compute the textbook formula; the
CUDA kernel's body, run element by element in Python (tests/nn/cuda_c.py), computes
what the unfused passes compute; and on every backend of the ``xp`` fixture the formula
as the layers call it equals NumPy's (array-api-strict runs the unfused passes, CuPy
compiles and runs the kernel: ``HANDPROP_TEST_BACKENDS=numpy,array_api_strict,cupy`` on
a GPU machine, as benchmarks/gpu_check.sh sets)."""

import sys
import types

import cuda_c  # tests/nn/cuda_c.py: pytest puts tests/nn on sys.path
import numpy as np
import pytest

from handprop.nn import backend, kernels
from handprop.nn.kernels import FUSED

N = 37  # elements of the vectors (optimizers) and rows of the matrices


def case(name, rng, dtype):
    """(args, work, textbook): the formula's arguments (inputs, then outputs with their
    starting values), its work arrays, and the textbook values of its outputs."""
    f = lambda *shape: rng.normal(size=shape).astype(dtype)  # noqa: E731
    empty = lambda *shape: np.full(shape, np.nan, dtype=dtype)  # noqa: E731
    X, G, A = f(N, 7), f(N, 7), 1 / (1 + np.exp(-f(N, 7)))
    p, grads, m, v = f(N), f(N), f(N), np.abs(f(N))
    decay = np.where(np.arange(N) % 3 == 0, 0.0, 0.01).astype(dtype)
    g = grads + decay * p
    if name == "sigmoid":
        return [X, empty(N, 7)], {}, [1 / (1 + np.exp(-X))]
    if name == "sigmoid_backward":
        return [G, A, empty(N, 7)], {}, [G * A * (1 - A)]
    if name == "tanh_backward":
        T = np.tanh(X)
        return [G, T, empty(N, 7)], {}, [G * (1 - T**2)]
    if name == "relu":
        X[0, :3] = [0.0, -0.0, np.nan]
        return [X, np.zeros((N, 7), bool), empty(N, 7)], {}, [X > 0, np.maximum(X, 0)]
    if name == "relu_backward":
        positive = X > 0
        return [G, positive, empty(N, 7)], {}, [np.where(positive, G, 0)]
    if name == "dropout":
        keep, p_drop = rng.random((N, 7)) >= 0.3, 0.3
        M = keep / (1 - p_drop)
        return [X, keep, 1 / (1 - p_drop), empty(N, 7), empty(N, 7)], {}, [M, X * M]
    if name == "softmax_cross_entropy":
        Z, y, count = f(N, 10) * 3, rng.integers(0, 10, N), 2 * N
        Z[1] = [1000.0, -1000.0] + [0.0] * 8  # exp overflows unless shifted
        shifted = Z - Z.max(axis=1, keepdims=True)
        logp = shifted - np.log(np.exp(shifted).sum(axis=1, keepdims=True))
        smoothing = 0.1  # smoothed targets: (1 - 0.1) one-hot + 0.1 / 10 everywhere
        Y = (1 - smoothing) * np.eye(10)[y] + smoothing / 10
        loss = -(Y * logp).sum() / count
        return [Z, y, count, smoothing], {}, [loss, (np.exp(logp) - Y) / count]
    lr, mu = 0.03, 0.9
    if name == "gd_step":
        return [grads, decay, lr, p], {"g": empty(N)}, [p - lr * g]
    if name == "momentum_step":
        v2 = mu * v + g
        return [grads, decay, mu, lr, p, v], {"g": empty(N)}, [p - lr * v2, v2]
    if name == "nesterov_step":
        v2 = mu * v + g
        return [grads, decay, mu, lr, lr * mu, p, v], {"g": empty(N)}, [p - lr * (g + mu * v2), v2]
    if name == "adam_step":
        b1, b2, eps, t = 0.9, 0.999, 1e-8, 7
        m2, v2 = b1 * m + (1 - b1) * g, b2 * v + (1 - b2) * g**2
        m_hat, v_hat = m2 / (1 - b1**t), v2 / (1 - b2**t)
        c2 = float(np.sqrt(1 - b2**t))  # a Python float, as Adam passes it
        args = [grads, decay, b1, 1 - b1, b2, 1 - b2, eps * c2, lr * c2 / (1 - b1**t), p, m, v]
        work = {"g": empty(N), "tmp": empty(N)}
        return args, work, [p - lr * m_hat / (np.sqrt(v_hat) + eps), m2, v2]
    if name == "rmsprop_step":
        rho, eps, s = 0.9, 1e-8, v
        s2 = rho * s + (1 - rho) * g**2
        args = [grads, decay, rho, 1 - rho, eps, lr, p, s]
        return args, {"g": empty(N), "tmp": empty(N)}, [p - lr * g / (np.sqrt(s2) + eps), s2]
    raise KeyError(name)


def copied(args):
    return [a.copy() if isinstance(a, np.ndarray) else a for a in args]


def outputs(result):
    return list(result) if isinstance(result, tuple) else [result]


TOL = {np.float32: dict(rtol=2e-5, atol=2e-6), np.float64: dict(rtol=1e-12, atol=1e-14)}


def test_every_fused_formula_has_a_case():
    rng = np.random.default_rng(0)
    for name in FUSED:
        case(name, rng, np.float64)
    assert set(FUSED) >= {
        "sigmoid", "sigmoid_backward", "relu", "relu_backward", "dropout",
        "softmax_cross_entropy", "gd_step", "momentum_step", "nesterov_step", "adam_step",
    }  # fmt: skip


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
@pytest.mark.parametrize("name", sorted(FUSED))
def test_the_unfused_formula_is_the_textbook_one(name, dtype, rng):
    args, work, textbook = case(name, rng, dtype)
    got = outputs(FUSED[name](*copied(args), **work))
    tol = TOL[dtype] if dtype == np.float64 else dict(rtol=2e-5, atol=1e-5)
    for ours, want in zip(got, textbook, strict=True):
        if isinstance(want, np.ndarray) and want.dtype == bool:
            np.testing.assert_array_equal(ours, want)
        else:
            np.testing.assert_allclose(np.asarray(ours, np.float64), want, **tol)
        if isinstance(ours, np.ndarray) and ours.dtype != bool:
            assert ours.dtype == dtype  # float32 stays float32


def run_kernel_body(name, args):
    """The CUDA body, run in Python, with the arguments the GPU launch would get."""
    f = FUSED[name]
    if name == "softmax_cross_entropy":  # the launch: flat raw arrays, then the sum
        Z, y, count, smoothing = args
        n, k = Z.shape
        G, losses = np.empty_like(Z), np.empty(n, dtype=Z.dtype)
        flat = (Z.reshape(-1), y, k, 1.0 / count, smoothing, G.reshape(-1), losses)
        cuda_c.run(f.inputs, f.outputs, f.body, *flat)
        return [losses.sum() / count, G]
    return outputs(cuda_c.run(f.inputs, f.outputs, f.body, *args))


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
@pytest.mark.parametrize("name", sorted(FUSED))
def test_the_cuda_kernel_computes_the_unfused_formula(name, dtype, rng):
    args, work, _ = case(name, rng, dtype)
    unfused = outputs(FUSED[name].reference(*copied(args), **work))
    fused = run_kernel_body(name, copied(args))
    for ours, want in zip(fused, unfused, strict=True):
        want = np.asarray(want)
        if want.dtype == bool:
            np.testing.assert_array_equal(ours, want)
        else:  # the same operations, in the same order, up to float rounding
            np.testing.assert_allclose(np.asarray(ours, np.float64), want, **TOL[dtype])


def test_the_kernel_sources_stay_in_the_checked_subset():
    """A body outside the subset that cuda_c runs would go unchecked: refused."""
    with pytest.raises(SyntaxError):
        cuda_c.translate("a = (float)b;")
    with pytest.raises(SyntaxError):
        cuda_c.translate("a = b++;")
    for f in FUSED.values():
        cuda_c.translate(f.body)  # raises SyntaxError outside the subset
        assert f.name.isidentifier() and f.__doc__


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
@pytest.mark.parametrize("name", sorted(FUSED))
def test_every_backend_computes_what_numpy_computes(name, dtype, xp, rng):
    """The formula as a layer calls it, on ``xp``: CuPy's fused kernel, the unfused
    passes elsewhere; against NumPy's unfused passes."""
    args, work, _ = case(name, rng, dtype)
    want = outputs(FUSED[name](*copied(args), **work))
    there = [backend.asarray(a, xp) if isinstance(a, np.ndarray) else a for a in args]
    work_there = {k: backend.asarray(a, xp) for k, a in work.items()}
    got = outputs(FUSED[name](*there, **work_there))
    fused = kernels._on_cupy(there[0])
    assert not fused or FUSED[name].failed is None, FUSED[name].failed  # not unfused
    for ours, theirs in zip(got, want, strict=True):
        ours = backend.to_host(ours) if hasattr(ours, "shape") else ours
        theirs = np.asarray(theirs)
        if theirs.dtype == bool:
            np.testing.assert_array_equal(ours, theirs)
        else:
            tol = dict(rtol=1e-4, atol=1e-5) if fused and dtype == np.float32 else TOL[dtype]
            if fused and dtype == np.float64:
                tol = dict(rtol=1e-10, atol=1e-12)
            np.testing.assert_allclose(np.asarray(ours, np.float64), theirs, **tol)


class FakeCupy(types.ModuleType):
    """Just enough of CuPy for a fused formula's launch: ``ElementwiseKernel`` runs the
    body element by element (cuda_c), the arrays are NumPy's."""

    empty = staticmethod(np.empty)
    ascontiguousarray = staticmethod(np.ascontiguousarray)

    def __init__(self):
        super().__init__("cupy")

    @staticmethod
    def ElementwiseKernel(inputs, outputs, body, name):
        assert name.startswith("handprop_") and name.isidentifier()
        count = len(cuda_c.params(inputs)) + len(cuda_c.params(outputs))

        def launch(*args):
            assert len(args) == count, f"{name}: {count} parameters, {len(args)} arguments"
            return cuda_c.run(inputs, outputs, body, *args)

        return launch


@pytest.mark.parametrize("name", sorted(FUSED))
def test_each_kernel_is_launched_with_its_parameters_in_order(name, rng, monkeypatch):
    """The CuPy path as it calls the kernel (its launch, the argument order, what it
    returns), with the kernel's body run in Python: equal to the unfused formula."""
    monkeypatch.setitem(sys.modules, "cupy", FakeCupy())
    monkeypatch.setattr(kernels, "_on_cupy", lambda a: True)
    for attribute, value in (("_kernel", None), ("_launched", False), ("failed", None)):
        monkeypatch.setattr(FUSED[name], attribute, value)  # compiled by the fake
    args, work, _ = case(name, rng, np.float64)
    fused = outputs(FUSED[name](*copied(args), **work))
    assert FUSED[name].failed is None and FUSED[name]._launched
    unfused = outputs(FUSED[name].reference(*copied(args), **work))
    for ours, want in zip(fused, unfused, strict=True):
        np.testing.assert_allclose(
            np.asarray(ours, np.float64), np.asarray(want), **TOL[np.float64]
        )
