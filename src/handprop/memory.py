"""Memory budget: refuse, with the estimate, what cannot fit before allocating it.

Standard library only, so every module (the NumPy-only core included) can use it. A
NumPy allocation that does not fit raises ``_ArrayMemoryError`` (a traceback) or, worse,
succeeds lazily and gets the process killed later; an estimate checked up front turns
both into one line that names what was asked for.
"""

from __future__ import annotations

import os

from handprop.errors import ResourceError

#: ``HANDPROP_MEMORY_LIMIT`` (bytes, or with a K/M/G/T suffix) caps the budget below
#: what the machine reports, e.g. for a grid sharing a machine with other jobs
LIMIT_VARIABLE = "HANDPROP_MEMORY_LIMIT"

_UNITS = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}


def available_bytes() -> int | None:
    """Memory a new allocation may take: MemAvailable on Linux, else physical memory,
    capped by ``HANDPROP_MEMORY_LIMIT``; None when nothing can be learned."""
    found: int | None = None
    try:
        with open("/proc/meminfo", encoding="ascii") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    found = int(line.split()[1]) * 1024
                    break
    except (OSError, ValueError, IndexError):
        found = None
    if found is None:
        try:
            found = os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
        except (ValueError, OSError, AttributeError):
            found = None
    limit = _limit()
    if limit is not None:
        found = limit if found is None else min(found, limit)
    return found


def _limit() -> int | None:
    text = os.environ.get(LIMIT_VARIABLE, "").strip()
    if not text:
        return None
    unit = text[-1].upper() if text[-1].isalpha() else ""
    number = text[:-1] if unit else text
    try:
        value = float(number) * _UNITS[unit]
    except (KeyError, ValueError):
        raise ResourceError(
            f"{LIMIT_VARIABLE} must be a number of bytes, optionally with K, M, G or T, "
            f"got {text!r}"
        ) from None
    if not value > 0:
        raise ResourceError(f"{LIMIT_VARIABLE} must be > 0, got {text!r}")
    return int(value)


def format_bytes(n: float) -> str:
    """1536 -> '1.5 KiB'; a size for a message."""
    for unit in ("B", "KiB", "MiB", "GiB", "TiB", "PiB"):
        if abs(n) < 1024 or unit == "PiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    raise AssertionError("unreachable")


def check_fits(nbytes: float, what: str) -> None:
    """Raise :class:`ResourceError` when ``nbytes`` exceeds the memory available.

    Parameters
    ----------
    nbytes : the estimated size of the allocation(s) about to be made
    what : what they are for, as the message should name it ("the network's parameters")
    """
    available = available_bytes()
    if available is not None and nbytes > available:
        raise ResourceError(
            f"{what} would need about {format_bytes(nbytes)}, but only "
            f"{format_bytes(available)} of memory is available"
        )
