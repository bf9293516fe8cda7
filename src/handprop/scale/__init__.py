"""handprop.scale: one batch over many workers, the same numbers as one.

:class:`DataParallel` (``parallel``) splits each batch of a plain
:class:`~handprop.nn.Network` into row blocks over this process's threads (for a
CNN's training batches, worker processes of its own: ``processes``) and over MPI
ranks, and sums their flat gradient vectors; ``mpi`` gives the world of ranks
(mpi4py, imported only under ``mpiexec``); :class:`TrainingStep` (``graphs``) takes a
batch through its passes and the optimizer's update, on a GPU as CUDA graphs replayed.
The maths stays in :mod:`handprop.nn`.
"""

from handprop.scale.graphs import TrainingStep
from handprop.scale.parallel import DataParallel, OneProcess, World

__all__ = ["DataParallel", "OneProcess", "TrainingStep", "World"]
