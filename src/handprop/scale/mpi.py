"""Training over MPI: the world of ranks that :class:`~handprop.scale.DataParallel` splits
every batch across.

``mpiexec -n N handprop train CONFIG`` starts N copies of handprop; each one finds here
that it is rank r of N (from the launcher's environment), and the training loop runs on
every rank with the same data and the same random draws: each rank takes its block of
every batch's rows, one in-place ``Allreduce`` sums the flat gradient vectors, and every
rank steps identically. Rank 0 alone writes the run folder.

Faults end every rank, never hang one:

- an error during start-up (a bad config, missing data, an unwritable folder: anything
  before the first step's reduce) ends every rank together: the start-up collectives
  (rank 0's run folder, the config and data digests, and a last check ahead of the
  first reduce) each carry whether a rank failed, a rank that fails meets the others at
  their next one, and all exit with status 1, rank 0 printing the error once (naming
  the rank when not every rank had it). No ``MPI_Abort``, so the user's last line is
  handprop's, not the launcher's;
- an error on one rank once training has begun, which the others cannot hear of (they
  wait in a reduce), is printed (one line, naming the rank) and ends the whole job
  with ``MPI_Abort``;
- Ctrl-C, SIGTERM or SIGHUP only raise a flag; the flag rides along the next step's
  reduce, so every rank stops after the same step, rank 0 checkpoints, and all exit
  with the same status (a rank stopped inside an Allreduce would hang the others);
- the config and the data split are compared at start-up (a digest broadcast from
  rank 0), so two hosts with different files are refused, not trained on.

mpi4py is imported only here, and only when the launcher says there is more than one
rank: ``pip install -e ".[mpi]"``.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import signal
import sys
import time
from collections.abc import Iterable
from typing import Any

import numpy as np

from handprop.errors import ConfigError, HandpropError, Interrupted
from handprop.scale.parallel import OneProcess, World

#: environment variables through which launchers tell a process how many ranks there are
SIZE_VARIABLES = ("PMI_SIZE", "OMPI_COMM_WORLD_SIZE", "PMIX_SIZE", "MPI_LOCALNRANKS")

#: environment variables through which launchers tell a process its rank
RANK_VARIABLES = ("PMI_RANK", "OMPI_COMM_WORLD_RANK", "PMIX_RANK")

#: how long a failing rank waits, after printing its message, before ending the job
ABORT_GRACE_SECONDS = 0.5

#: how long a rank that failed during start-up waits for the others to reach their next
#: start-up collective (they may still be reading the data) before it ends the job
#: with ``MPI_Abort`` instead
SETTLE_SECONDS = 60.0

_world: MPIWorld | None = None


def launched_size() -> int:
    """How many ranks the launcher (``mpiexec``) started; 1 when none did."""
    for name in SIZE_VARIABLES:
        value = os.environ.get(name, "").strip()
        if value.isdigit() and int(value) > 0:
            return int(value)
    return 1


def launched_rank() -> int:
    """This process's rank as the launcher (``mpiexec``) tells it; 0 when none does."""
    for name in RANK_VARIABLES:
        value = os.environ.get(name, "").strip()
        if value.isdigit():
            return int(value)
    return 0


class EveryRankError(HandpropError):
    """An error that every rank of the job has (each raised it alike, or the ranks
    agreed on it): rank 0 alone prints it, and every rank exits with status 1 without
    ``MPI_Abort``. Its text may hold several lines, one per distinct message."""

    every_rank = True


def refuse_ranks(command: str, instead: str) -> None:
    """Refuse to run ``command`` as one of several MPI ranks (each would do all of its
    work, colliding with the others).

    Raises
    ------
    EveryRankError
        Started by a launcher as one of several ranks; on every rank, saying ``instead``.
    """
    size = launched_size()
    if size > 1:
        raise EveryRankError(
            f"{command} runs as one process, not as {size} MPI ranks (each rank would run "
            f"all of it, colliding with the others): {instead}"
        )


def world() -> World:
    """This process's world: MPI's when it was started as one of several ranks, else
    a world of one process (no MPI needed).

    Raises
    ------
    ConfigError
        Started as one of several ranks, but mpi4py is not installed.
    """
    global _world
    if _world is not None:
        return _world
    size = launched_size()
    if size == 1:
        return OneProcess()
    try:
        from mpi4py import MPI
    except ImportError:
        raise ConfigError(
            f"started as one of {size} MPI ranks, but mpi4py is not installed: "
            'pip install -e ".[mpi]"'
        ) from None
    _world = MPIWorld(MPI)
    return _world


def active() -> MPIWorld | None:
    """The MPI world, once :func:`world` has made one (None in a lone process)."""
    return _world


class MPIWorld:
    """The ranks of ``MPI.COMM_WORLD``, as :class:`~handprop.scale.parallel.World` wants.

    Making one also sets this process's thread count to its share of the host's cores
    (cores // ranks on this host), unless ``HANDPROP_THREADS`` says otherwise, and
    turns Ctrl-C, SIGTERM and SIGHUP into a stop flag (see the module's notes).
    """

    def __init__(self, mpi: Any) -> None:
        self.MPI = mpi
        self.comm = mpi.COMM_WORLD
        self.rank = self.comm.Get_rank()
        self.size = self.comm.Get_size()
        self.local_size = self.comm.Split_type(mpi.COMM_TYPE_SHARED).Get_size()
        self.stop_signal = 0  # the first stop signal received, 0 while none
        self._flag = np.zeros(1, dtype=np.float64)
        # start-up is over (the first reduce has begun): the ranks no longer meet at
        # start-up collectives, so an error on one rank can only end the job by Abort
        self.started = False
        self.agreed: str | None = None  # an error the ranks agreed on, once they have
        from threadpoolctl import threadpool_limits

        from handprop.nn.threads import get_threads, set_threads

        if not os.environ.get("HANDPROP_THREADS", "").strip():
            set_threads(max(1, get_threads() // self.local_size))
        # BLAS too: N ranks each spinning a pool of every core's threads oversubscribe
        # the host many times over, and OpenBLAS's idle workers spin against the work
        self._blas_limit = threadpool_limits(get_threads(), user_api="blas")
        for name in ("SIGINT", "SIGTERM", "SIGHUP"):
            if hasattr(signal, name):
                signal.signal(getattr(signal, name), self._on_signal)

    def _on_signal(self, signum: int, frame: object) -> None:
        self.stop_signal = self.stop_signal or signum

    def sum(self, array: np.ndarray) -> None:
        """In-place Allreduce (sum) of ``array`` over the ranks; the first one is the
        end of start-up, which every rank reaches without error first."""
        if not self.started:
            self._agree(None)
            self.started = True
        self.comm.Allreduce(self.MPI.IN_PLACE, array, op=self.MPI.SUM)

    def broadcast(self, value: Any) -> Any:
        """Rank 0's ``value``, on every rank."""
        if self.started:
            return self.comm.bcast(value, root=0)
        return self._agree(None, value)[0]

    def _agree(self, message: str | None, value: Any = None) -> list[Any]:
        """A start-up collective: every rank's ``value``, once every rank has come to
        one, bringing ``message`` when it failed.

        A rank that failed waits at most :data:`SETTLE_SECONDS` for the others, then
        ends the job with :meth:`abort`.

        Raises
        ------
        EveryRankError
            On every rank, when any rank brought a message: the messages, once each,
            naming the ranks unless every rank had it.
        """
        failed = np.array([0.0 if message is None else 1.0])
        request = self.comm.Iallreduce(self.MPI.IN_PLACE, failed, op=self.MPI.MAX)
        if message is None:
            request.Wait()
        else:
            deadline = time.monotonic() + SETTLE_SECONDS
            while not request.Test():
                if time.monotonic() > deadline:
                    self.abort(message)
                time.sleep(0.005)
        answers = self.comm.allgather((message, value))
        if not failed[0]:
            return [v for _, v in answers]
        said: dict[str, list[int]] = {}
        for rank, (text, _) in enumerate(answers):
            if text is not None:
                said.setdefault(text, []).append(rank)
        lines = [
            text if len(ranks) == self.size else f"[{_ranks(ranks)} of {self.size}] {text}"
            for text, ranks in said.items()
        ]
        self.agreed = "\n".join(lines)
        raise EveryRankError(self.agreed)

    def end_together(self, message: str) -> str | None:
        """After an error on this rank: what rank 0 prints (None on the other ranks),
        once every rank knows of it and may exit with the same status.

        During start-up the error travels to the other ranks at their next start-up
        collective (see the module's notes); once training has begun they cannot hear
        of it, and this rank prints ``message`` and ends the job (:meth:`abort`).
        """
        if self.agreed is None:
            if self.started:
                self.abort(message)
            with contextlib.suppress(EveryRankError):  # it sets self.agreed
                self._agree(message)
        return self.agreed if self.rank == 0 else None

    def check_stop(self) -> None:
        """Stop every rank together when any of them was signalled: raises Interrupted
        (a KeyboardInterrupt) on all ranks after the same step."""
        self._flag[0] = self.stop_signal
        self.sum(self._flag)
        if self._flag[0]:
            signum = self.stop_signal or signal.SIGTERM
            raise Interrupted(int(signum))

    def check_same(self, what: str, parts: Iterable[bytes | np.ndarray]) -> None:
        """Refuse to train when this rank's ``what`` (config, data) differs from rank 0's.

        Raises
        ------
        ConfigError
            On every rank, naming the ranks whose ``what`` differs.
        """
        digest = hashlib.blake2b(digest_size=16)
        for part in parts:
            digest.update(part.tobytes() if isinstance(part, np.ndarray) else part)
        digests = self._agree(None, digest.hexdigest())
        bad = [r for r, d in enumerate(digests) if d != digests[0]]
        if bad:
            ranks = ", ".join(map(str, bad))
            raise ConfigError(
                f"the {what} on rank {ranks} differs from rank 0's; every rank must "
                "read the same config and data (same files on every host)"
            )

    def abort(self, message: str, status: int = 1) -> None:
        """Print this rank's one-line message and end every rank of the job."""
        sys.stderr.write(f"handprop: error: [rank {self.rank} of {self.size}] {message}\n")
        sys.stderr.flush()
        time.sleep(ABORT_GRACE_SECONDS)  # the launcher forwards the line before it kills
        self.comm.Abort(status)
        os._exit(status)  # Abort may return while the launcher ends the job: stop here


def _ranks(ranks: list[int]) -> str:
    """The ranks as a message names them: rank 1, ranks 0, 2."""
    return ("rank " if len(ranks) == 1 else "ranks ") + ", ".join(map(str, ranks))
