"""Data parallelism around a plain :class:`~handprop.nn.Network`.

One batch, many workers, the same numbers as one worker:

1. **rows**: the batch's rows [0, n) are cut into near-equal blocks: one per MPI rank
   (``world``), then this rank's block into one per thread (when the block has work
   enough to gain, see ``MIN_SHARD_MACS``); a convolutional network's training shards
   1.. run in worker processes of this rank's own (:mod:`handprop.scale.processes`:
   Python's lock would keep its threads waiting), shard 0 on this thread;
2. **random streams**: the network draws one key per dropout layer and batch from its
   generator, the same on every worker, and each worker's pass carries its rows of the
   batch (:class:`~handprop.nn.passes.Masks`), of which each dropout layer draws its
   rows of the mask (:func:`~handprop.nn.layers.keep_mask`), so a run does not depend
   on the number of threads or ranks;
3. each worker runs forward, loss and backward over its rows, dividing the loss by the
   whole batch's n, into a flat gradient vector of its own (a thread's shard is a copy
   of the layers that shares the parameter vector), with batchnorm's statistics summed
   over the whole batch (:class:`~handprop.nn.batchnorm.BatchSums`);
4. **reduce**: the flat gradient vectors are summed, in process over the threads or
   worker processes (``np.add``, in shard order), then over the ranks by one in-place
   Allreduce of ``grads``; the loss rides in a second, one-number reduce.

Every rank then holds the whole batch's gradient in ``grads`` and steps its optimizer
identically. Threads, worker processes and ranks are one mechanism: shards of rows,
and sums. The MPI side lives in :mod:`handprop.scale.mpi` (which gives ``world``), the
worker processes in :mod:`handprop.scale.processes`; this module needs only NumPy.
"""

from __future__ import annotations

import contextlib
import logging
import signal
from collections.abc import Callable
from typing import Protocol, TypeVar

import numpy as np

from handprop.errors import Interrupted
from handprop.nn import backend
from handprop.nn.batchnorm import BatchNorm, BatchSums
from handprop.nn.conv import Conv2D
from handprop.nn.layers import Array
from handprop.nn.network import Network
from handprop.nn.passes import Workspace
from handprop.nn.threads import as_shard, bounds, get_threads, side_by_side, single_blas
from handprop.scale.processes import Workers, WorkerStartError, worker_kind

T = TypeVar("T")
log = logging.getLogger(__name__)

#: a batch is split over threads when each shard's forward pass has at least this many
#: multiply-adds (below it the hand-off between threads costs more than it saves) ...
MIN_SHARD_MACS = 20_000_000
#: ... and, in training, this many per parameter: every shard writes a whole gradient
#: vector and they are summed. A dense net's products already run on BLAS's threads, so
#: the split gains little and the sum costs as much (784-800-800-10 on 2 cores: batch 128,
#: 64 per parameter, 3% slower split; batch 512, 255, 2% faster; 784-100-10, batch 1024,
#: 511, 1.8x slower), while a full batch (9000 per parameter) gains ...
MIN_SHARD_MACS_PER_PARAM = 600
#: ... but a network with convolutions gains far below that: im2col, col2im and pooling
#: run on one core unless the batch is split (cnn.toml's network with dense 128 / 512 /
#: 1024 / 2048, batch 128, Adam: 765 / 251 / 158 / 111 per parameter, split/whole time
#: 0.71 / 0.73 / 0.77 / 0.83)
MIN_CONV_SHARD_MACS_PER_PARAM = 100
#: a pass that is not split and has fewer multiply-adds than this per thread runs its
#: products on one BLAS thread: OpenBLAS splits even a 128 x 784 x 100 product over its
#: threads, whose hand-offs cost more than they save, and on a loaded machine a worker
#: that waits for a core stalls every product (784-100-10 mini-batch epoch, batch 128,
#: 2 busy cores: 120-1720 ms with two BLAS threads, 150-260 ms with one)
MIN_BLAS_THREAD_MACS = MIN_SHARD_MACS


class World(Protocol):
    """The processes that share a batch: this one is ``rank`` of ``size``.

    ``stop_signal`` is nonzero once this rank was asked to stop (Ctrl-C, SIGTERM): it
    rides along each training step's reduce, so that every rank stops after the same
    step (a rank that stopped alone would leave the others waiting in an Allreduce).
    """

    rank: int
    size: int
    stop_signal: int

    def sum(self, array: np.ndarray) -> None:
        """Replace ``array`` by its sum over every rank (in place; an Allreduce)."""

    def broadcast(self, value: T) -> T:
        """Rank 0's ``value`` (any picklable object), returned on every rank."""


class OneProcess:
    """The world of a process that trains alone: nothing to reduce."""

    rank = 0
    size = 1
    stop_signal = 0

    def sum(self, array: np.ndarray) -> None:
        return None

    def broadcast(self, value: T) -> T:
        return value


class DataParallel:
    """``net``'s training and inference passes with each batch split over workers.

    Parameters
    ----------
    net : Network        the network; its ``params`` are shared by every thread's shard
    world : World, optional
        the MPI ranks sharing each batch (:func:`handprop.scale.mpi.world`); by
        default this process alone

    ``params``, ``grads``, ``n_params``, ``check_input`` and ``check_labels`` are the
    network's, so optimizers and :func:`~handprop.nn.gradcheck` take either.
    """

    def __init__(self, net: Network, world: World | None = None) -> None:
        self.net = net
        self.world: World = world or OneProcess()
        self._shards: list[Network] = []  # one per thread, made when first needed
        self._two = np.zeros(2, dtype=np.float64)  # the loss and the stop flag, reduced
        self._convolutional = any(isinstance(layer, Conv2D) for layer in net.layers)
        self._batchnorm = any(isinstance(layer, BatchNorm) for layer in net.layers)
        # worker processes for a CNN's training shards (:mod:`handprop.scale.processes`):
        # started when first needed; False once they could not start (threads instead)
        self._workers: Workers | bool | None = None
        if self._convolutional:
            worker_kind()  # a HANDPROP_WORKERS that names neither is refused now

    # -- what optimizers and gradient checks see: the network's ------------------------

    @property
    def params(self) -> Array:
        return self.net.params

    @property
    def grads(self) -> Array:
        return self.net.grads

    @property
    def xp(self):
        return self.net.xp

    @property
    def n_params(self) -> int:
        return self.net.n_params

    def check_input(self, X: Array) -> Array:
        return self.net.check_input(X)

    def check_labels(self, y: Array, n: int) -> Array:
        return self.net.check_labels(y, n)

    # -- rows -------------------------------------------------------------------------

    def rows(self, n: int) -> tuple[int, int]:
        """This rank's block [lo, hi) of a batch of ``n`` rows."""
        if self.world.size == 1:
            return 0, n
        return bounds(n, self.world.size)[self.world.rank]

    def split(self, n: int, training: bool = False) -> list[tuple[int, int]] | None:
        """Thread blocks of ``n`` rows, one per thread, or None to run them whole: on
        one thread, or when a shard would have too little work to gain, or on a device
        (a GPU runs its own threads)."""
        if self.net.xp is not np:
            return None
        threads = get_threads()
        per_shard = n * self.net.macs // threads
        if threads < 2 or n < 2 * threads or per_shard < MIN_SHARD_MACS:
            return None
        per_param = (
            MIN_CONV_SHARD_MACS_PER_PARAM if self._convolutional else MIN_SHARD_MACS_PER_PARAM
        )
        if training and per_shard < per_param * self.net.n_params:
            return None
        return bounds(n, threads)

    def _blas_for(self, n: int) -> contextlib.AbstractContextManager[None]:
        """One BLAS thread for an unsplit pass of ``n`` rows too small to share
        (:data:`MIN_BLAS_THREAD_MACS`); else BLAS as it is."""
        threads = get_threads()
        on_host = self.net.xp is np
        if on_host and threads > 1 and n * self.net.macs // threads < MIN_BLAS_THREAD_MACS:
            return single_blas()
        return contextlib.nullcontext()

    def shards(self, count: int) -> list[Network]:
        """``count`` copies of the network's layers that share its parameter vector;
        each keeps its own gradient vector and work arrays."""
        net = self.net
        while len(self._shards) < count:
            layers = [type(layer)(**layer.get_config()) for layer in net.layers]
            self._shards.append(
                Network(layers, net.input_shape, net.loss, net.dtype, params=net.params)
            )
        return self._shards[:count]

    def check_memory(self, batch: int, state_vectors: int = 0) -> None:
        """:meth:`Network.check_memory` for training on batches of ``batch`` rows: this
        rank's rows, and a gradient vector per thread shard."""
        lo, hi = self.rows(batch)
        split = self.split(hi - lo, training=True)
        extra = 0 if split is None else len(split)
        self.net.check_memory(hi - lo, training=True, state_vectors=state_vectors + extra)

    # -- training ---------------------------------------------------------------------

    def train_pass(
        self,
        X: Array,
        y: Array,
        keys: dict[int, int | Array] | None = None,
        work: Workspace | None = None,
    ) -> tuple[float, Array]:
        """Forward (training), loss and backward over the whole batch (X, y), every
        worker on its rows; fills ``grads`` with the batch's gradient on every rank.

        ``keys``: the batch's dropout masks (:meth:`Network.dropout_keys`), when the
        caller has drawn them; by default drawn here. ``work``: the work arrays of an
        unsplit pass, when not the network's own. (A CUDA graph's step gives both:
        :mod:`handprop.scale.graphs`.) Returns the batch's loss and the network's
        output for this rank's rows (:meth:`rows`; all of them in a process that trains
        alone).
        """
        n = X.shape[0]
        lo, hi = self.rows(n)
        if keys is None:  # the batch's masks, the same on every worker
            keys = self.net.dropout_keys()
        split = self.split(hi - lo, training=True)
        if split is None:
            sums = self._batch_sums(1)  # batchnorm: the whole batch's, over the ranks
            ctx = self.net.context(
                True,
                masks=self.net.masks(keys, n, lo),
                batch_sums=None if sums is None else sums.hook(0),
                work=self.net.work if work is None else work,
            )
            with self._blas_for(hi - lo):
                loss, out = self.net.train_pass(X[lo:hi, ...], y[lo:hi], count=n, ctx=ctx)
        else:
            loss, out = self._train_on_shards(X[lo:hi, ...], y[lo:hi], n, lo, split, keys)
        return self._sum_over_ranks(loss), out

    def loss_and_grad(self, X: Array, y: Array) -> float:
        """The batch's loss; fills ``grads`` (see :meth:`train_pass`)."""
        return self.train_pass(X, y)[0]

    def count_correct(self, out: Array, y: Array) -> int:
        """How many rows of the whole batch ``y`` the outputs of a :meth:`train_pass`
        (this rank's rows) classify right, summed over the ranks."""
        lo, hi = self.rows(y.shape[0])
        xp = self.net.xp
        return self._sum_int(int(xp.count_nonzero(xp.argmax(out, axis=1) == y[lo:hi])))

    def _train_on_shards(
        self,
        X: Array,
        y: Array,
        n: int,
        lo: int,
        split: list[tuple[int, int]],
        keys: dict[int, int | Array],
    ) -> tuple[float, Array]:
        """Each shard through forward, loss and backward, on its rows of the batch's masks
        and, for batchnorm, the whole batch's statistics (shard 0 alone moves the running
        averages the shards share): each on a thread, or, for a CNN, shard 0 here and the
        others in worker processes; the shards' gradient vectors summed into ``grads``,
        in shard order."""
        out = np.empty((X.shape[0], *self.net.output_shape), dtype=self.net.dtype)
        workers = self._workers_for(split, X)
        if workers is None:
            shards = self.shards(len(split))
            sums = self._batch_sums(len(shards))
        else:  # batchnorm's sums: the workers' parts come to shard 0 and the totals go back
            shards = self.shards(1)
            sums = BatchSums(1, workers.relay(self.world)) if self._batchnorm else None

        def run(k: int, a: int, b: int) -> float:
            shard = shards[k]
            ctx = shard.context(
                True,
                masks=shard.masks(keys, n, lo + a),
                batch_sums=None if sums is None else sums.hook(k),
                update_running=k == 0,
            )
            loss, out[a:b] = shard.train_pass(X[a:b], y[a:b], count=n, ctx=ctx)
            return loss

        if workers is None:
            losses = self._on_threads(run if sums is None else sums.guard(run), split)
            grads = [shard.grads for shard in shards]
        else:
            try:  # shard 0 on this thread while the workers run the others
                workers.send(self.net.params, X, y, n, lo, split, keys)
                with single_blas():
                    losses = [as_shard(run, 0, *split[0]), *workers.gather(out, split)]
            except BaseException:  # a step half done: its workers are in no state to reuse
                self.close()
                raise
            grads = [shards[0].grads, *workers.grads]
        np.add(grads[0], grads[1], out=self.net.grads)
        for more in grads[2:]:
            self.net.grads += more
        return float(sum(losses)), out

    def _workers_for(self, split: list[tuple[int, int]], X: Array) -> Workers | None:
        """The worker processes for this batch's shards 1.. (started, or started anew
        for a larger batch), or None to run every shard on a thread: a dense network
        (few long passes, which the threads run well), ``HANDPROP_WORKERS=threads``, or
        workers that could not start (said once, as a logged warning)."""
        if not self._convolutional or self._workers is False or worker_kind() == "threads":
            return None
        rows = max(b - a for a, b in split[1:])
        if isinstance(self._workers, Workers):
            if self._workers.fits(len(split), rows, X):
                return self._workers
            self.close()
        workers: Workers | None = None
        try:
            workers = Workers(self.net, len(split), rows, X)
            why = workers.ready()
        except OSError as exc:  # no interpreter to start, no room for the shared memory
            why = f"{exc.strerror or exc}"
        except WorkerStartError as exc:
            why = str(exc)
        if why is not None:
            if workers is not None:
                workers.close()
            log.warning(
                "handprop: worker processes could not start (%s); the shards of each "
                "batch run on threads",
                why,
            )
            self._workers = False
            return None
        self._workers = workers
        return workers

    def prepare(self, batch: int, X: Array) -> None:
        """Start now what training on batches of ``batch`` rows like ``X``'s will use
        (a CNN's worker processes, about 0.15 s), as an MPI job's processes start
        before its training: a run's training time does not count it."""
        lo, hi = self.rows(batch)
        split = self.split(hi - lo, training=True)
        if split is not None:
            self._workers_for(split, X)

    def close(self) -> None:
        """End the worker processes, if any (they are started again when needed)."""
        if isinstance(self._workers, Workers):
            self._workers.close()
            self._workers = None

    def _batch_sums(self, parties: int) -> BatchSums | None:
        """The reduction that gives ``parties`` shards' batchnorm layers the whole
        batch's statistics, over the ranks; None when there is nothing to share."""
        if not self._batchnorm or (parties == 1 and self.world.size == 1):
            return None
        return BatchSums(parties, self.world)

    # -- inference and evaluation ----------------------------------------------------

    def forward(self, X: Array, training: bool = False) -> Array:
        """The network's output for X (this process's threads share the rows)."""
        split = self.split(X.shape[0], training)
        if split is None or training:
            self.net.check_pass(X.shape[0], training)
            with self._blas_for(X.shape[0]):
                return self.net.forward(X, training)
        out = np.empty((X.shape[0], *self.net.output_shape), dtype=self.net.dtype)

        shards = self.shards(len(split))

        def run(k: int, a: int, b: int) -> None:
            out[a:b] = shards[k].forward(X[a:b])

        self._on_threads(run, split)
        return out

    def loss_value(self, X: Array, y: Array, training: bool = False) -> float:
        """The loss over the whole batch (X, y), every rank on its rows."""
        if training:  # a gradient check: the pinned masks, the same rows as train_pass
            return self.net.loss_value(X, y, training=True)
        lo, hi = self.rows(X.shape[0])
        out = self.forward(X[lo:hi, ...])
        loss = self.net.loss.value(out, y[lo:hi]) * (hi - lo) / max(X.shape[0], 1)
        return self._sum_over_ranks(loss, grads=False)

    def predict_proba(self, X: Array, batch_size: int | None = None) -> Array:
        """Class probabilities (n, k) of every row (:meth:`Network.predict_proba`, each
        batch over the threads)."""
        return self.net.predict_proba(X, batch_size, forward=self.forward)

    def predict(self, X: Array, batch_size: int | None = None) -> Array:
        """Class ids (n,) of the most probable class."""
        return self.predict_proba(X, batch_size).argmax(axis=1)

    def accuracy(self, X: Array, y: Array) -> float:
        """The fraction of (X, y) classified right, every rank on its rows."""
        if not len(y):
            return float("nan")
        lo, hi = self.rows(len(y))
        hit = self.predict(X[lo:hi, ...]) == backend.to_host(y[lo:hi]) if hi > lo else []
        correct = int(np.sum(hit))
        return self._sum_int(correct) / len(y)

    # -- the two reduces -------------------------------------------------------------

    def _on_threads(self, fn: Callable[..., T], split: list[tuple[int, int]]) -> list[T]:
        """``fn(k, lo, hi)`` for each shard k and its rows, side by side, BLAS on one
        thread per call."""
        with single_blas():
            return side_by_side(fn, [(k, a, b) for k, (a, b) in enumerate(split)])

    def _sum_over_ranks(self, loss: float, grads: bool = True) -> float:
        """Allreduce ``grads`` (in place) and the loss over the ranks; after a training
        step, stop every rank if any was asked to."""
        world = self.world
        if world.size == 1:
            return loss
        if grads:  # NumPy's vector in place; a device's through a host copy
            host = backend.to_host(self.net.grads)
            world.sum(host)
            if host is not self.net.grads:
                backend.copyto(self.net.grads, backend.asarray(host, self.net.xp))
        self._two[:] = float(loss), world.stop_signal if grads else 0
        world.sum(self._two)
        if self._two[1]:
            raise Interrupted(world.stop_signal or signal.SIGTERM)
        return float(self._two[0])

    def _sum_int(self, value: int) -> int:
        if self.world.size == 1:
            return value
        self._two[:] = value, 0
        self.world.sum(self._two)
        return round(self._two[0])

    def __repr__(self) -> str:
        world = self.world
        return f"DataParallel({self.net!r}, rank {world.rank} of {world.size})"


def parallel(model: Network | DataParallel) -> DataParallel:
    """``model`` wrapped for data-parallel passes (a DataParallel is returned as is)."""
    return model if isinstance(model, DataParallel) else DataParallel(model)


__all__ = ["DataParallel", "OneProcess", "World", "parallel"]
