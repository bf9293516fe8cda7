"""handprop.scale: one batch over many workers, the same numbers as one.

:class:`DataParallel` (``parallel``) splits each batch of a plain
:class:`~handprop.nn.Network` into row blocks over this process's threads and over MPI
ranks, and sums their flat gradient vectors; ``mpi`` gives the world of ranks
(mpi4py, imported only under ``mpiexec``). The maths stays in :mod:`handprop.nn`.
"""

from handprop.scale.parallel import DataParallel, OneProcess, World

__all__ = ["DataParallel", "OneProcess", "World"]
