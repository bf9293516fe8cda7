import numpy as np
import pytest


@pytest.fixture
def rng() -> np.random.Generator:
    return np.random.default_rng(20261124)


@pytest.fixture
def ctrl_c_after_step(monkeypatch):
    """``ctrl_c_after_step(k)``: every optimizer raises KeyboardInterrupt (a Ctrl-C) when
    asked for step k + 1; ``ctrl_c_after_step(None)`` lets it step again."""
    from handprop import nn

    real_step = nn.Optimizer.step

    def arm(k: int | None) -> None:
        def step(self, params, grads):
            if k is not None and self.t == k:
                raise KeyboardInterrupt
            real_step(self, params, grads)

        monkeypatch.setattr(nn.Optimizer, "step", step)

    return arm
