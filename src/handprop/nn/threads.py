"""handprop's own threads: a network's batch split into shards, one per core.

A full-batch epoch of 784-100-10 is two large matrix products plus elementwise passes
(sigmoid, softmax, their derivatives, bias sums). BLAS runs the products on every core,
but a NumPy ufunc runs on one, and between two products BLAS's idle workers spin and
keep the other core busy. Splitting the *batch* instead runs everything side by side:
each thread takes a block of rows through the whole network, with BLAS held to one
thread per call, and the shards' parameter gradients are summed at the end. NumPy
releases the GIL inside matrix products and ufunc loops, so the threads truly run at
the same time; but each thread takes the GIL back between two passes, and where a step
is many short passes (a small CNN's: about a hundred per shard) the threads wait on
each other there: fast99.toml's epoch ran 1.4 times faster on two threads than on
one, and 1.9 times faster over two MPI ranks (processes, no shared lock). So a
convolutional network's training shards run in worker processes instead
(:mod:`handprop.scale.processes`); these threads keep the rest.

The thread count defaults to the number of cores this process may use;
:func:`set_threads` (or the ``HANDPROP_THREADS`` variable) lowers it, as experiment
grids do for runs side by side, so that cores are never oversubscribed.
"""

from __future__ import annotations

import contextlib
import itertools
import os
import threading
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any, TypeVar

import numpy as np

from handprop.errors import ConfigError

#: below this many elements an elementwise pass stays on one thread: the hand-off costs
#: more than it saves (Adam's step on 2 cores, caches cold: 212k parameters, 0.57 ms on
#: one thread, 0.75 ms on two; 400k, 1.34 and 1.06 ms; 1.6M, 5.6 and 3.4 ms)
MIN_PARALLEL = 300_000

T = TypeVar("T")

_threads = 0
_pool: ThreadPoolExecutor | None = None
_local = threading.local()  # .inline: this thread already runs one shard
_blas: list[Any] | None = None  # threadpoolctl's BLAS library controllers, found on first use


def _default_threads() -> int:
    env = os.environ.get("HANDPROP_THREADS", "").strip()
    if env:
        if not env.isdigit() or int(env) < 1:
            raise ConfigError(f"HANDPROP_THREADS must be a whole number >= 1, got {env!r}")
        return int(env)
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover - not on Linux
        return os.cpu_count() or 1


def set_threads(n: int | None) -> None:
    """Use ``n`` threads for shards and elementwise passes (None: the default)."""
    global _threads, _pool
    n = _default_threads() if n is None else max(1, int(n))
    if n != _threads:
        if _pool is not None:
            _pool.shutdown(wait=True)
        _pool = ThreadPoolExecutor(n - 1, thread_name_prefix="handprop") if n > 1 else None
        _threads = n


def get_threads() -> int:
    """Threads handprop uses here: 1 inside a shard (the work is split already)."""
    if getattr(_local, "inline", False):
        return 1
    if not _threads:
        set_threads(None)
    return _threads


def bounds(n: int, parts: int) -> list[tuple[int, int]]:
    """``parts`` row ranges covering [0, n) whose lengths differ by at most one."""
    edges = np.linspace(0, n, parts + 1).astype(int)
    return list(itertools.pairwise(edges.tolist()))


def as_shard(fn: Callable[..., T], *args: Any) -> T:
    """``fn(*args)`` with this thread marked as running a shard: its elementwise
    passes stay on this thread."""
    before = getattr(_local, "inline", False)
    _local.inline = True
    try:
        return fn(*args)
    finally:
        _local.inline = before


def side_by_side(fn: Callable[..., T], arg_lists: Sequence[Sequence[Any]]) -> list[T]:
    """``[fn(*args) for args in arg_lists]``, one call per thread, the first on this one.

    There must be at most :func:`get_threads` calls. Inside them the elementwise passes
    stay on their thread; an exception in any call is raised here once all have ended.
    """
    if len(arg_lists) == 1:
        return [fn(*arg_lists[0])]
    assert _pool is not None and len(arg_lists) <= _threads
    futures = [_pool.submit(as_shard, fn, *args) for args in arg_lists[1:]]
    try:
        first = as_shard(fn, *arg_lists[0])
    finally:
        rest = [f.exception() for f in futures]  # waits for every call to end
    for exc in rest:
        if exc is not None:
            raise exc
    return [first, *(f.result() for f in futures)]


@contextlib.contextmanager
def single_blas() -> Iterator[None]:
    """Hold BLAS to one thread per call while handprop's own threads share the cores.

    It sets the loaded BLAS libraries' thread counts directly (threadpoolctl's library
    controllers, found once) and restores them after: about 1 us, where a
    ``threadpool_limits`` context costs 15 us, which a mini-batch step of 0.3 ms
    would feel."""
    global _blas
    if _blas is None:
        from threadpoolctl import ThreadpoolController

        _blas = list(ThreadpoolController().select(user_api="blas").lib_controllers)
    before = [lib.get_num_threads() for lib in _blas]
    for lib, n in zip(_blas, before, strict=True):
        if n != 1:
            lib.set_num_threads(1)
    try:
        yield
    finally:
        for lib, n in zip(_blas, before, strict=True):
            if n != 1:
                lib.set_num_threads(n)


def rowwise(fn: Callable[..., None], *arrays: np.ndarray) -> None:
    """Call ``fn(*chunks)`` on matching row blocks of ``arrays``, on several threads.

    ``fn`` must treat rows independently and write its results into its arguments
    (``out=``); all arrays share their first dimension. Inside a shard it runs on
    the shard's own thread.
    """
    n = arrays[0].shape[0]
    threads = get_threads()
    on_device = not isinstance(arrays[0], np.ndarray)  # a GPU runs its own threads
    if on_device or threads == 1 or arrays[0].size < MIN_PARALLEL or n < threads:
        fn(*arrays)
        return
    side_by_side(fn, [[a[lo:hi] for a in arrays] for lo, hi in bounds(n, threads)])
