"""handprop.nn.cuda's GEMM layouts: every matrix product the layers capture, as one
cuBLAS call. cuBLAS is emulated here on NumPy buffers (column-major, ld, op, strided
batches, as its documentation defines them), so a wrong transpose or leading dimension
fails on any machine; tests/test_graphs.py runs the real calls on a GPU."""

import ctypes
import sys
import types

import numpy as np
import pytest
from numpy.lib.stride_tricks import as_strided

from handprop.nn import cuda
from handprop.nn.cuda import OP_N, plan_gemm


def operand(buf, offset, op, rows, cols, ld):
    """op(X) (rows x cols) of the column-major matrix stored at ``offset`` with ``ld``:
    X itself (rows x cols) for OP_N, X^T of a (cols x rows) X for OP_T."""
    size = buf.itemsize
    if op == OP_N:  # (r, c) at r + c ld
        return as_strided(buf[offset:], (rows, cols), (size, ld * size))
    return as_strided(buf[offset:], (rows, cols), (ld * size, size))  # X[c, r]


def cublas_gemm(plan, buf, offsets):
    """What cublas<t>gemm(StridedBatched) writes into ``buf``: C = op(A) op(B) per batch."""
    p = plan
    for b in range(p.batch):
        A = operand(buf, offsets[p.first] + b * p.stride_first, p.op_first, p.m, p.k, p.ld_first)
        B = operand(
            buf, offsets[p.second] + b * p.stride_second, p.op_second, p.k, p.n, p.ld_second
        )
        C = operand(buf, offsets["c"] + b * p.stride_c, OP_N, p.m, p.n, p.ldc)
        C[...] = A @ B


def check(a, b, c, buf):
    """Plan a @ b into c (views of ``buf``), emulate cuBLAS, compare with NumPy."""
    size = buf.itemsize
    base = buf.__array_interface__["data"][0]
    views = {"a": a, "b": b, "c": c}
    offsets = {k: (v.__array_interface__["data"][0] - base) // size for k, v in views.items()}
    plan = plan_gemm(*((v.shape, tuple(s // size for s in v.strides)) for v in views.values()))
    assert plan is not None
    want = np.matmul(a, b)
    c[...] = np.nan
    cublas_gemm(plan, buf, offsets)
    np.testing.assert_allclose(c, want, rtol=1e-12)
    return plan


def carve(buf, start, shape, order="C"):
    """A contiguous (C or F) array of ``shape`` in ``buf`` from element ``start``."""
    size = int(np.prod(shape))
    flat = buf[start : start + size]
    return flat.reshape(shape, order=order), start + size


@pytest.fixture
def buf(rng):
    return rng.normal(size=200_000)


# (name, make) with make(buf) -> (a, b, c): the products of Dense and Conv2D
def dense_forward(buf):
    X, at = carve(buf, 0, (9, 6))
    W, at = carve(buf, at, (6, 4))
    Z, _ = carve(buf, at + 3, (9, 4))
    return X, W, Z


def dense_dW(buf):
    X, at = carve(buf, 0, (9, 6))
    S, at = carve(buf, at, (4, 9))  # softmax's G: the transpose of a (k, n) array
    dW, _ = carve(buf, at, (6, 4))
    return X.T, S.T, dW


def dense_dX(buf):
    G, at = carve(buf, 0, (9, 4))
    W, at = carve(buf, at, (6, 4))
    dX, _ = carve(buf, at, (9, 6))
    return G, W.T, dX


# Conv2D on batch-last images: Z (c_out, ho wo n) = W_mat (c_out, c_in k k) @ cols
# (c_in k k, ho wo n), with G (c_out, ho wo n) as Z; the weight gradient in either
# orientation (G @ cols^T, or cols @ G^T then a transposing copy), dcols = W_mat^T @ G
def conv_forward(buf):
    Wm, at = carve(buf, 0, (5, 12))
    cols, at = carve(buf, at, (12, 30))
    Z, _ = carve(buf, at, (5, 30))
    return Wm, cols, Z


def conv_dW(buf):
    G, at = carve(buf, 0, (5, 30))
    cols, at = carve(buf, at, (12, 30))
    dW, _ = carve(buf, at, (5, 12))
    return G, cols.T, dW


def conv_dWt(buf):
    cols, at = carve(buf, 0, (12, 30))
    G, at = carve(buf, at, (5, 30))
    dWt, _ = carve(buf, at, (12, 5))
    return cols, G.T, dWt


def conv_dcols(buf):
    Wm, at = carve(buf, 0, (5, 12))
    G, at = carve(buf, at, (5, 30))
    dcols, _ = carve(buf, at, (12, 30))
    return Wm.T, G, dcols


# strided batches of products (cublas<t>gemmStridedBatched), one matrix shared by the
# batch or a matrix each, transposed or not: layouts plan_gemm plans (no layer's
# product is batched since Conv2D lost its per-image path)
def batch_shared_first(buf):  # one matrix for every matrix of the batch
    Wm, at = carve(buf, 0, (4, 9))
    cols, at = carve(buf, at, (3, 9, 25))
    Z, _ = carve(buf, at, (3, 4, 25))
    return Wm, cols, Z


def batch_transposed_second(buf):
    G, at = carve(buf, 0, (3, 4, 25))
    cols, at = carve(buf, at, (3, 9, 25))
    dW, _ = carve(buf, at, (3, 4, 9))
    return G, np.transpose(cols, (0, 2, 1)), dW


def batch_shared_transposed_first(buf):
    Wm, at = carve(buf, 0, (4, 9))
    G, at = carve(buf, at, (3, 4, 25))
    dcols, _ = carve(buf, at, (3, 9, 25))
    return Wm.T, G, dcols


def column_major_out(buf):
    A, at = carve(buf, 0, (7, 3))
    B, at = carve(buf, at, (3, 5), order="F")
    C, _ = carve(buf, at, (7, 5), order="F")
    return A, B, C


def padded_rows(buf):  # a leading dimension larger than the row: a slice of a wider array
    big, at = carve(buf, 0, (8, 11))
    B, at = carve(buf, at, (6, 4))
    wide, _ = carve(buf, at, (8, 9))
    return big[:, 2:8], B, wide[:, 1:5]


def degenerate(buf):
    a, at = carve(buf, 0, (1, 5))
    b, at = carve(buf, at, (5, 1))
    c, _ = carve(buf, at, (1, 1))
    return a, b, c


CASES = [
    dense_forward,
    dense_dW,
    dense_dX,
    conv_forward,
    conv_dW,
    conv_dWt,
    conv_dcols,
    batch_shared_first,
    batch_transposed_second,
    batch_shared_transposed_first,
    column_major_out,
    padded_rows,
    degenerate,
]


@pytest.mark.parametrize("make", CASES, ids=[f.__name__ for f in CASES])
def test_every_product_of_the_layers_is_one_cublas_call(make, buf):
    plan = check(*make(buf), buf)
    a, b, _ = make(buf)
    assert plan.batch == (3 if max(a.ndim, b.ndim) == 3 else 1)


def test_a_layout_cublas_cannot_take_is_refused(buf):
    a, at = carve(buf, 0, (6, 8))
    b, at = carve(buf, at, (4, 5))
    c, _ = carve(buf, at, (6, 5))
    size = buf.itemsize

    def plan(x, y, z):
        return plan_gemm(*((v.shape, tuple(s // size for s in v.strides)) for v in (x, y, z)))

    assert plan(a[:, ::2], b, c) is None  # every other column: no unit stride
    assert plan(a[:, :4], b, c) is not None  # a slice with whole rows apart is fine
    assert plan(a[:, :3], b, c) is None  # shapes that do not chain
    assert plan(a[None, :, :4], b, c) is None  # a batch into a single matrix


# -- Cublas.matmul's calls, on host memory -------------------------------------------------


class HostArray:
    """A NumPy array posing as a CuPy one: ``data.ptr``, ``shape``, ``strides``..."""

    def __init__(self, a):
        self.a = a
        self.shape, self.strides, self.dtype, self.ndim = a.shape, a.strides, a.dtype, a.ndim
        self.nbytes = a.nbytes
        self.data = types.SimpleNamespace(ptr=a.__array_interface__["data"][0])


def host_matrix(ptr, dtype, op, rows, cols, ld):
    """op(X) (rows x cols) of the column-major matrix at the address ``ptr``."""
    stored = (rows, cols) if op == OP_N else (cols, rows)
    count = ld * (stored[1] - 1) + stored[0]
    kind = ctypes.c_float if dtype == np.float32 else ctypes.c_double
    buf = np.ctypeslib.as_array((kind * count).from_address(ptr))
    return operand(buf, 0, op, rows, cols, ld)


class HostCublas:
    """cuBLAS's entry points that Cublas calls, run by NumPy on host memory."""

    def __init__(self):
        self.calls = []
        for prefix, dtype in (("S", np.float32), ("D", np.float64)):
            setattr(self, f"cublas{prefix}gemm_v2", self._gemm(dtype, batched=False))
            setattr(self, f"cublas{prefix}gemmStridedBatched", self._gemm(dtype, batched=True))
        self.cublasCreate_v2 = lambda handle: 0
        self.cublasSetStream_v2 = lambda handle, stream: 0
        self.cublasSetWorkspace_v2 = lambda handle, ptr, size: 0

    def _gemm(self, dtype, batched):
        size = np.dtype(dtype).itemsize

        def gemm(handle, op_a, op_b, m, n, k, alpha, A, lda, *rest):
            if batched:
                sa, B, ldb, sb, beta, C, ldc, sc, count = rest
            else:
                (B, ldb, beta, C, ldc), sa, sb, sc, count = rest, 0, 0, 0, 1
            assert alpha._obj.value == 1.0 and beta._obj.value == 0.0
            self.calls.append(("batched" if batched else "gemm", count))
            for b in range(count):
                a_ = host_matrix(A + b * sa * size, dtype, op_a, m, k, lda)
                b_ = host_matrix(B + b * sb * size, dtype, op_b, k, n, ldb)
                c_ = host_matrix(C + b * sc * size, dtype, OP_N, m, n, ldc)
                c_[...] = a_ @ b_
            return 0

        return gemm


@pytest.mark.parametrize("make", CASES, ids=[f.__name__ for f in CASES])
@pytest.mark.parametrize("dtype", [np.float64, np.float32])
def test_the_cublas_calls_are_made_as_cublas_reads_them(make, dtype, monkeypatch):
    """Cublas.matmul's ctypes calls (their order of arguments, pointers, leading
    dimensions, batch strides) into a host stand-in of cuBLAS."""
    fake_cupy = types.ModuleType("cupy")
    fake_cupy.uint8 = np.uint8
    fake_cupy.empty = lambda shape, dtype: HostArray(np.empty(shape, dtype=dtype))
    monkeypatch.setitem(sys.modules, "cupy", fake_cupy)
    lib = HostCublas()
    monkeypatch.setattr(cuda, "_load_cublas", lambda: lib)
    buf = np.random.default_rng(3).normal(size=200_000).astype(dtype)
    a, b, c = make(buf)
    want = np.matmul(a, b)
    c[...] = np.nan
    out = cuda.Cublas().matmul(HostArray(a), HostArray(b), HostArray(c))
    assert out is not None and lib.calls
    tol = 1e-12 if dtype == np.float64 else 1e-5
    np.testing.assert_allclose(c, want, rtol=tol, atol=tol)
