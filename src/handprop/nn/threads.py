"""Elementwise passes on several cores.

BLAS runs the matrix products on every core, but a NumPy ufunc runs on one; on 2 cores
the sigmoid, its derivative and the softmax of a full-batch epoch would take as long as
a third of its matrix products. NumPy releases the GIL inside ufunc loops, so splitting
the rows of a large array between threads runs them truly side by side.

The thread count defaults to the number of cores this process may use;
:func:`set_threads` (or the ``HANDPROP_THREADS`` variable) lowers it, as experiment
grids do for runs side by side, so that cores are never oversubscribed.
"""

from __future__ import annotations

import itertools
import os
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

import numpy as np

#: below this many elements a pass stays on one thread (dispatch costs ~50 us)
MIN_PARALLEL = 200_000

_threads = 0
_pool: ThreadPoolExecutor | None = None


def _default_threads() -> int:
    env = os.environ.get("HANDPROP_THREADS", "").strip()
    if env.isdigit() and int(env) > 0:
        return int(env)
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover - not on Linux
        return os.cpu_count() or 1


def set_threads(n: int | None) -> None:
    """Use ``n`` threads for elementwise passes (None: the default)."""
    global _threads, _pool
    n = _default_threads() if n is None else max(1, int(n))
    if n != _threads:
        if _pool is not None:
            _pool.shutdown(wait=True)
        _pool = ThreadPoolExecutor(n, thread_name_prefix="handprop") if n > 1 else None
        _threads = n


def get_threads() -> int:
    if not _threads:
        set_threads(None)
    return _threads


def rowwise(fn: Callable[..., None], *arrays: np.ndarray) -> None:
    """Call ``fn(*chunks)`` on matching row blocks of ``arrays``, on several threads.

    ``fn`` must treat rows independently and write its results into its arguments
    (``out=``); all arrays share their first dimension.
    """
    n = arrays[0].shape[0]
    threads = get_threads()
    if threads == 1 or arrays[0].size < MIN_PARALLEL or n < threads:
        fn(*arrays)
        return
    bounds = np.linspace(0, n, threads + 1).astype(int)
    futures = [
        _pool.submit(fn, *(a[lo:hi] for a in arrays)) for lo, hi in itertools.pairwise(bounds)
    ]
    for f in futures:
        f.result()
