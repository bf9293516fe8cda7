"""CUDA graphs on CuPy: capture a pass once, replay it; cuBLAS while capturing.

Imported only on a GPU (by :mod:`handprop.nn.backend` for CuPy's arrays and by
:mod:`handprop.scale.graphs`); the layout arithmetic of :func:`plan_gemm` is plain
Python, tested on any machine.

**Capture.** :class:`CudaGraphs` runs a pass once eagerly (the warm-up: kernels
compiled, memory blocks cached), then captures it on a side stream: CuPy queues every
kernel into a ``cupy.cuda.Graph`` instead of running it, and the graph, launched, runs
them all with one call. Whatever the pass allocates comes from a memory pool of the
graph's own (``cupy.cuda.using_allocator``), so no other array ever takes the memory
that a replay writes; the arrays it reads and writes must stay the same objects (a
rebinding, ``a = a + b``, would leave the graph writing the old array: cupy #9655).

**cuBLAS while capturing.** CuPy refuses library calls under capture (cupy #6290:
``cupy.matmul`` raises ``NotImplementedError`` naming cuBLAS), though cuBLAS itself
captures its GEMMs. While a capture runs, :func:`matmul` calls cuBLAS directly, through
ctypes, with a handle of its own bound to the capture stream and to a workspace that
outlives the graph (:class:`Cublas`); otherwise it is ``cupy.matmul``.
"""

from __future__ import annotations

import contextlib
import ctypes
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any, TypeVar

import numpy as np

T = TypeVar("T")

#: cuBLAS's workspace for captured GEMMs (NVIDIA's advice for Hopper: 32 MiB)
CUBLAS_WORKSPACE = 32 * 2**20
#: cudaStreamCaptureModeRelaxed: a cudaMalloc from the pool does not break the capture
CAPTURE_MODE_RELAXED = 2
OP_N, OP_T = 0, 1

_capturing: Cublas | None = None  # set while a capture runs (:func:`capturing`)


# -- GEMM layouts ---------------------------------------------------------------------


@dataclass(frozen=True)
class GemmPlan:
    """One cuBLAS call (column-major) that computes C = A @ B of row-major arrays.

    ``first`` is the operand ("a" or "b") that cuBLAS gets as its A, ``second`` its B;
    op, m, n, k, ld and the batch strides (in elements) are cuBLAS's arguments."""

    first: str
    op_first: int
    op_second: int
    m: int
    n: int
    k: int
    ld_first: int
    ld_second: int
    ldc: int
    stride_first: int
    stride_second: int
    stride_c: int
    batch: int

    @property
    def second(self) -> str:
        return "b" if self.first == "a" else "a"


def _layout(shape: tuple[int, int], strides: tuple[int, int]) -> tuple[str, int] | None:
    """("C", ld) when the matrix's rows are contiguous (element (i, j) at i ld + j),
    ("F", ld) when its columns are (at i + j ld), None when neither (strides in
    elements; a dimension of 1 may have any stride)."""
    rows, cols = shape
    s0, s1 = strides
    if (cols == 1 or s1 == 1) and (rows == 1 or s0 >= max(cols, 1)):
        return "C", s0 if rows > 1 else max(cols, 1)
    if (rows == 1 or s0 == 1) and (cols == 1 or s1 >= max(rows, 1)):
        return "F", s1 if cols > 1 else max(rows, 1)
    return None


def _batch_stride(shape: tuple[int, ...], strides: tuple[int, ...], batch: int) -> int | None:
    """The stride between the matrices of a batch of ``batch`` (0: one matrix for all)."""
    if len(shape) == 2 or shape[0] == 1:
        return 0
    return strides[0] if shape[0] == batch else None


def plan_gemm(
    a: tuple[tuple[int, ...], tuple[int, ...]],
    b: tuple[tuple[int, ...], tuple[int, ...]],
    c: tuple[tuple[int, ...], tuple[int, ...]],
) -> GemmPlan | None:
    """The cuBLAS call for C = A @ B, each given as (shape, strides in elements): 2-D,
    or a batch of matrices (3-D, a 2-D operand shared by the batch); None for a layout
    cuBLAS cannot take as it is (the caller then uses ``cupy.matmul``).

    cuBLAS is column-major: a row-major C is the column-major C^T = B^T A^T, so B goes
    first; a matrix stored row-major is, read column-major, its own transpose."""
    (a_shape, a_strides), (b_shape, b_strides), (c_shape, c_strides) = a, b, c
    if not (2 <= len(a_shape) <= 3 and 2 <= len(b_shape) <= 3 and 2 <= len(c_shape) <= 3):
        return None
    m, k = a_shape[-2:]
    k2, n = b_shape[-2:]
    if k != k2 or tuple(c_shape[-2:]) != (m, n) or min(m, n, k) < 1:
        return None
    batch = c_shape[0] if len(c_shape) == 3 else 1
    if len(c_shape) == 2 and (len(a_shape) == 3 or len(b_shape) == 3):
        return None
    sa, sb = _batch_stride(a_shape, a_strides, batch), _batch_stride(b_shape, b_strides, batch)
    sc = c_strides[0] if len(c_shape) == 3 else 0
    la, lb = _layout((m, k), a_strides[-2:]), _layout((k, n), b_strides[-2:])
    lc = _layout((m, n), c_strides[-2:])
    if None in (sa, sb, la, lb, lc) or min(a_strides + b_strides + c_strides) < 0:
        return None
    (oa, lda), (ob, ldb), (oc, ldc) = la, lb, lc
    if oc == "C":  # C^T (n x m) = B^T A^T
        return GemmPlan(
            "b", OP_N if ob == "C" else OP_T, OP_N if oa == "C" else OP_T,
            n, m, k, ldb, lda, ldc, sb, sa, sc, batch,
        )  # fmt: skip
    return GemmPlan(  # C (m x n) = A B
        "a", OP_N if oa == "F" else OP_T, OP_N if ob == "F" else OP_T,
        m, n, k, lda, ldb, ldc, sa, sb, sc, batch,
    )  # fmt: skip


# -- cuBLAS, directly ---------------------------------------------------------------------


def _load_cublas() -> ctypes.CDLL:
    """The cuBLAS library this process has loaded (CuPy loads it for its first matmul),
    found in /proc/self/maps, else by its usual names."""
    found = []
    with contextlib.suppress(OSError), open("/proc/self/maps") as maps:
        for line in maps:
            path = line.split()[-1] if line.strip() else ""
            name = path.rsplit("/", 1)[-1]
            if name.startswith("libcublas.so") and path not in found:
                found.append(path)
    errors = []
    for name in (*found, "libcublas.so.13", "libcublas.so.12", "libcublas.so"):
        try:
            return ctypes.CDLL(name)
        except OSError as exc:
            errors.append(f"{name}: {exc}")
    raise OSError("cuBLAS not found: " + "; ".join(errors))


def _check(status: int, what: str) -> None:
    if status != 0:
        raise RuntimeError(f"{what} failed: cuBLAS status {status}")


class Cublas:
    """A cuBLAS handle of handprop's own, called through ctypes: GEMMs captured into a
    graph, where CuPy's own wrappers refuse to run."""

    def __init__(self) -> None:
        import cupy

        lib = _load_cublas()
        vp, i, ll = ctypes.c_void_p, ctypes.c_int, ctypes.c_longlong
        for prefix in ("S", "D"):
            gemm = getattr(lib, f"cublas{prefix}gemm_v2")
            gemm.argtypes = [vp, i, i, i, i, i, vp, vp, i, vp, i, vp, vp, i]
            batched = getattr(lib, f"cublas{prefix}gemmStridedBatched")
            batched.argtypes = [vp, i, i, i, i, i, vp, vp, i, ll, vp, i, ll, vp, vp, i, ll, i]
        lib.cublasCreate_v2.argtypes = [ctypes.POINTER(vp)]
        lib.cublasSetStream_v2.argtypes = [vp, vp]
        lib.cublasSetWorkspace_v2.argtypes = [vp, vp, ctypes.c_size_t]
        self.lib = lib
        self.handle = vp()
        _check(lib.cublasCreate_v2(ctypes.byref(self.handle)), "cublasCreate")
        self.workspace = cupy.empty(CUBLAS_WORKSPACE, dtype=cupy.uint8)  # lives with us
        self._scalars = {
            "float32": (ctypes.c_float(1.0), ctypes.c_float(0.0)),
            "float64": (ctypes.c_double(1.0), ctypes.c_double(0.0)),
        }

    def bind(self, stream_ptr: int) -> None:
        """Queue the GEMMs on ``stream_ptr``, with the workspace (setting a stream resets
        cuBLAS's workspace, so it comes second)."""
        _check(self.lib.cublasSetStream_v2(self.handle, stream_ptr), "cublasSetStream")
        status = self.lib.cublasSetWorkspace_v2(
            self.handle, self.workspace.data.ptr, self.workspace.nbytes
        )
        _check(status, "cublasSetWorkspace")

    def matmul(self, a: Any, b: Any, out: Any = None) -> Any:
        """out = a @ b by one cuBLAS call, or None when the arrays are not float32 or
        float64 alike or their layout needs a copy first."""
        import cupy

        dtype = a.dtype
        if dtype.name not in self._scalars or b.dtype != dtype:
            return None
        if a.ndim < 2 or b.ndim < 2:
            return None
        shape = (*np.broadcast_shapes(a.shape[:-2], b.shape[:-2]), a.shape[-2], b.shape[-1])
        if out is None:
            out = cupy.empty(shape, dtype=dtype)
        elif out.dtype != dtype or tuple(out.shape) != tuple(shape):
            return None
        size = dtype.itemsize
        arrays = {"a": a, "b": b, "c": out}
        if any(s % size for x in arrays.values() for s in x.strides):
            return None
        plan = plan_gemm(
            *((tuple(x.shape), tuple(s // size for s in x.strides)) for x in arrays.values())
        )
        if plan is None:
            return None
        one, zero = self._scalars[dtype.name]
        prefix = "S" if dtype.name == "float32" else "D"
        first, second = arrays[plan.first].data.ptr, arrays[plan.second].data.ptr
        p = plan
        if p.batch == 1:
            status = getattr(self.lib, f"cublas{prefix}gemm_v2")(
                self.handle, p.op_first, p.op_second, p.m, p.n, p.k, ctypes.byref(one),
                first, p.ld_first, second, p.ld_second, ctypes.byref(zero), out.data.ptr, p.ldc,
            )  # fmt: skip
        else:
            status = getattr(self.lib, f"cublas{prefix}gemmStridedBatched")(
                self.handle, p.op_first, p.op_second, p.m, p.n, p.k, ctypes.byref(one),
                first, p.ld_first, p.stride_first, second, p.ld_second, p.stride_second,
                ctypes.byref(zero), out.data.ptr, p.ldc, p.stride_c, p.batch,
            )  # fmt: skip
        _check(status, f"cublas{prefix}gemm")
        return out


@contextlib.contextmanager
def capturing(blas: Cublas) -> Iterator[None]:
    """While inside, :func:`matmul` calls ``blas`` (a capture is running)."""
    global _capturing
    before, _capturing = _capturing, blas
    try:
        yield
    finally:
        _capturing = before


def matmul(a: Any, b: Any, out: Any = None) -> Any:
    """a @ b into ``out`` for CuPy arrays: cuBLAS directly while a graph is captured
    (where CuPy refuses), else ``cupy.matmul``."""
    import cupy

    if _capturing is not None:
        done = _capturing.matmul(a, b, out)
        if done is not None:
            return done
    return cupy.matmul(a, b, out=out)


# -- graphs -------------------------------------------------------------------------------


class CudaGraphs:
    """Run, capture and launch passes on CuPy (what :class:`handprop.scale.graphs.
    TrainingStep` asks of a graph backend).

    Everything of a graph runs on one side stream (a capture cannot run on the legacy
    default stream), ordered after and before the work of the current stream by events;
    graphs are launched on the current stream, in order with the eager kernels around.
    """

    def __init__(self) -> None:
        import cupy

        self.cupy = cupy
        self.stream = cupy.cuda.Stream(non_blocking=True)
        self._blas: Cublas | None = None

    def describe(self) -> str:
        return f"CuPy {self.cupy.__version__} CUDA graphs"

    def new_pool(self) -> Any:
        """A memory pool of a graph's own."""
        return self.cupy.cuda.MemoryPool()

    @contextlib.contextmanager
    def _on_side_stream(self, pool: Any) -> Iterator[None]:
        cp = self.cupy
        main = cp.cuda.get_current_stream()
        self.stream.wait_event(main.record())  # after what is queued already
        try:
            with self.stream, cp.cuda.using_allocator(pool.malloc):
                yield
        finally:
            main.wait_event(self.stream.record())  # before what comes next

    def run(self, fn: Callable[[], T], pool: Any) -> T:
        """``fn()`` eagerly where its capture will run: the side stream, ``pool``."""
        with self._on_side_stream(pool):
            return fn()

    def capture(self, fn: Callable[[], T], pool: Any) -> tuple[Any, T]:
        """(graph, what ``fn`` returned) with every kernel of ``fn()`` captured, none
        run; an exception ends the capture and is raised."""
        if self._blas is None:
            self._blas = Cublas()
        self._blas.bind(self.stream.ptr)
        with self._on_side_stream(pool):
            try:
                self.stream.begin_capture(mode=CAPTURE_MODE_RELAXED)
            except TypeError:  # a CuPy whose begin_capture takes no mode
                self.stream.begin_capture()
            try:
                with capturing(self._blas):
                    result = fn()
            except BaseException:
                with contextlib.suppress(Exception):
                    self.stream.end_capture()
                raise
            graph = self.stream.end_capture()
        return graph, result

    def launch(self, graph: Any) -> None:
        graph.launch(stream=self.cupy.cuda.get_current_stream())

    def synchronize(self) -> None:
        self.cupy.cuda.get_current_stream().synchronize()
