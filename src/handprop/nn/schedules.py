"""Learning-rate schedules: the factor by which the base rate is multiplied at an epoch.

Epochs count from 1. A linear warm-up over the first ``warmup`` epochs (from
1/(warmup+1) of the rate up to the full rate) comes before the schedule, which then
runs over the remaining epochs.

"onecycle" (Smith & Topin 2019) changes the rate at every step, not every epoch: from
1/25 of the rate up to the full rate, linearly, over the first ``peak`` of training
(a fraction of all its steps), then down to 0 along a half cosine. A short training
(one or two epochs) is where it counts, and where a per-epoch rate cannot move.
"""

from __future__ import annotations

import math

from handprop.nn import checks

SCHEDULES = ("constant", "step", "exponential", "cosine", "onecycle")

#: the one-cycle rate starts at this fraction of the base rate (PyTorch's div_factor 25)
ONECYCLE_START = 1 / 25


class Schedule:
    """lr(epoch) = base * factor(epoch), or, for "onecycle", at every step:
    lr(epoch, progress) = base * factor(epoch, progress), progress the fraction of the
    epoch's steps already taken.

    Parameters
    ----------
    kind : "constant" | "step" | "exponential" | "cosine" | "onecycle"
    epochs : total number of epochs (the cosine reaches ``min_factor`` at the last one)
    gamma : decay per ``step_size`` epochs (step) or per epoch (exponential)
    step_size : epochs between decays for "step"
    warmup : epochs of linear warm-up
    min_factor : floor of the cosine schedule, as a fraction of the base rate
    peak : where the one-cycle rate peaks, as a fraction of training (0 < peak < 1)
    """

    def __init__(
        self,
        kind: str = "constant",
        epochs: int = 1,
        gamma: float = 0.1,
        step_size: int = 10,
        warmup: int = 0,
        min_factor: float = 0.0,
        peak: float = 0.25,
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
        self.peak = checks.in_interval("one-cycle peak", peak, 0, 1, open_low=True)

    @property
    def per_step(self) -> bool:
        """Whether the rate changes at every step (else at every epoch)."""
        return self.kind == "onecycle"

    def factor(self, epoch: int, progress: float = 0.0) -> float:
        if self.kind == "onecycle":
            u = (epoch - 1 + progress) / self.epochs  # the fraction of training done
            if u < self.peak:
                return ONECYCLE_START + (1 - ONECYCLE_START) * u / self.peak
            return 0.5 * (1 + math.cos(math.pi * (u - self.peak) / (1 - self.peak)))
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
