"""IDX and CSV readers on small files made here; every malformed file named with its fault."""

import gzip
import struct

import numpy as np
import pytest

from handprop.data import idx_bytes, read_csv, read_idx, write_idx
from handprop.errors import DataError


@pytest.mark.parametrize("compress", [False, True])
@pytest.mark.parametrize("dtype", [np.uint8, np.int8, np.int16, np.int32, np.float32, np.float64])
def test_idx_round_trip(tmp_path, rng, compress, dtype):
    arr = (rng.uniform(0, 100, size=(5, 3, 4))).astype(dtype)
    path = tmp_path / "x.idx"
    write_idx(path, arr, compress=compress)
    assert (path.read_bytes()[:2] == b"\x1f\x8b") == compress
    back = read_idx(path)
    assert back.dtype == np.dtype(dtype) and back.dtype.isnative
    np.testing.assert_array_equal(back, arr)


def test_gzip_is_detected_from_the_bytes_not_the_name(tmp_path):
    labels = np.arange(10, dtype=np.uint8)
    (tmp_path / "labels.gz").write_bytes(idx_bytes(labels))  # raw despite .gz
    (tmp_path / "labels.raw").write_bytes(gzip.compress(idx_bytes(labels)))  # gzip, no .gz
    np.testing.assert_array_equal(read_idx(tmp_path / "labels.gz"), labels)
    np.testing.assert_array_equal(read_idx(tmp_path / "labels.raw"), labels)


def test_header_layout_is_the_canonical_one():
    data = idx_bytes(np.zeros((2, 3), dtype=np.uint8))
    assert data[:4] == b"\x00\x00\x08\x02"
    assert struct.unpack(">2I", data[4:12]) == (2, 3)
    assert len(data) == 12 + 6


def bad(tmp_path, data, name="bad-idx"):
    path = tmp_path / name
    path.write_bytes(data)
    return path


GOOD = idx_bytes(np.arange(24, dtype=np.uint8).reshape(2, 3, 4))


@pytest.mark.parametrize(
    "data, message",
    [
        (b"\x08\x03" + GOOD[2:], "bad magic number 0803"),
        (GOOD[:2] + b"\x07" + GOOD[3:], "unknown IDX dtype code 0x07"),
        (GOOD[:-5], "truncated: dims 2x3x4 need 24 data bytes, the file has 19"),
        (GOOD + b"\x00\x00", "the file has 26 \\(2 too many\\)"),
        (GOOD[:9], "truncated header"),
        (b"\x00", "too short"),
        (gzip.compress(GOOD)[:-12], "truncated or corrupt gzip"),
    ],
)
def test_bad_idx_files_are_refused_with_the_file_and_fault(tmp_path, data, message):
    path = bad(tmp_path, data)
    with pytest.raises(DataError, match=message) as info:
        read_idx(path)
    assert str(path) in str(info.value)


def test_missing_idx_file(tmp_path):
    with pytest.raises(DataError, match="no such file"):
        read_idx(tmp_path / "absent")


def test_csv_with_and_without_header(tmp_path, rng):
    pixels = rng.integers(0, 256, size=(3, 784))
    labels = np.array([7, 2, 1])
    rows = [",".join(map(str, [lab, *pix])) for lab, pix in zip(labels, pixels, strict=True)]
    header = "label," + ",".join(f"{i}x{j}" for i in range(1, 29) for j in range(1, 29))
    for text in ("\n".join(rows), "\n".join([header, *rows]) + "\n"):
        (tmp_path / "m.csv").write_text(text)
        y, X = read_csv(tmp_path / "m.csv")
        np.testing.assert_array_equal(y, labels)
        assert X.shape == (3, 28, 28) and X.dtype == np.uint8
        np.testing.assert_array_equal(X.reshape(3, -1), pixels)


@pytest.mark.parametrize(
    "lines, message",
    [
        (["1,0,0,0,0", "2,0,0,0"], "line 2: expected 5 columns"),
        (["label,a,b,c,d", "1,0,0,0,0", "2,0,x,0,0"], "line 3: not an integer: 'x'"),
        (["1,0,0,0,300"], r"line 1: pixel values must lie in \[0, 255\]"),
        (["-1,0,0,0,0"], r"line 1: a label must lie in \[0, 65536\), got -1"),
        (["1,0,0,0,0", "100000000000000000000000,0,0,0,0"], "line 2: a label must lie in"),
        (["7.5,0,0,0,0"], "line 1: not an integer: '7.5'"),
        (["1,0,0,0,0", "1,0,1e30,0,0"], "line 2: not an integer: '1e30'"),
        (["1,0,0,0,0", "1,0,99999999999999999999999,0,0"], "line 2: pixel values must lie"),
        (["1,0,0,0,0", "1,0,,0,0"], "line 2: not an integer: ''"),
        (["1,0,0,0,0", "1,0,\u00b2,0,0"], "line 2: not an integer: '\u00b2'"),
        (["1,0,0,0,0", "1,0," + "9" * 5000 + ",0,0"], "line 2: not an integer: '9999.*\\.\\.\\.'"),
        (["label,a,b"], "no data rows"),
    ],
)
def test_malformed_csv_rows_are_refused_with_their_line(tmp_path, lines, message):
    (tmp_path / "m.csv").write_text("\n".join(lines) + "\n")
    with pytest.raises(DataError, match=message):
        read_csv(tmp_path / "m.csv")
