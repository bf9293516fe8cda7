"""Learning-rate schedules: the factor by which the base rate is multiplied at an epoch.

Epochs count from 1. A linear warm-up over the first ``warmup`` epochs (from
1/(warmup+1) of the rate up to the full rate) comes before the schedule, which then
runs over the remaining epochs.
"""

from __future__ import annotations

import math

from handprop.nn import checks

SCHEDULES = ("constant", "step", "exponential", "cosine")


class Schedule:
    """lr(epoch) = base * factor(epoch).

    Parameters
    ----------
    kind : "constant" | "step" | "exponential" | "cosine"
    epochs : total number of epochs (the cosine reaches ``min_factor`` at the last one)
    gamma : decay per ``step_size`` epochs (step) or per epoch (exponential)
    step_size : epochs between decays for "step"
    warmup : epochs of linear warm-up
    min_factor : floor of the cosine schedule, as a fraction of the base rate
    """

    def __init__(
        self,
        kind: str = "constant",
        epochs: int = 1,
        gamma: float = 0.1,
        step_size: int = 10,
        warmup: int = 0,
        min_factor: float = 0.0,
    ) -> None:
        checks.one_of("schedule", kind, SCHEDULES)
        checks.in_interval("schedule gamma", gamma, 0, 1, open_low=True, open_high=False)
        checks.require(
            step_size >= 1 and warmup >= 0 and epochs >= 1,
            f"step size must be >= 1, warm-up >= 0 and epochs >= 1, "
            f"got {step_size}, {warmup}, {epochs}",
        )
        self.kind, self.epochs, self.gamma = kind, epochs, gamma
        self.step_size, self.warmup, self.min_factor = step_size, warmup, min_factor

    def factor(self, epoch: int) -> float:
        if epoch <= self.warmup:
            return epoch / (self.warmup + 1)
        e = epoch - self.warmup - 1  # 0 at the first epoch after warm-up
        if self.kind == "step":
            return self.gamma ** (e // self.step_size)
        if self.kind == "exponential":
            return self.gamma**e
        if self.kind == "cosine":
            span = max(self.epochs - self.warmup - 1, 1)
            cos = 0.5 * (1 + math.cos(math.pi * min(e, span) / span))
            return self.min_factor + (1 - self.min_factor) * cos
        return 1.0
