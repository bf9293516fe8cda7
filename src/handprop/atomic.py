"""Atomic file writes: a reader sees the old file or the whole new one, never half.

Standard library only, so every module (the NumPy-only core included) can use it.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

from handprop.errors import OutputError


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    """Write ``data`` to a temporary file beside ``path``, then rename it into place.

    The temporary file lives in the same folder so that the rename is atomic (same
    file system), and its bytes reach the disk before the rename, so that a power cut
    leaves the old file or the new one; on any failure, Ctrl-C included, it is removed.

    Raises
    ------
    OutputError
        The file cannot be written (a full disk, a read-only or missing folder, ...);
        the message names ``path``, not the temporary file.
    """
    path = Path(path)
    try:
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    except OSError as exc:
        raise output_error(path, exc) from None
    try:
        # mkstemp makes the file private (0600); give it the mode open() would have
        os.chmod(fd, 0o666 & ~_umask())
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as exc:
        Path(tmp).unlink(missing_ok=True)
        if isinstance(exc, OSError):
            raise output_error(path, exc) from None
        raise


def output_error(path: str | Path, exc: OSError, what: str = "cannot write") -> OutputError:
    """One line for an OSError met while writing ``path``: the path, then the reason."""
    reason = exc.strerror or str(exc)
    return OutputError(f"{path}: {what}: {reason}")


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def atomic_write_text(path: str | Path, text: str) -> None:
    """:func:`atomic_write_bytes` for UTF-8 text."""
    atomic_write_bytes(path, text.encode("utf-8"))
