"""One flat parameter vector, one flat gradient vector, and views into them.

Every layer's arrays (W, b, ...) are reshaped slices of ONE contiguous vector, laid out
layer by layer in the order the layer declares them (W then b for Dense). The gradient
vector has the same layout, so an optimizer, a checkpoint or an allreduce sees two flat
arrays and nothing else.
"""

from __future__ import annotations

from dataclasses import dataclass
from math import prod

import numpy as np

from handprop.nn.backend import namespace


@dataclass(frozen=True)
class ParamSlot:
    """Where one named array of one layer lives in the flat vector."""

    layer: int  # index of the owning layer in the network
    name: str  # "W", "b", ...
    shape: tuple[int, ...]
    offset: int  # first element in the flat vector

    @property
    def size(self) -> int:
        return prod(self.shape)

    @property
    def stop(self) -> int:
        return self.offset + self.size


class ParamLayout:
    """Offsets and shapes of every parameter array in the flat vector.

    Parameters
    ----------
    shapes : list of dict
        ``shapes[i]`` maps parameter names of layer ``i`` to their shapes, in layout order.
    """

    def __init__(self, shapes: list[dict[str, tuple[int, ...]]]) -> None:
        slots: list[ParamSlot] = []
        offset = 0
        for i, layer_shapes in enumerate(shapes):
            for name, shape in layer_shapes.items():
                slot = ParamSlot(i, name, tuple(int(s) for s in shape), offset)
                slots.append(slot)
                offset = slot.stop
        self.slots: tuple[ParamSlot, ...] = tuple(slots)
        self.size: int = offset

    def views(self, flat: np.ndarray, layer: int) -> dict[str, np.ndarray]:
        """Views into ``flat`` (shape ``(size,)``, any array namespace) for every array of
        one layer."""
        xp = namespace(flat)
        return {
            s.name: xp.reshape(flat[s.offset : s.stop], s.shape)
            for s in self.slots
            if s.layer == layer
        }

    def mask(self, names: tuple[str, ...]) -> np.ndarray:
        """Boolean vector of shape ``(size,)``: True where the parameter name is in ``names``.

        Used for weight decay, which applies to weights and not to biases.
        """
        m = np.zeros(self.size, dtype=bool)
        for s in self.slots:
            if s.name in names:
                m[s.offset : s.stop] = True
        return m
