"""The IDX format (MNIST's): magic, dtype code, dims, then big-endian data.

Layout: two zero bytes, one dtype code byte, one byte for the number of dimensions,
one big-endian uint32 per dimension, then the values in C order, big-endian. Files may
be gzip-compressed; that is detected from the first bytes, not from the file name.

Reading is bounded: the header says how many bytes the data must have, that is checked
against what the file can hold and against the memory available before anything is
allocated, and a gzip stream is never decompressed past it (a "gzip bomb" is refused).
"""

from __future__ import annotations

import gzip
import io
import math
import struct
import zlib
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

import numpy as np

from handprop.atomic import atomic_write_bytes
from handprop.errors import DataError, ResourceError
from handprop.files import MAX_IDX_BYTES, regular_file
from handprop.memory import available_bytes, check_fits, format_bytes

#: IDX dtype code -> big-endian NumPy dtype
IDX_DTYPES: dict[int, np.dtype] = {
    0x08: np.dtype(">u1"),
    0x09: np.dtype(">i1"),
    0x0B: np.dtype(">i2"),
    0x0C: np.dtype(">i4"),
    0x0D: np.dtype(">f4"),
    0x0E: np.dtype(">f8"),
}
GZIP_MAGIC = b"\x1f\x8b"
MAX_NDIM = 32  # NumPy's own limit (1.x); IDX files in practice have 1 to 4
#: deflate's largest possible expansion: 258 bytes from 2 bits
GZIP_MAX_RATIO = 1032
#: extra bytes read past the data the header announces, to report how many too many
SLACK = 1 << 16
CHUNK = 1 << 20


class UnreadableFileError(DataError):
    """A file exists but cannot be read: permission, I/O error, a directory, a device."""


@contextmanager
def reading(path: Path) -> Iterator[None]:
    """Turn every fault met while reading ``path`` into one line naming it."""
    try:
        yield
    except FileNotFoundError:
        raise DataError(f"{path}: no such file") from None
    except IsADirectoryError:
        raise UnreadableFileError(f"{path}: is a directory, not a file") from None
    except (gzip.BadGzipFile, EOFError, zlib.error) as exc:
        raise DataError(f"{path}: truncated or corrupt gzip data ({exc})") from None
    except OSError as exc:
        raise UnreadableFileError(f"{path}: cannot read: {exc.strerror or exc}") from None


@contextmanager
def open_content(
    path: str | Path, what: str = "IDX file", max_bytes: int = MAX_IDX_BYTES
) -> Iterator[tuple[BinaryIO, int]]:
    """The file's content as a stream (decompressed if gzip, by its magic bytes) and the
    most content bytes the file can hold (its size; for gzip, the deflate maximum).

    A folder, a FIFO (it would block), a device (it would never end) or a file larger
    than ``max_bytes`` is refused before it is opened (:func:`handprop.files.regular_file`).
    """
    path = Path(path)
    with reading(path):
        size = regular_file(path, what, max_bytes, UnreadableFileError)
        with open(path, "rb") as fh:
            if fh.peek(2)[:2] == GZIP_MAGIC:
                with gzip.GzipFile(fileobj=fh, mode="rb") as gz:
                    yield gz, size * GZIP_MAX_RATIO
            else:
                yield fh, size


def read_at_most(stream: BinaryIO, n: int) -> bytes:
    """Up to ``n`` bytes, fewer only at the end of the stream; never allocates past it."""
    parts, left = [], n
    while left > 0:
        part = stream.read(min(left, CHUNK))
        if not part:
            break
        parts.append(part)
        left -= len(part)
    return b"".join(parts)


def read_into(stream: BinaryIO, n: int) -> bytearray:
    """Up to ``n`` bytes read into one buffer of that size (no second copy)."""
    buf = bytearray(n)
    view, got = memoryview(buf), 0
    while got < n:
        k = stream.readinto(view[got : got + CHUNK])
        if not k:
            break
        got += k
    view.release()
    del buf[got:]
    return buf


def read_bytes(
    path: str | Path,
    limit: int | None = None,
    *,
    what: str = "IDX file",
    max_bytes: int = MAX_IDX_BYTES,
) -> bytes | bytearray:
    """The file's content, decompressed if it is gzip; at most ``limit`` + 1 bytes of it
    (one more than ``limit`` tells the caller there is more). Without a limit, a gzip
    stream is read no further than the memory available (a gzip bomb is refused).
    ``what`` and ``max_bytes`` as for :func:`open_content`."""
    path = Path(path)
    with open_content(path, what, max_bytes) as (stream, most):
        n = most if limit is None else min(most, limit + 1)
        if limit is not None or not isinstance(stream, gzip.GzipFile):
            check_fits(n, f"reading {path}")  # the size is known: refuse it before reading
            return read_into(stream, n)
        available = available_bytes()
        cap = n if available is None else min(n, available // 2 + 1)
        data = read_at_most(stream, cap)  # the parts read, then joined: twice its size
    if available is not None and len(data) > available // 2:
        raise ResourceError(
            f"{path}: decompresses to more than {format_bytes(available // 2)}, more than "
            f"the {format_bytes(available)} of memory available can hold"
        )
    return data


@dataclass(frozen=True)
class IdxHeader:
    """What an IDX header announces."""

    dtype: np.dtype
    dims: tuple[int, ...]

    @property
    def header_bytes(self) -> int:
        return 4 + 4 * len(self.dims)

    @property
    def data_bytes(self) -> int:
        return math.prod(self.dims) * self.dtype.itemsize  # Python ints: no overflow

    @property
    def size(self) -> int:
        """The bytes of the whole (uncompressed) file."""
        return self.header_bytes + self.data_bytes

    @property
    def shape(self) -> str:
        return "x".join(map(str, self.dims))


def parse_header(data: bytes, name: str = "<bytes>") -> IdxHeader:
    """The header at the start of ``data``; every fault is named with ``name``."""
    if len(data) < 4:
        raise DataError(f"{name}: too short for an IDX header ({len(data)} bytes)")
    if data[0] != 0 or data[1] != 0:
        raise DataError(
            f"{name}: bad magic number {bytes(data[:4]).hex()} (an IDX file starts with 00 00)"
        )
    code, ndim = data[2], data[3]
    if code not in IDX_DTYPES:
        raise DataError(
            f"{name}: unknown IDX dtype code 0x{code:02x} "
            f"(known: {', '.join(f'0x{c:02x}' for c in IDX_DTYPES)})"
        )
    if not 1 <= ndim <= MAX_NDIM:
        raise DataError(f"{name}: an IDX file has 1 to {MAX_NDIM} dimensions, got {ndim}")
    header = 4 + 4 * ndim
    if len(data) < header:
        raise DataError(f"{name}: truncated header ({len(data)} bytes for {ndim} dimensions)")
    return IdxHeader(IDX_DTYPES[code], struct.unpack(f">{ndim}I", data[4:header]))


def parse_idx(data: bytes, name: str = "<bytes>") -> np.ndarray:
    """An IDX payload as a native-endian array; every fault is named with ``name``."""
    h = parse_header(data, name)
    _check_length(h, len(data) - h.header_bytes, name)
    arr = np.frombuffer(data, dtype=h.dtype, offset=h.header_bytes).reshape(h.dims)
    return arr.astype(h.dtype.newbyteorder("="), copy=h.dtype.itemsize > 1)


def _check_length(h: IdxHeader, actual: int, name: str) -> None:
    expected = h.data_bytes
    if actual < expected:
        raise DataError(
            f"{name}: truncated: dims {h.shape} need {expected} data bytes, the file has {actual}"
        )
    if actual > expected:
        too_many = "at least " * (actual - expected >= SLACK) + str(actual - expected)
        raise DataError(
            f"{name}: dims {h.shape} need {expected} data bytes, "
            f"the file has {actual} ({too_many} too many)"
        )


def read_header(path: str | Path) -> IdxHeader:
    """The header of an IDX file (raw or gzip), checked against what the file can hold:
    a header claiming more data than that is refused before anything is allocated."""
    path = Path(path)
    with open_content(path) as (stream, most):
        head = read_at_most(stream, 4)
        if len(head) == 4:
            head += read_at_most(stream, 4 * head[3])
        compressed = isinstance(stream, gzip.GzipFile)
    h = parse_header(head, str(path))
    if h.size > most and compressed:
        raise DataError(
            f"{path}: truncated: dims {h.shape} need {h.data_bytes} data bytes, more than "
            f"a gzip file of {most // GZIP_MAX_RATIO} bytes can hold"
        )
    if h.size > most:
        _check_length(h, max(most - h.header_bytes, 0), str(path))
    return h


def read_idx_bytes(path: str | Path) -> bytes:
    """The whole (uncompressed) content of an IDX file, checked against its header."""
    h = read_header(path)
    data = read_bytes(path, h.size + SLACK - 1)
    h = parse_header(data, str(path))  # the same, unless the file changed meanwhile
    _check_length(h, len(data) - h.header_bytes, str(path))
    return data


def read_idx(path: str | Path) -> np.ndarray:
    """Read an IDX file (raw or gzip) into a native-endian array of its dims."""
    return parse_idx(read_idx_bytes(path), str(path))


def idx_bytes(arr: np.ndarray) -> bytes:
    """The IDX encoding of ``arr`` (its dtype must be one IDX knows)."""
    arr = np.asarray(arr)
    match = [
        (code, dt)
        for code, dt in IDX_DTYPES.items()
        if arr.dtype.kind == dt.kind and arr.dtype.itemsize == dt.itemsize
    ]
    if not match:
        raise DataError(f"IDX cannot hold dtype {arr.dtype}")
    code, dtype = match[0]
    if not 1 <= arr.ndim <= MAX_NDIM or max(arr.shape) > 0xFFFFFFFF:
        raise DataError(f"IDX holds 1 to {MAX_NDIM} dimensions below 2**32, got shape {arr.shape}")
    header = bytes([0, 0, code, arr.ndim]) + struct.pack(f">{arr.ndim}I", *arr.shape)
    return header + np.ascontiguousarray(arr, dtype=dtype).tobytes()


def write_idx(path: str | Path, arr: np.ndarray, compress: bool = False) -> None:
    """Write ``arr`` as IDX, gzip-compressed if asked, atomically."""
    data = idx_bytes(arr)
    if compress:
        buf = io.BytesIO()
        # mtime=0: the same array always gives the same bytes (and checksum)
        with gzip.GzipFile(fileobj=buf, mode="wb", mtime=0) as gz:
            gz.write(data)
        data = buf.getvalue()
    atomic_write_bytes(path, data)
