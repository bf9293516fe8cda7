"""User-facing errors.

Every error a user can cause (a malformed config, a truncated file, a wrong shape, a
diverging run) is a subclass of :class:`HandpropError`; the command line catches it,
prints its one-line message and exits non-zero. Anything else is a bug.
"""

from __future__ import annotations

import signal
from typing import Any


class HandpropError(Exception):
    """Base class of every error caused by user input rather than by a bug."""


class ConfigError(HandpropError):
    """A run config, experiment CSV or command-line value is malformed."""


class DataError(HandpropError):
    """A dataset file is missing, malformed, truncated or fails verification."""


class ImageTooLargeError(DataError):
    """An image has more pixels than handprop reads (Pillow's decompression-bomb limit,
    or a server's own limit): refused from its header, before it is decoded."""


class ModelFileError(HandpropError):
    """A saved model file is missing keys, has wrong sizes or is not a handprop model."""


class DivergenceError(HandpropError):
    """The training loss became NaN or infinite."""

    def __init__(self, message: str, epoch: int | None = None) -> None:
        super().__init__(message)
        self.epoch = epoch


class ShapeError(HandpropError, ValueError):
    """An array given to a network or layer has the wrong shape, dtype or values."""


class OutputError(HandpropError):
    """An output file or folder cannot be written: the disk is full, the folder is
    read-only or missing, or the path is taken by something handprop did not make."""


class Interrupted(KeyboardInterrupt):
    """SIGTERM or SIGHUP, handled like Ctrl-C (the run checkpoints and stops); or a
    Ctrl-C passed on with what had been done (:meth:`after`).

    ``signum`` gives the exit status 128 + signum, as a shell reports: 143 for SIGTERM,
    130 for a Ctrl-C (SIGINT). ``outcome``: what had been done when the stop came (a
    run's result, a grid's summaries), for the command line to report.
    """

    def __init__(self, signum: int, outcome: Any = None) -> None:
        super().__init__(signum)
        self.signum = int(signum)
        self.outcome = outcome

    @classmethod
    def after(cls, exc: KeyboardInterrupt, outcome: Any) -> Interrupted:
        """The stop ``exc`` (a Ctrl-C, or Interrupted by a signal) again, carrying
        ``outcome``: ``raise Interrupted.after(exc, result) from exc``."""
        return cls(getattr(exc, "signum", signal.SIGINT), outcome)


class ResourceError(HandpropError):
    """A request needs more memory (or disk) than the machine can give it.

    Raised before the allocation is tried, with the estimate, so that a too-large
    network, model file or input is one clear line and never an out-of-memory kill.
    """
