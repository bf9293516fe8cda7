"""Array namespaces, and the NumPy fast paths: the one module that knows backends apart.

The layers are written once against the Python array API standard: ``xp`` is the
namespace of the network's arrays (NumPy by default, CuPy on a GPU, any conforming
library such as array-api-strict in the tests), and the formulas call ``xp.tanh``,
``xp.sum``, ``@``... whatever the backend.

What makes NumPy's epoch sit near the GEMM floor is writing results into arrays that
already exist (``out=``): no fresh multi-megabyte array, no page faults, per pass. The
standard has no ``out=``; the few calls that need one go through the functions below,
which pass ``out`` on to NumPy and CuPy (whose functions take it) and otherwise compute
the result and copy it into ``out``: the same numbers, one copy slower. An ``out`` that
is a view into the flat gradient vector is therefore always written, on every backend.

Devices: ``"cpu"`` is NumPy; ``"cuda"`` is CuPy (``pip install 'handprop[gpu]'``),
checked with a real allocation before anything else happens (CuPy imports on a machine
without a GPU and fails on first use). Model files, checkpoints and predictions are
always written from host (NumPy) arrays: :func:`to_host`.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np

from handprop.errors import HandpropError

#: the devices a config or ``--device`` may name
DEVICES = ("cpu", "cuda")


class DeviceError(HandpropError):
    """The device asked for cannot be used here (no GPU, no CuPy)."""


def namespace(*arrays: Any) -> Any:
    """The array namespace of ``arrays``: NumPy itself for NumPy arrays (no wrapper on the
    fast path), else the standard namespace ``array_api_compat`` finds for them."""
    if all(isinstance(a, np.ndarray | np.generic) for a in arrays):
        return np
    import array_api_compat

    return array_api_compat.array_namespace(*arrays)


def is_numpy(xp: Any) -> bool:
    return xp is np


def _native(a: Any) -> Any:
    """The library whose functions take ``out=`` for ``a`` (NumPy, CuPy), else None."""
    if isinstance(a, np.ndarray):
        return np
    if type(a).__module__.startswith("cupy"):
        import cupy

        return cupy
    return None


def _into(out: Any, result: Any) -> Any:
    """``result`` written into ``out`` (when given), which is returned."""
    if out is None:
        return result
    out[...] = result
    return out


# -- calls with out= ------------------------------------------------------------------
# Each computes like the standard's function of the same name and, given ``out``,
# writes the result there and returns ``out``.


def _elementwise(name: str, generic: Callable[..., Any]) -> Callable[..., Any]:
    """The function ``name`` with ``out=``: NumPy's or CuPy's own when the output (or
    the first array) is theirs, else ``generic(*args)`` copied into ``out``."""

    def fn(*args: Any, out: Any = None) -> Any:
        lib = _native(out if out is not None else args[0])
        if lib is not None:
            return getattr(lib, name)(*args, out=out)
        return _into(out, generic(*args))

    fn.__name__ = fn.__qualname__ = name
    fn.__doc__ = f"``{name}`` of the standard, written into ``out`` when given."
    return fn


def _no_bool(a: Any, like: Any) -> Any:
    """A boolean array ``a`` cast to the float dtype of ``like`` (the standard does not
    promote bool to float), anything else as it is."""
    if not hasattr(a, "dtype"):
        return a
    xp = namespace(a)
    return xp.astype(a, like.dtype) if a.dtype == xp.bool else a


def _generic_maximum(a: Any, b: Any) -> Any:
    xp = namespace(a)
    return xp.maximum(a, b if hasattr(b, "shape") else xp.asarray(b, dtype=a.dtype))


def _unary(name: str) -> Callable[[Any], Any]:
    return lambda a: getattr(namespace(a), name)(a)


def matmul(a: Any, b: Any, out: Any = None) -> Any:
    """a @ b, written into ``out`` when given. CuPy's goes through
    :func:`handprop.nn.cuda.matmul`, which calls cuBLAS itself while a CUDA graph is
    captured (CuPy refuses to then)."""
    if isinstance(out if out is not None else a, np.ndarray):
        return np.matmul(a, b, out=out)
    if _native(out if out is not None else a) is not None:
        from handprop.nn import cuda

        return cuda.matmul(a, b, out)
    return _into(out, a @ b)


_multiply = _elementwise("multiply", lambda a, b: a * b)


def multiply(a: Any, b: Any, out: Any = None) -> Any:
    """a * b into ``out``; a boolean mask times floats (dropout, ReLU) gives floats."""
    if _native(out if out is not None else a) is None:
        floats = [x for x in (out, a, b) if hasattr(x, "dtype") and x.dtype != namespace(x).bool]
        if floats:
            a, b = _no_bool(a, floats[0]), _no_bool(b, floats[0])
    return _multiply(a, b, out=out)


divide = _elementwise("divide", lambda a, b: a / b)
add = _elementwise("add", lambda a, b: a + b)
subtract = _elementwise("subtract", lambda a, b: a - b)
maximum = _elementwise("maximum", _generic_maximum)
greater = _elementwise("greater", lambda a, b: a > b)
equal = _elementwise("equal", lambda a, b: a == b)
tanh = _elementwise("tanh", _unary("tanh"))
exp = _elementwise("exp", _unary("exp"))
sqrt = _elementwise("sqrt", _unary("sqrt"))


def constant(xp: Any, value: Any, dtype: Any) -> Any:
    """A 0-d array of ``value`` and ``dtype`` in namespace ``xp``, made once and kept: a
    training step asks for the same few again and again, and on a GPU each new one is
    a copy from the host (which a CUDA graph could not replay)."""
    key = (id(xp), value, str(dtype))
    found = _constants.get(key)
    if found is None:
        found = _constants[key] = xp.asarray(value, dtype=dtype)
    return found


_constants: dict[tuple[Any, Any, str], Any] = {}


def sum(a: Any, axis: Any = None, out: Any = None) -> Any:
    lib = _native(a)
    on_gpu = lib is not None and lib is not np
    if on_gpu and axis == 0 and a.ndim == 2 and (out is None or out.flags.c_contiguous):
        return _column_sums(a, out)
    if lib is not None:
        return lib.sum(a, axis=axis, out=out)
    return _into(out, namespace(a).sum(a, axis=axis))


def _column_sums(a: Any, out: Any) -> Any:
    """The sums of the columns of a 2-D CuPy array, as the product ones(1, n) @ a.

    CuPy reduces along the first, strided axis slowly: the seed network's bias
    gradient, sum_rows G of 18000 x 100, took 190 us per call on an H200, over half of
    the epoch's GPU time, where PyTorch's reduction takes 16; a GEMM with a row of ones
    (kept, one per row count and dtype) is one fast cuBLAS call, also inside a CUDA
    graph."""
    key = ("ones", a.shape[0], str(a.dtype))
    ones = _constants.get(key)
    if ones is None:
        ones = _constants[key] = namespace(a).ones((1, a.shape[0]), dtype=a.dtype)
    if out is None:
        return matmul(ones, a)[0]
    matmul(ones, a, out=out.reshape(1, -1))
    return out


def copy(a: Any) -> Any:
    """A new C-ordered array equal to ``a`` (whose own layout may be a transposed one)."""
    if _native(a) is not None:
        return a.copy()
    return namespace(a).asarray(a, copy=True)


def copyto(dst: Any, src: Any) -> None:
    """dst[...] = src (NumPy and CuPy: ``copyto``, which skips the indexing machinery)."""
    lib = _native(dst)
    if lib is not None:
        lib.copyto(dst, src)
    else:
        dst[...] = src


# -- the true class of each column ---------------------------------------------------
# Losses work on (k, n) arrays, one column per sample; y (n,) holds each column's class.
# Where the labels sit is found once per loss (:func:`label_positions`) and used twice.


def label_positions(S: Any, y: Any) -> Any:
    """Where the entries S[y_j, j] are: NumPy's index arrays (y, 0..n-1), which gather
    and scatter in one pass each; elsewhere a (k, n) boolean mask, since a GPU's
    integer-array indexing launches several kernels per gather or scatter (CuPy: 0.25
    ms for both on an H200, the mask's compare, sum and subtract 0.13 ms)."""
    if isinstance(S, np.ndarray):
        return y, _columns(np, S.shape[1])
    xp = namespace(S)
    return _columns(xp, S.shape[0])[:, None] == y[None, :]


def _columns(lib: Any, n: int) -> Any:
    """0, 1, ..., n - 1 as an index array of ``lib`` (kept for the next call of that n:
    a training loop asks for the same n every step)."""
    key = (lib.__name__, n)
    cols = _columns_cache.get(key)
    if cols is None:
        cols = _columns_cache[key] = lib.arange(n)
    return cols


_columns_cache: dict[tuple[str, int], Any] = {}


def take_labels(S: Any, at: Any) -> Any:
    """(n,) the entries S[y_j, j], at :func:`label_positions`."""
    if isinstance(at, tuple):
        return S[at]
    xp = namespace(S)
    return xp.sum(xp.where(at, S, 0.0), axis=0)  # one nonzero term per column: exact


def add_at_labels(S: Any, at: Any, value: float) -> None:
    """S[y_j, j] += value for every column j, in place, at :func:`label_positions`."""
    if isinstance(at, tuple):
        S[at] += value
    else:
        S += namespace(S).astype(at, S.dtype) * value


def sum_of_squares(a: Any) -> Any:
    """sum a^2, accumulated in float64 (a :func:`scalar`)."""
    if isinstance(a, np.ndarray):
        return float(np.einsum("ij,ij->", a, a, dtype=np.float64))  # no temporary a * a
    xp = namespace(a)
    return scalar(xp.sum(a * a, dtype=xp.float64))


def position_dots(A: Any, B: Any) -> Any:
    """(c, n) the sums over positions s of A[c, s, n] B[c, s, n], for (c, s, n) arrays,
    in their dtype (a batchnorm's per-sample dot products over an image batch).

    NumPy's einsum multiplies and adds in one pass with no (c, s, n) product array;
    other namespaces multiply, then sum."""
    if isinstance(A, np.ndarray) and isinstance(B, np.ndarray):
        return np.einsum("csn,csn->cn", A, B)
    return namespace(A, B).sum(A * B, axis=1)


def scalar(a: Any) -> Any:
    """A 0-d result (a loss): a Python float from NumPy; on a device the 0-d array
    itself, since converting it makes the host wait for the device. A training loop
    adds a device's losses up there and reads them once per epoch."""
    return float(a) if isinstance(a, np.ndarray | np.generic) else a


# -- moving arrays ---------------------------------------------------------------------


def to_host(a: Any) -> np.ndarray:
    """``a`` as a NumPy array (a copy from a GPU; NumPy arrays as they are)."""
    if isinstance(a, np.ndarray):
        return a
    if hasattr(a, "get") and type(a).__module__.startswith("cupy"):
        return a.get()
    return np.asarray(a)


def asarray(a: Any, xp: Any, dtype: Any = None) -> Any:
    """``a`` (a NumPy array, usually) as an array of namespace ``xp``."""
    if xp is np:
        return np.asarray(a, dtype=dtype)
    return xp.asarray(a, dtype=dtype)


def host_dtype(dtype: Any) -> np.dtype:
    """The NumPy dtype of any namespace's dtype (CuPy's are NumPy's already)."""
    try:
        return np.dtype(dtype)
    except TypeError:  # array-api-strict and others: their own dtype objects
        return np.dtype(str(dtype).rsplit(".", 1)[-1])


def dtype_of(xp: Any, dtype: Any) -> Any:
    """The namespace's dtype for a NumPy dtype or name ("float32", np.uint8, bool)."""
    name = np.dtype(dtype).name
    return getattr(xp, name)


# -- devices ---------------------------------------------------------------------------

_checked: dict[str, Any] = {}


def device_namespace(device: str) -> Any:
    """The array namespace that computes on ``device`` ("cpu" or "cuda").

    "cuda" imports CuPy and makes one real allocation and kernel launch; a machine with
    no usable GPU, or no CuPy, is one :class:`DeviceError` line, raised before a run
    writes anything.
    """
    if device == "cpu":
        return np
    if device != "cuda":
        raise DeviceError(f"device must be one of {', '.join(DEVICES)}, got {device!r}")
    if device in _checked:
        return _checked[device]
    try:
        import cupy
    except ImportError:
        raise DeviceError(
            "device = 'cuda' needs CuPy, which is not installed: "
            "pip install 'handprop[gpu]' (CUDA 12; see the README for CUDA 13 and ROCm)"
        ) from None
    try:
        probe = cupy.arange(4, dtype=cupy.float32)
        float((probe * probe).sum())  # an allocation, a kernel and a copy back
    except Exception as exc:  # CuPy raises CUDA runtime/driver errors of several types
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise DeviceError(f"device = 'cuda': no usable GPU here ({first})") from None
    import array_api_compat

    xp = array_api_compat.array_namespace(probe)
    _checked[device] = xp
    return xp


def device_name(xp: Any) -> str:
    """ "cpu" for NumPy, "cuda" for CuPy, the module's name for any other namespace."""
    if xp is np:
        return "cpu"
    name = getattr(xp, "__name__", str(xp))
    return "cuda" if "cupy" in name else name
