"""The IDX format (MNIST's): magic, dtype code, dims, then big-endian data.

Layout: two zero bytes, one dtype code byte, one byte for the number of dimensions,
one big-endian uint32 per dimension, then the values in C order, big-endian. Files may
be gzip-compressed; that is detected from the first bytes, not from the file name.
"""

from __future__ import annotations

import gzip
import io
import struct
import zlib
from pathlib import Path

import numpy as np

from handprop.atomic import atomic_write_bytes
from handprop.errors import DataError

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


def read_bytes(path: str | Path) -> bytes:
    """The file's content, decompressed if it is gzip (by its magic bytes)."""
    path = Path(path)
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        raise DataError(f"{path}: no such file") from None
    except OSError as exc:
        raise DataError(f"{path}: cannot read ({exc.strerror or exc})") from None
    if raw[:2] != GZIP_MAGIC:
        return raw
    try:
        return gzip.decompress(raw)
    except (EOFError, OSError, zlib.error) as exc:
        raise DataError(f"{path}: truncated or corrupt gzip data ({exc})") from None


def parse_idx(data: bytes, name: str = "<bytes>") -> np.ndarray:
    """An IDX payload as a native-endian array; every fault is named with ``name``."""
    if len(data) < 4:
        raise DataError(f"{name}: too short for an IDX header ({len(data)} bytes)")
    if data[0] != 0 or data[1] != 0:
        raise DataError(
            f"{name}: bad magic number {data[:4].hex()} (an IDX file starts with 00 00)"
        )
    code, ndim = data[2], data[3]
    if code not in IDX_DTYPES:
        raise DataError(
            f"{name}: unknown IDX dtype code 0x{code:02x} "
            f"(known: {', '.join(f'0x{c:02x}' for c in IDX_DTYPES)})"
        )
    header = 4 + 4 * ndim
    if len(data) < header:
        raise DataError(f"{name}: truncated header ({len(data)} bytes for {ndim} dimensions)")
    dims = struct.unpack(f">{ndim}I", data[4:header])
    dtype = IDX_DTYPES[code]
    expected = int(np.prod(dims, dtype=np.int64)) * dtype.itemsize
    actual = len(data) - header
    if actual < expected:
        raise DataError(
            f"{name}: truncated: dims {'x'.join(map(str, dims))} need {expected} data bytes, "
            f"the file has {actual}"
        )
    if actual > expected:
        raise DataError(
            f"{name}: dims {'x'.join(map(str, dims))} need {expected} data bytes, "
            f"the file has {actual} ({actual - expected} too many)"
        )
    arr = np.frombuffer(data, dtype=dtype, offset=header).reshape(dims)
    return arr.astype(dtype.newbyteorder("="), copy=dtype.itemsize > 1)


def read_idx(path: str | Path) -> np.ndarray:
    """Read an IDX file (raw or gzip) into a native-endian array of its dims."""
    return parse_idx(read_bytes(path), str(path))


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
