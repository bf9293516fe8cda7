"""User-facing errors.

Every error a user can cause (a malformed config, a truncated file, a wrong shape, a
diverging run) is a subclass of :class:`HandpropError`; the command line catches it,
prints its one-line message and exits non-zero. Anything else is a bug.
"""


class HandpropError(Exception):
    """Base class of every error caused by user input rather than by a bug."""


class ConfigError(HandpropError):
    """A run config, experiment CSV or command-line value is malformed."""


class DataError(HandpropError):
    """A dataset file is missing, malformed, truncated or fails verification."""


class ModelFileError(HandpropError):
    """A saved model file is missing keys, has wrong sizes or is not a handprop model."""


class DivergenceError(HandpropError):
    """The training loss became NaN or infinite."""

    def __init__(self, message: str, epoch: int | None = None) -> None:
        super().__init__(message)
        self.epoch = epoch


class ShapeError(HandpropError, ValueError):
    """An array given to a network or layer has the wrong shape, dtype or values."""
