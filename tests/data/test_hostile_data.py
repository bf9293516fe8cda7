"""Hostile and broken dataset files: each is one DataError naming the file, never a
traceback, a wrong result or a file used unverified (issue 13)."""

import errno
import gzip
import io
import struct
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from conftest import pin_dataset, write_dataset
from handprop import data
from handprop.cli import main
from handprop.data import check_file, idx, idx_bytes, read_csv, read_idx, write_idx
from handprop.data.registry import DATASETS, FileSpec
from handprop.errors import DataError, ResourceError

NAMES = ("train-images-idx3-ubyte", "train-labels-idx1-ubyte")
NAMES += ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")
DEBIAN_FASHION = Path("/usr/share/datasets/fashion-mnist")


def arrays(train=(6, 4, 4), test=(4, 4, 4), n_labels=None, dtype=np.uint8, seed=0):
    rng = np.random.default_rng(seed)
    return dict(
        zip(
            NAMES,
            (
                rng.integers(0, 256, train).astype(dtype),
                rng.integers(0, 10, train[0] if n_labels is None else n_labels, dtype=np.uint8),
                rng.integers(0, 256, test).astype(dtype),
                rng.integers(0, 10, test[0], dtype=np.uint8),
            ),
            strict=True,
        )
    )


def pin(monkeypatch, arrs, name="tiny"):
    return pin_dataset(monkeypatch, name, arrs)


write = write_dataset


@pytest.fixture(autouse=True)
def isolated(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    monkeypatch.delenv("HANDPROP_DATA", raising=False)
    monkeypatch.delenv("HANDPROP_MIRROR", raising=False)
    monkeypatch.delenv("HANDPROP_MEMORY_LIMIT", raising=False)


def cli(*args):
    result = CliRunner().invoke(main, list(map(str, args)))
    assert result.exception is None or isinstance(result.exception, SystemExit)
    return result


# 1. every file pinned by its content; recompressed and uncompressed copies verify


def test_every_file_of_every_dataset_pins_its_content():
    for spec in DATASETS.values():
        for f in spec.files:
            assert len(f.sha256 or "") == 64 and f.size, (spec.name, f.name)


def test_a_recompressed_or_uncompressed_copy_verifies(tmp_path, monkeypatch):
    arrs = arrays()
    spec = pin(monkeypatch, arrs)
    (tmp_path / "re").mkdir()
    for n, a in arrs.items():  # another gzip header (name, mtime) and level, as Debian's
        with gzip.GzipFile(tmp_path / "re" / (n + ".gz"), "wb", 1, mtime=1) as gz:
            gz.write(idx_bytes(a))
    plain = write(tmp_path / "plain", arrs, compress=False)
    for d in (tmp_path / "re", plain):
        ds = data.load_dataset("tiny", d, download=False)
        np.testing.assert_array_equal(ds.images[6:], arrs["t10k-images-idx3-ubyte"])
        for f in spec.files:
            assert check_file(data.find_file(d, f), f)[0] == "OK"


def test_uncompressed_and_unpinned_copies_are_verified_too(tmp_path, monkeypatch):
    arrs = arrays()
    spec = pin(monkeypatch, arrs)
    other = write(tmp_path / "other", arrays(seed=1), compress=False)
    with pytest.raises(DataError, match=r"train-images-idx3-ubyte: not the published tiny file"):
        data.load_dataset("tiny", other, download=False)
    files = (replace(spec.files[0], sha256=None), *spec.files[1:])
    monkeypatch.setitem(DATASETS, "tiny", replace(spec, files=files))
    good = write(tmp_path / "good", arrs, compress=False)
    with pytest.raises(DataError, match="no checksum is pinned for tiny"):
        data.load_dataset("tiny", good, download=False)
    assert check_file(good / NAMES[0], files[0])[0] == "FAIL"


@pytest.mark.skipif(
    not DEBIAN_FASHION.is_dir(),
    reason=f"{DEBIAN_FASHION} absent: apt-get install -y dataset-fashion-mnist",
)
def test_debian_fashion_mnist_is_found_and_accepted():
    ds = data.load_dataset("fashion-mnist", download=False, progress=False)
    assert ds.source == str(DEBIAN_FASHION)
    assert ds.images.shape == (70000, 28, 28) and ds.n_train == 60000
    assert np.bincount(ds.labels[:60000]).tolist() == [6000] * 10
    assert np.bincount(ds.labels[60000:]).tolist() == [1000] * 10
    result = cli("data", "verify", "fashion-mnist")
    assert result.exit_code == 0 and result.output.count("OK ") == 4


# 2. unreadable files: permission, I/O error, a directory named like the file


def failing_open(monkeypatch, victim: Path, err: int, when="open"):
    """Make reading ``victim`` fail with ``err`` (root reads through chmod 000)."""
    real = open

    class Failing(io.RawIOBase):
        def readable(self):
            return True

        def readinto(self, b):
            raise OSError(err, "Input/output error")

    def fake(path, *args, **kwargs):
        if Path(path) == victim:
            if when == "open":
                raise PermissionError(err, "Permission denied", str(path))
            return io.BufferedReader(Failing())
        return real(path, *args, **kwargs)

    monkeypatch.setattr(idx, "open", fake, raising=False)


@pytest.mark.parametrize(
    "err, when, message",
    [(errno.EACCES, "open", "Permission denied"), (errno.EIO, "read", "Input/output error")],
)
def test_an_unreadable_file_is_one_line_naming_it(tmp_path, monkeypatch, err, when, message):
    arrs = arrays()
    pin(monkeypatch, arrs)
    d = write(tmp_path / "d", arrs)
    victim = d / "t10k-images-idx3-ubyte.gz"
    failing_open(monkeypatch, victim, err, when)
    with pytest.raises(DataError, match=f"{victim}: cannot read: {message}"):
        data.load_dataset("tiny", d, download=False)
    result = cli("data", "verify", "tiny", "--data-dir", d)
    assert result.exit_code == 1
    assert f"UNREADABLE {victim}  (cannot read: {message})" in result.stdout
    assert result.stdout.count("OK ") == 3  # every other file still reported
    assert result.stderr == f"handprop: error: 1 of 4 files of tiny in {d} failed verification\n"
    result = cli("data", "info", "--data-dir", d)
    assert result.exit_code == 0 and f"unreadable {victim}: cannot read: {message}" in result.output


def test_a_directory_named_like_the_file(tmp_path, monkeypatch):
    arrs = arrays()
    pin(monkeypatch, arrs)
    d = write(tmp_path / "d", arrs)
    (d / "train-labels-idx1-ubyte.gz").unlink()
    (d / "train-labels-idx1-ubyte.gz").mkdir()
    with pytest.raises(DataError, match="labels-idx1-ubyte.gz: is a folder, expected an IDX file"):
        data.load_dataset("tiny", d, download=False)
    result = cli("data", "verify", "tiny", "--data-dir", d)
    assert result.exit_code == 1 and "UNREADABLE" in result.stdout


def test_verify_reports_every_file_then_fails(tmp_path, monkeypatch):
    arrs = arrays()
    pin(monkeypatch, arrs)
    d = write(tmp_path / "d", arrs)
    (d / "train-images-idx3-ubyte.gz").write_bytes(b"\x1f\x8b not gzip")
    (d / "train-labels-idx1-ubyte.gz").unlink()
    write_idx(d / "t10k-labels-idx1-ubyte.gz", arrays(seed=3)["t10k-labels-idx1-ubyte"], True)
    result = cli("data", "verify", "tiny", "--data-dir", d)
    assert result.exit_code == 1 and "Traceback" not in result.output
    lines = result.stdout.splitlines()
    assert [line.split()[0] for line in lines] == ["FAIL", "MISSING", "OK", "FAIL"]
    assert "corrupt gzip" in lines[0] and "sha256 of the content is" in lines[3]
    assert "3 of 4 files of tiny" in result.stderr


# 3. train and test files that do not fit together


@pytest.mark.parametrize(
    "arrs, message",
    [
        (
            arrays(test=(4, 5, 5)),
            r"t10k-images-idx3-ubyte.gz: test images are 4x5x5, but the training images "
            r"in .*train-images-idx3-ubyte.gz are 6x4x4: they must have the same size",
        ),
        (arrays(n_labels=5), "train-labels-idx1-ubyte.gz: holds 5 labels for the 6 images of"),
        (arrays(train=(0, 4, 4), n_labels=0), r"train-images-idx3-ubyte.gz: holds no images"),
        (arrays(train=(6, 0, 4), test=(4, 0, 4)), "images must be at least 1x1 pixels, got"),
        (arrays(train=(6, 16), test=(4, 16)), r"images must have dims \(n, height, width\)"),
        (arrays(dtype=np.float32), "pixels must be bytes .IDX type 0x08., got float32"),
    ],
)
def test_files_that_do_not_fit_together(tmp_path, monkeypatch, arrs, message):
    pin(monkeypatch, arrs)  # pinned: only the layout is wrong
    with pytest.raises(DataError, match=message):
        data.load_dataset("tiny", write(tmp_path / "d", arrs), download=False)


def test_labels_outside_the_classes(tmp_path, monkeypatch):
    arrs = arrays()
    arrs["t10k-labels-idx1-ubyte"][2] = 12
    pin(monkeypatch, arrs)
    with pytest.raises(DataError, match=r"t10k-labels-idx1-ubyte.gz: labels must lie in \[0, 10\)"):
        data.load_dataset("tiny", write(tmp_path / "d", arrs), download=False)


# 4. IDX header abuse


def header(code, dims):
    return bytes([0, 0, code, len(dims)]) + struct.pack(f">{len(dims)}I", *dims)


@pytest.mark.parametrize("compress", [False, True])
@pytest.mark.parametrize(
    "content, message",
    [
        (header(8, [1] * 255), "an IDX file has 1 to 32 dimensions, got 255"),
        (bytes([0, 0, 8, 0]), "an IDX file has 1 to 32 dimensions, got 0"),
        (header(8, [65536] * 4), "dims 65536x65536x65536x65536 need 18446744073709551616"),
        (header(0x0E, [2**32 - 1] * 3) + b"\0" * 64, "truncated: dims 4294967295x"),
        (b"", "too short for an IDX header .0 bytes."),
        (header(8, [3]) + b"\0" * 3 + b"\0" * (1 << 17), "the file has 65539 .at least 65536 too"),
    ],
    ids=["ndim-255", "ndim-0", "int64-overflow", "float64-huge", "empty", "too-long"],
)
def test_header_abuse_is_refused_before_allocating(tmp_path, content, message, compress):
    path = tmp_path / "x.idx"
    path.write_bytes(gzip.compress(content) if compress else content)
    with pytest.raises(DataError, match=message) as info:
        read_idx(path)
    assert str(path) in str(info.value)


def test_a_gzip_claiming_more_than_it_can_hold(tmp_path):
    path = tmp_path / "x.idx.gz"
    path.write_bytes(gzip.compress(header(8, [100000, 1000])))
    with pytest.raises(
        DataError, match=r"need 100000000 data bytes, more than a gzip file of \d+ bytes can hold"
    ):
        read_idx(path)


def test_a_header_too_big_for_memory_is_a_resource_error(tmp_path, monkeypatch):
    path = tmp_path / "x.idx.gz"
    path.write_bytes(gzip.compress(header(8, [1000, 1000]) + bytes(10**6)))
    monkeypatch.setenv("HANDPROP_MEMORY_LIMIT", "100K")
    with pytest.raises(ResourceError, match=f"reading {path} would need about"):
        read_idx(path)


def test_a_gzip_bomb_is_not_decompressed_past_the_pinned_size(tmp_path):
    path = tmp_path / "bomb.gz"
    path.write_bytes(gzip.compress(idx_bytes(np.zeros(10, np.uint8)) + bytes(1 << 24)))
    f = FileSpec("bomb", sha256="0" * 64, size=18)
    assert check_file(path, f) == ("FAIL", "the content is larger than the published 18 bytes")
    with pytest.raises(DataError, match=r"need 10 data bytes, the file has 65546 \(at least"):
        read_idx(path)


@pytest.mark.parametrize(
    "values, message",
    [
        ([0.0, 1e30], r"x.idx: pixel values must lie in \[0, 255\], got 0..1e\+30"),
        ([np.nan, 3.0], "x.idx: pixel values must be finite numbers, got 1 NaN or inf"),
        ([-1.0, np.inf], "got 1 NaN or inf"),
    ],
)
def test_float_pixels_outside_the_range_are_refused(tmp_path, values, message):
    path = tmp_path / "x.idx"
    write_idx(path, np.array(values, dtype=np.float32).reshape(1, 1, 2))
    with pytest.raises(DataError, match=message):
        data.check_pixels(read_idx(path), str(path))
    data.check_pixels(np.array([[0.0, 255.0]]), "ok")


# 5. CSV labels and cells


def test_a_gzip_bomb_csv_is_refused_at_the_memory_available(tmp_path, monkeypatch):
    path = tmp_path / "m.csv"
    path.write_bytes(gzip.compress(b"1,0,0\n" + b"0" * (1 << 21)))
    monkeypatch.setenv("HANDPROP_MEMORY_LIMIT", "1M")
    with pytest.raises(ResourceError, match=r"m.csv: decompresses to more than 512.0 KiB"):
        read_csv(path)


def test_csv_labels_outside_the_classes(tmp_path):
    path = tmp_path / "m.csv"
    path.write_text("3,0,0\n10,0,0\n")
    with pytest.raises(DataError, match=r"m.csv line 2: a label must lie in \[0, 10\), got 10"):
        read_csv(path, n_classes=10)
    path.write_text("3,0,0\n1" + "0" * 23 + ",0,0\n")
    with pytest.raises(DataError, match="line 2: a label must lie in .0, 65536., got 1000000"):
        read_csv(path)
    path.write_text("7.0,0,0\n")  # a row of numbers is data, not a header to skip
    with pytest.raises(DataError, match="line 1: not an integer: '7.0'"):
        read_csv(path)


# 7. everything else a user may type


def test_cli_misuse_is_one_line(tmp_path):
    result = cli("data", "fetch", "nosuch")
    assert result.exit_code == 1
    assert result.stderr.startswith("handprop: error: unknown dataset 'nosuch'; known: mnist")
    (tmp_path / "f").write_text("x")
    for sub in ("verify", "fetch"):
        result = cli("data", sub, "mnist", "--data-dir", tmp_path / "f")
        assert result.exit_code == 1
        assert (
            result.stderr
            == f"handprop: error: {tmp_path / 'f'}: the data directory is a file, not a folder\n"
        )
    result = cli("data", "info", "--data-dir", tmp_path / "absent")
    assert result.stderr == f"handprop: error: {tmp_path / 'absent'}: no such data directory\n"


def test_an_unusable_cache_folder_is_named(tmp_path, monkeypatch):
    arrs = arrays()
    pin(monkeypatch, arrs)
    (tmp_path / "notadir").write_text("x")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "notadir"))
    with pytest.raises(DataError, match="tiny: cannot create the cache folder: Not a directory"):
        data.fetch_files(DATASETS["tiny"], progress=False)


def test_a_zero_byte_or_not_gzip_file_in_a_dataset(tmp_path, monkeypatch):
    arrs = arrays()
    pin(monkeypatch, arrs)
    d = write(tmp_path / "d", arrs)
    (d / "t10k-labels-idx1-ubyte.gz").write_bytes(b"")
    with pytest.raises(DataError, match="labels-idx1-ubyte.gz: too short for an IDX header"):
        data.load_dataset("tiny", d, download=False)
    (d / "t10k-labels-idx1-ubyte.gz").write_bytes(b"PK\x03\x04 a zip")
    with pytest.raises(DataError, match="labels-idx1-ubyte.gz: bad magic number 504b0304"):
        data.load_dataset("tiny", d, download=False)
