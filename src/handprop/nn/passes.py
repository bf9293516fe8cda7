"""What one pass needs, handed to every layer as an argument: ``forward(X, ctx)``,
``backward(G, ctx)``.

A layer is its maths. Whatever a pass needs beyond X (or G) and the layer's own
parameters arrives in one small :class:`Pass`, which the code that runs the pass (a
:class:`~handprop.nn.Network`, a thread's shard of
:class:`~handprop.scale.DataParallel`, a gradient check) makes; nothing outside a layer
writes the layer's attributes. A layer keeps on itself only what its own forward
leaves for its backward (Dense its input X, sigmoid its output A).

- ``training``: keep what backward needs; dropout drops, batchnorm uses the batch's
  statistics and moves its running averages.
- ``xp``: the array namespace of the pass (NumPy, CuPy, array-api-strict...).
- ``work``: where a training pass writes its results (:class:`Workspace`): arrays kept
  from one batch to the next of the same shape, owned by the network (each thread's
  shard has its own), so a training step allocates nothing.
- ``masks``: this worker's rows of the batch's dropout masks (:class:`Masks`).
- ``batch_sums``: for batchnorm, the sum of a per-channel statistic over the whole
  batch, given this worker's part (None: the rows are the whole batch).
- ``update_running``, ``momentum``: whether batchnorm moves its running averages in
  this pass (one writer when shards share the vector), and the batch's weight in
  them when not the layer's own (recalibration averages batches exactly).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np

#: an array of the pass's namespace (NumPy, CuPy, ...)
Array = Any


class Workspace:
    """Work arrays reused from pass to pass while their shapes stay the same, one per
    (layer, name).

    Training calls forward and backward on same-shaped batches again and again;
    writing their results into the memory of the previous batch's saves the
    allocation and the page faults of a fresh multi-megabyte array per pass. A network
    owns one (and makes a new one when its arrays move to another namespace); only
    training passes write into it, so an inference result handed to a user is never
    overwritten later.
    """

    def __init__(self) -> None:
        self._arrays: dict[tuple[int, str], Array] = {}

    def array(self, owner: Any, name: str, shape: tuple[int, ...], dtype: Any, xp: Any) -> Array:
        """The work array ``name`` of ``owner`` (a layer): the one of the last pass when
        its shape and dtype are the same, else a new one (its values are undefined)."""
        key = (id(owner), name)  # the network holds its layers: ids stay theirs
        buf = self._arrays.get(key)
        if buf is None or buf.shape != shape or buf.dtype != dtype:
            buf = self._arrays[key] = xp.empty(shape, dtype=dtype)
        return buf

    def arrays(self) -> list[Array]:
        """Every work array it holds."""
        return list(self._arrays.values())


@dataclass(frozen=True)
class Masks:
    """This worker's rows [lo, lo + m) of one batch's dropout masks (n rows in all).

    ``keys`` gives each dropout layer (by ``id``) the key of its mask's random stream,
    drawn once per batch and the same on every worker, so that a worker draws its own
    rows of the batch's mask (:func:`~handprop.nn.layers.keep_mask`) and a run does not
    depend on the number of threads or ranks; or a mask of all n rows pinned by the
    caller (gradient checks), of which the worker takes its rows.
    """

    keys: Mapping[int, int | Array]
    n: int
    lo: int = 0

    def key(self, layer: Any) -> int | Array:
        """``layer``'s key (an int) or pinned mask (an array of the batch's n rows)."""
        return self.keys[id(layer)]


@dataclass(frozen=True)
class Pass:
    """What one forward/backward pass needs (see the module's docstring)."""

    training: bool = False
    xp: Any = np
    work: Workspace | None = None
    masks: Masks | None = None
    batch_sums: Callable[[Array], Array] | None = None
    update_running: bool = True
    momentum: float | None = None

    def buffer(self, owner: Any, name: str, shape: tuple[int, ...], dtype: Any) -> Array:
        """An array for a result: ``owner``'s work array ``name`` in a training pass with
        a workspace, else a fresh one (inference results are the caller's to keep)."""
        if self.work is None or not self.training:
            return self.xp.empty(shape, dtype=dtype)
        return self.work.array(owner, name, shape, dtype, self.xp)

    def total(self, part: Array) -> Array:
        """A per-channel statistic summed over the whole batch from this worker's
        ``part`` (``part`` itself when these rows are the whole batch)."""
        return part if self.batch_sums is None else self.batch_sums(part)


#: an inference pass on NumPy: nothing kept, nothing dropped, fresh arrays
INFERENCE = Pass()


__all__ = ["INFERENCE", "Masks", "Pass", "Workspace"]
