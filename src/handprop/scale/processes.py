"""Worker processes for the shards of a convolutional network's training batch.

Why processes
-------------
:class:`~handprop.scale.DataParallel` splits a training batch into shards, one per core.
On threads, every NumPy call of a shard hands Python's lock back when it returns, and a
small CNN's step is about a hundred short calls per shard: the threads wait on each
other there (fast99.toml's epoch: 1.4 times faster on two threads than on one, 1.9
times over two MPI ranks, which share no lock). So the shards of a convolutional
network's *training* passes run in processes that this one starts and owns: shard 0
stays here, shards 1..k-1 each have a worker process. Inference and dense networks
keep the threads (few, long calls: the lock costs them little).

One step
--------
1. this process writes the parameter vector and each worker's rows of the batch into
   memory the workers share (mapped by all of them and named by no path, so that
   nothing is left behind however the processes end);
2. it sends each worker its step: labels, the batch's row count, where its rows start,
   the batch's dropout keys (so every shard draws its rows of the same masks);
3. every shard runs forward, loss and backward over its rows; a batchnorm layer's
   per-channel sums travel to this process, which adds them in shard order (as the
   threads do) and over the MPI ranks, and sends the totals back (:class:`Relay`);
4. each worker's backward writes its gradient vector into the shared memory, and it
   sends its loss and output rows; :class:`~handprop.scale.DataParallel` sums the
   gradients in shard order, as it sums the threads'. The numbers are the threads'.

The workers start when the first batch is split, or when a run is built
(:meth:`~handprop.scale.DataParallel.prepare`: about 0.15 s, not counted as training,
as an MPI job's start is not). Between two messages a process first watches its socket
for a few milliseconds, then sleeps on it.

Faults
------
Nothing waits forever on a process that is gone: a worker's error is sent back and
raised here (its own exception); a worker that dies is the end of its socket here (one
line naming its exit status); this process's end, or :meth:`Workers.close`, is the end
of the socket there, and the worker exits. Workers ignore Ctrl-C, SIGTERM and SIGHUP:
this process stops the run (after a step, as it does alone) and then closes them. A
worker that cannot start (no interpreter to run, an import that fails) leaves the
shards to the threads, with one warning naming the reason.

``HANDPROP_WORKERS=threads`` keeps every shard on threads.
"""

from __future__ import annotations

import contextlib
import mmap
import os
import pickle
import signal
import socket
import subprocess
import sys
import tempfile
import time
import traceback
import weakref
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

import numpy as np

from handprop.errors import ConfigError, HandpropError
from handprop.nn.batchnorm import BatchNorm, BatchSums
from handprop.nn.layers import Array
from handprop.nn.network import Network

#: what ``HANDPROP_WORKERS`` may say: where the shards of a CNN's training batch run
WORKER_KINDS = ("processes", "threads")

#: seconds a closed worker has to exit before it is killed
EXIT_SECONDS = 5.0

#: seconds a process watches for the next message before it sleeps until one comes
SPIN_SECONDS = 0.005

#: seconds a new worker has to import handprop and build its network (about 0.15 s)
START_SECONDS = 60.0

_ALIGN = 64  # byte alignment of each array in the shared memory


def worker_kind() -> str:
    """Where the shards of a convolutional network's training batch run:
    ``HANDPROP_WORKERS`` (processes by default).

    Raises
    ------
    ConfigError
        ``HANDPROP_WORKERS`` says neither processes nor threads.
    """
    kind = os.environ.get("HANDPROP_WORKERS", "").strip() or "processes"
    if kind not in WORKER_KINDS:
        raise ConfigError(
            f"HANDPROP_WORKERS must be one of {', '.join(WORKER_KINDS)}, got {kind!r}"
        )
    return kind


class WorkerExitError(HandpropError):
    """A worker process ended in the middle of a step."""


class WorkerStartError(HandpropError):
    """Worker processes cannot be started for this network."""


def _import_path() -> str:
    """Python that makes a worker import this handprop: nothing when this process found
    it on the interpreter's own path (the worker will too), else its folder first."""
    root = Path(__file__).resolve().parents[2]
    if any(entry and Path(entry).resolve() == root for entry in sys.path):
        return ""
    return f"import sys; sys.path.insert(0, {str(root)!r}); "


def _layout(sizes: list[tuple[str, int]]) -> tuple[dict[str, tuple[int, int]], int]:
    """Byte offsets of named blocks of ``sizes`` bytes, each aligned; and the total."""
    offsets, at = {}, 0
    for name, size in sizes:
        offsets[name] = (at, size)
        at += -(-size // _ALIGN) * _ALIGN
    return offsets, max(at, _ALIGN)


def _anonymous_memory(size: int) -> int:
    """A file descriptor of ``size`` bytes of memory that no path names: nothing is left
    behind however the processes end (Linux's memfd; elsewhere an unlinked temporary
    file)."""
    if hasattr(os, "memfd_create"):
        fd = os.memfd_create("handprop-workers")
    else:  # pragma: no cover - not on Linux
        with tempfile.TemporaryFile(prefix="handprop-workers-") as file:
            fd = os.dup(file.fileno())
    os.ftruncate(fd, size)
    return fd


def _view(memory: mmap.mmap, where: tuple[int, int], dtype: Any) -> np.ndarray:
    offset, size = where
    dtype = np.dtype(dtype)
    return np.frombuffer(memory, dtype=dtype, count=size // dtype.itemsize, offset=offset)


class Workers:
    """Worker processes for shards 1..``count``-1 of training batches split in
    ``count``, each with room for ``rows`` rows of input like ``X``.

    Parameters
    ----------
    net : Network     the network whose batches they share (its layers, loss and dtype
                      are copied; its parameters are sent at every step)
    count : int       shards per batch, this process's included
    rows : int        the most rows a worker's shard may have
    X : ndarray       a batch of the input the steps will bring (shape and dtype)
    """

    def __init__(self, net: Network, count: int, rows: int, X: np.ndarray) -> None:
        self.count, self.rows = count, rows
        self.sample, self.x_dtype = tuple(X.shape[1:]), X.dtype
        x_bytes = rows * int(np.prod(self.sample, dtype=np.int64)) * X.dtype.itemsize
        g_bytes = net.n_params * net.dtype.itemsize
        blocks = [("params", g_bytes)]
        for k in range(1, count):
            blocks += [(f"grads{k}", g_bytes), (f"X{k}", x_bytes)]
        self.offsets, size = _layout(blocks)
        self._fd = _anonymous_memory(size)
        self.memory = mmap.mmap(self._fd, size)
        self.params = _view(self.memory, self.offsets["params"], net.dtype)
        self.grads = [
            _view(self.memory, self.offsets[f"grads{k}"], net.dtype) for k in range(1, count)
        ]
        self.inputs = [_view(self.memory, self.offsets[f"X{k}"], X.dtype) for k in range(1, count)]
        spec = {  # sent to each worker (pickled: layers of a class it can import)
            "layers": [(type(layer), layer.get_config()) for layer in net.layers],
            "input_shape": net.input_shape,
            "loss": net.loss,
            "dtype": net.dtype,
            "x_dtype": X.dtype,
            "sample": self.sample,
            "offsets": self.offsets,
            "size": size,
        }
        self.procs: list[subprocess.Popen] = []
        self.conns: list[Connection] = []
        self._errors: list[Any] = []
        self._finalizer = weakref.finalize(self, _shut, self.procs, self.conns, self._errors)
        try:
            for k in range(1, count):
                self._start(k, spec)
        except BaseException:
            self.close()
            raise
        finally:
            os.close(self._fd)  # the map keeps the memory; the workers have their own

    def _start(self, k: int, spec: dict[str, Any]) -> None:
        """Worker ``k``: ``python -c`` on :func:`serve`, its socket and the shared memory
        passed as open file descriptors; its stderr kept for a failure's reason."""
        ours, theirs = socket.socketpair()
        errors = tempfile.TemporaryFile(prefix="handprop-worker-stderr-")  # noqa: SIM115
        self._errors.append(errors)
        env = dict(os.environ)
        for name in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS"):
            env[name] = "1"  # one BLAS thread, as a shard runs
        env["HANDPROP_THREADS"] = "1"
        code = (
            f"{_import_path()}from handprop.scale.processes import serve; "
            f"serve({k}, {theirs.fileno()}, {self._fd})"
        )
        try:
            proc = subprocess.Popen(
                [sys.executable, "-c", code],
                pass_fds=(theirs.fileno(), self._fd),
                stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL,
                stderr=errors,
                env=env,
            )
        finally:
            theirs.close()
        self.procs.append(proc)
        conn = Connection(ours.detach())
        self.conns.append(conn)
        try:
            conn.send(spec)
        except OSError:  # it ended already: ready() says why
            pass
        except Exception as exc:  # a layer of the user's own that does not pickle
            raise WorkerStartError(f"its network cannot be sent to a worker ({exc})") from None

    def ready(self) -> str | None:
        """Wait until every worker has built its network: None, or why one could not."""
        for k in range(1, self.count):
            if not self.conns[k - 1].poll(START_SECONDS):
                return f"worker process {k} was not ready within {START_SECONDS:g} s"
            try:
                self.receive(k, "ready")
            except WorkerExitError as exc:
                return str(exc)
            except Exception as exc:  # it could not build the network (memory, ...)
                return f"worker process {k}: {exc}"
        return None

    def _why(self, k: int) -> str:
        """What ended worker ``k``: the last line it wrote, or its exit status."""
        proc = self.procs[k - 1]
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(EXIT_SECONDS)
        errors = self._errors[k - 1]
        errors.seek(0)
        lines = errors.read().decode(errors="replace").strip().splitlines()
        said = f": {lines[-1]}" if lines else ""
        return f"worker process {k} ended (exit status {proc.returncode}){said}"

    def fits(self, count: int, rows: int, X: np.ndarray) -> bool:
        """Whether these workers can take batches split in ``count`` with up to ``rows``
        rows of ``X``'s kind per shard."""
        return (
            count == self.count
            and rows <= self.rows
            and tuple(X.shape[1:]) == self.sample
            and X.dtype == self.x_dtype
        )

    # -- one step ---------------------------------------------------------------------

    def send(
        self,
        params: np.ndarray,
        X: np.ndarray,
        y: Array,
        n: int,
        lo: int,
        split: list[tuple[int, int]],
        keys: dict[int, Any],
    ) -> None:
        """Start shards 1.. of a step: rows ``split[k]`` of (X, y), whose first row is
        row ``lo`` of a batch of ``n``, with the parameters ``params``."""
        np.copyto(self.params, params)
        for k, (a, b) in enumerate(split[1:], start=1):
            np.copyto(
                self.inputs[k - 1][: (b - a) * X[0].size].reshape(b - a, *self.sample), X[a:b]
            )
            self.tell(k, ("step", b - a, n, lo + a, keys, np.asarray(y[a:b])))

    def relay(self, world: Any) -> Relay:
        """The world that shard 0's batchnorm sums go through (:class:`Relay`)."""
        return Relay(self, world)

    def tell(self, k: int, message: tuple[Any, ...]) -> None:
        """Send worker ``k`` ``message``; raises :class:`WorkerExitError` when it is gone."""
        try:
            self.conns[k - 1].send(message)
        except OSError:
            raise WorkerExitError(self._why(k)) from None

    def receive(self, k: int, kind: str) -> Any:
        """Worker ``k``'s next message, which must be ``kind``; raises its error, or
        :class:`WorkerExitError` when it is gone."""
        try:
            message = _recv(self.conns[k - 1])
        except (EOFError, OSError):
            raise WorkerExitError(self._why(k)) from None
        if message[0] == "error":
            raise _unpack(message[1])
        assert message[0] == kind, message[0]
        return message[1:]

    def gather(self, out: np.ndarray, split: list[tuple[int, int]]) -> list[float]:
        """End a step: each worker's loss, its output rows written into ``out``; their
        gradient vectors are then in :attr:`grads`."""
        losses = []
        for k, (a, b) in enumerate(split[1:], start=1):
            loss, out[a:b] = self.receive(k, "done")
            losses.append(loss)
        return losses

    def close(self) -> None:
        """End the workers (they exit when their socket closes)."""
        self._finalizer()


class Relay:
    """Shard 0's world for batchnorm's sums while workers run the other shards: each
    worker's part is added to this process's in shard order, the result is summed over
    ``world`` (the MPI ranks) and sent back to every worker."""

    def __init__(self, workers: Workers, world: Any) -> None:
        self.workers, self.world = workers, world

    def sum(self, array: np.ndarray) -> None:
        for k in range(1, self.workers.count):
            (part,) = self.workers.receive(k, "part")
            array += part
        self.world.sum(array)
        for k in range(1, self.workers.count):
            self.workers.tell(k, ("total", array))


class _ToMain:
    """A worker's world for batchnorm's sums: its part goes to the process that owns
    it, and the whole batch's total comes back."""

    def __init__(self, conn: Connection) -> None:
        self.conn = conn

    def sum(self, array: np.ndarray) -> None:
        self.conn.send(("part", array))
        kind, total = self.conn.recv()
        assert kind == "total", kind
        array[...] = total


def _recv(conn: Connection) -> Any:
    """``conn``'s next message, watched for :data:`SPIN_SECONDS` before sleeping on it:
    a process woken from sleep starts tens of microseconds late, and each step waits
    twice (fast99.toml's epoch: 0.1 s of 5.3 s)."""
    deadline = time.perf_counter() + SPIN_SECONDS
    while not conn.poll(0) and time.perf_counter() < deadline:
        pass
    return conn.recv()


def _shut(procs: list[subprocess.Popen], conns: list[Connection], errors: list[Any]) -> None:
    for conn in conns:
        conn.close()
    for proc in procs:
        try:
            proc.wait(EXIT_SECONDS)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    for file in errors:
        file.close()


def _pack(exc: BaseException) -> bytes:
    """A worker's exception as bytes: itself when it pickles, else a RuntimeError with
    its traceback (a bug's traceback must not be lost)."""
    with contextlib.suppress(Exception):
        data = pickle.dumps(exc)
        pickle.loads(data)
        return data
    text = "".join(traceback.format_exception(exc))
    return pickle.dumps(RuntimeError(f"in a worker process:\n{text}"))


def _unpack(data: bytes) -> BaseException:
    return pickle.loads(data)


def serve(k: int, conn_fd: int, memory_fd: int) -> None:
    """Worker ``k``'s life: build the network the first message describes, then run
    each step sent, until the socket closes."""
    for name in ("SIGINT", "SIGTERM", "SIGHUP"):
        if hasattr(signal, name):
            signal.signal(getattr(signal, name), signal.SIG_IGN)
    conn = Connection(conn_fd)
    try:
        spec = conn.recv()
    except (EOFError, OSError):
        return
    try:
        shard = _Shard(k, spec, memory_fd, conn)
        reply: tuple[Any, ...] = ("ready",)
    except Exception as exc:
        shard, reply = None, ("error", _pack(exc))
    while _reply(conn, reply) and shard is not None:
        try:
            message = _recv(conn)
        except (EOFError, OSError):
            return
        try:
            reply = shard.step(*message[1:])
        except Exception as exc:  # sent back, raised by the process that owns us
            reply = ("error", _pack(exc))


def _reply(conn: Connection, message: tuple[Any, ...]) -> bool:
    """Send ``message``; False when the owner is gone."""
    try:
        conn.send(message)
    except OSError:
        return False
    return True


class _Shard:
    """A worker's shard: a network whose parameters, rows of input and gradient vector
    are in the shared memory."""

    def __init__(self, k: int, spec: dict[str, Any], memory_fd: int, conn: Connection) -> None:
        self.memory = mmap.mmap(memory_fd, spec["size"])
        os.close(memory_fd)
        offsets, dtype = spec["offsets"], spec["dtype"]
        layers = [kind(**config) for kind, config in spec["layers"]]
        params = _view(self.memory, offsets["params"], dtype)
        grads = _view(self.memory, offsets[f"grads{k}"], dtype)  # backward writes there
        self.net = Network(
            layers, spec["input_shape"], spec["loss"], dtype, params=params, grads=grads
        )
        self.inputs = _view(self.memory, offsets[f"X{k}"], spec["x_dtype"])
        self.sample = spec["sample"]
        batchnorm = any(isinstance(layer, BatchNorm) for layer in layers)
        self.sums = BatchSums(1, _ToMain(conn)).hook(0) if batchnorm else None

    def step(
        self, rows: int, n: int, lo: int, keys: dict[int, Any], y: np.ndarray
    ) -> tuple[Any, ...]:
        """Forward, loss and backward over this shard's ``rows`` rows (row ``lo`` on of
        a batch of ``n``): the gradient in the shared memory, loss and output sent back."""
        net = self.net
        X = self.inputs[: rows * int(np.prod(self.sample, dtype=np.int64))]
        ctx = net.context(
            True, masks=net.masks(keys, n, lo), batch_sums=self.sums, update_running=False
        )
        loss, out = net.train_pass(X.reshape(rows, *self.sample), y, count=n, ctx=ctx)
        return ("done", loss, out)


__all__ = [
    "WORKER_KINDS",
    "Relay",
    "WorkerExitError",
    "WorkerStartError",
    "Workers",
    "serve",
    "worker_kind",
]
