"""A user's file checked before handprop opens it: a regular file, of a sane size.

A FIFO blocks its reader forever, a device (``/dev/zero``, ``/dev/urandom``) never
ends, and a huge file (a sparse one takes no disk at all) would be read until the
memory is gone: each is refused from its ``stat``, before it is opened, with one line
naming the path. A missing file is left to ``open()`` (each reader words that itself).

The limits are generous, far above any real file of each kind:

=================================  ========  =========================================
file                               at most   a real one
=================================  ========  =========================================
run config (.cfg, .toml)           1 MiB     a few hundred bytes
experiment CSV (a grid of runs)    16 MiB    a few KB
run folder's JSON and CSV logs     1 GiB     a few MB after thousands of epochs
image given to ``predict``         1 GiB     a few KB to a few MB
data CSV (label, pixels)           16 GiB    MNIST as CSV is 110 MB
IDX file (raw or gzip)             64 GiB    MNIST's largest is 47 MB raw
model or checkpoint (.npz)         64 GiB    a few MB; 16 G float32 parameters
=================================  ========  =========================================

Standard library only, so every module (the NumPy-only core included) can use it.
"""

from __future__ import annotations

import os
import stat
from pathlib import Path

from handprop.errors import DataError, HandpropError
from handprop.memory import format_bytes

MAX_CONFIG_BYTES = 1 << 20
MAX_GRID_BYTES = 16 << 20
MAX_RUN_LOG_BYTES = 1 << 30
MAX_IMAGE_BYTES = 1 << 30
MAX_CSV_BYTES = 16 << 30
MAX_IDX_BYTES = 64 << 30
MAX_MODEL_BYTES = 64 << 30

_KINDS = (
    (stat.S_ISFIFO, "a FIFO (named pipe)"),
    (stat.S_ISCHR, "a character device"),
    (stat.S_ISBLK, "a block device"),
    (stat.S_ISSOCK, "a socket"),
)


def _a(what: str) -> str:
    return ("an " if what[:1].lower() in "aeiou" else "a ") + what


def check_stat(
    st: os.stat_result,
    path: str | Path,
    what: str,
    max_bytes: int,
    error: type[HandpropError] = DataError,
) -> int:
    """``st``'s size, once it is known to be a regular file of at most ``max_bytes``;
    ``error`` naming ``path`` and ``what`` ("config file", "IDX file") otherwise."""
    mode = st.st_mode
    if stat.S_ISDIR(mode):
        raise error(f"{path}: is a folder, expected {_a(what)}")
    if not stat.S_ISREG(mode):
        kind = next((k for test, k in _KINDS if test(mode)), "not a plain file")
        raise error(f"{path}: is {kind}, not a regular file; expected {_a(what)}")
    if st.st_size > max_bytes:
        raise error(
            f"{path}: {st.st_size:,} bytes is too large for {_a(what)} "
            f"(at most {format_bytes(max_bytes)}); is this the right file?"
        )
    return st.st_size


def regular_file(
    path: str | Path, what: str, max_bytes: int, error: type[HandpropError] = DataError
) -> int:
    """The size of ``path`` (a link to a file is followed), checked by
    :func:`check_stat` without opening it.

    Raises
    ------
    error
        ``path`` is a folder, a FIFO, a device or a socket, or larger than ``max_bytes``.
    OSError
        ``path`` cannot be looked at (FileNotFoundError, PermissionError, ...), as
        ``open()`` would raise it: the caller words it.
    """
    return check_stat(os.stat(path), path, what, max_bytes, error)


def read_regular(
    path: str | Path, what: str, max_bytes: int, error: type[HandpropError] = DataError
) -> bytes:
    """The whole content of ``path``, checked by :func:`regular_file` first, then opened
    without blocking and checked again from the open file (a FIFO swapped in between
    the two is refused too, never read). OSError as for :func:`regular_file`."""
    regular_file(path, what, max_bytes, error)
    flags = os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_NOCTTY", 0)
    fd = os.open(path, flags | getattr(os, "O_CLOEXEC", 0))
    with os.fdopen(fd, "rb") as f:
        check_stat(os.fstat(fd), path, what, max_bytes, error)
        data = f.read(max_bytes + 1)
    if len(data) > max_bytes:  # it grew since
        raise error(
            f"{path}: more than {format_bytes(max_bytes)} is too large for {_a(what)}; "
            "is this the right file?"
        )
    return data
