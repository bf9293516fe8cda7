"""Locating, verifying, downloading (from a local server), normalizing and splitting."""

import gzip
import hashlib
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

from conftest import FileServer, mnist_dir
from handprop import data
from handprop.data import fetch, normalize, original_split, standard_split, write_idx
from handprop.data.registry import DATASETS, FileSpec
from handprop.errors import DataError


def make_files(directory: Path, n_train=6, n_test=4, seed=0, compress=True):
    """Tiny MNIST-shaped IDX files; returns their FileSpecs with the right checksums."""
    rng = np.random.default_rng(seed)
    directory.mkdir(parents=True, exist_ok=True)
    arrays = {
        "train-images-idx3-ubyte": rng.integers(0, 256, (n_train, 4, 4), dtype=np.uint8),
        "train-labels-idx1-ubyte": rng.integers(0, 10, n_train, dtype=np.uint8),
        "t10k-images-idx3-ubyte": rng.integers(0, 256, (n_test, 4, 4), dtype=np.uint8),
        "t10k-labels-idx1-ubyte": rng.integers(0, 10, n_test, dtype=np.uint8),
    }
    specs = []
    for name, arr in arrays.items():
        path = directory / (name + (".gz" if compress else ""))
        write_idx(path, arr, compress=compress)
        content = data.idx_bytes(arr)
        specs.append(FileSpec(name, hashlib.sha256(content).hexdigest(), len(content)))
    return tuple(specs), arrays


@pytest.fixture
def tiny(tmp_path, monkeypatch):
    """A registered dataset 'tiny' whose pinned checksums match files made here."""
    src = tmp_path / "served"
    specs, arrays = make_files(src)
    spec = replace(DATASETS["mnist"], name="tiny", files=specs, mirrors=(), system_dirs=())
    monkeypatch.setitem(DATASETS, "tiny", spec)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    monkeypatch.delenv("HANDPROP_DATA", raising=False)
    monkeypatch.delenv("HANDPROP_MIRROR", raising=False)
    return src, arrays


def test_load_from_an_explicit_directory(tiny):
    src, arrays = tiny
    ds = data.load_dataset("tiny", src, progress=False)
    assert ds.images.shape == (10, 4, 4) and ds.n_train == 6 and ds.pixel_max == 255
    np.testing.assert_array_equal(ds.images[:6], arrays["train-images-idx3-ubyte"])
    np.testing.assert_array_equal(ds.labels[6:], arrays["t10k-labels-idx1-ubyte"])
    assert ds.labels.dtype == np.int64 and ds.source == str(src)


def test_locate_order_env_then_cache(tiny, tmp_path, monkeypatch):
    src, _ = tiny
    cache = tmp_path / "cache" / "handprop" / "tiny"
    make_files(cache)
    assert data.load_dataset("tiny", progress=False).source == str(cache)
    monkeypatch.setenv("HANDPROP_DATA", str(src))
    assert data.load_dataset("tiny", progress=False).source == str(src)
    nested = tmp_path / "root"
    make_files(nested / "tiny")
    monkeypatch.setenv("HANDPROP_DATA", str(nested))
    assert data.load_dataset("tiny", progress=False).source == str(nested / "tiny")


def test_cache_dir_honours_xdg(monkeypatch, tmp_path):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "x"))
    assert fetch.cache_dir("mnist") == tmp_path / "x" / "handprop" / "mnist"
    monkeypatch.delenv("XDG_CACHE_HOME")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert fetch.cache_dir("mnist") == tmp_path / "home" / ".cache" / "handprop" / "mnist"


def test_an_explicit_directory_without_the_files_is_an_error(tiny, tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="does not hold the tiny files"):
        data.load_dataset("tiny", tmp_path / "empty", progress=False)
    with pytest.raises(DataError, match="absent: no such data directory"):
        data.load_dataset("tiny", tmp_path / "absent", progress=False)
    (tmp_path / "file").write_text("x")
    with pytest.raises(DataError, match="file: the data directory is a file, not a folder"):
        data.load_dataset("tiny", tmp_path / "file", progress=False)


def test_files_failing_their_checksum_are_refused(tiny, tmp_path):
    other = tmp_path / "other"
    make_files(other, seed=1)  # same names, other content
    with pytest.raises(DataError, match="not the published tiny file: sha256"):
        data.load_dataset("tiny", other, progress=False)


@pytest.fixture
def server(tiny):
    s = FileServer(tiny[0])
    yield s
    s.close()


def test_download_verifies_and_caches(tiny, server, tmp_path, monkeypatch):
    monkeypatch.setenv("HANDPROP_MIRROR", server.url)
    ds = data.load_dataset("tiny", progress=False)
    cache = tmp_path / "cache" / "handprop" / "tiny"
    assert ds.source == str(cache)
    assert sorted(p.name for p in cache.iterdir()) == sorted(
        f.name + ".gz" for f in DATASETS["tiny"].files
    )


def test_a_corrupted_download_is_rejected_and_not_kept(tiny, server, tmp_path, monkeypatch):
    src, _ = tiny
    target = src / "t10k-images-idx3-ubyte.gz"
    raw = bytearray(gzip.decompress(target.read_bytes()))
    raw[-1] ^= 0xFF  # one flipped pixel: a valid IDX file with the wrong content
    target.write_bytes(gzip.compress(bytes(raw)))
    monkeypatch.setenv("HANDPROP_MIRROR", server.url)
    with pytest.raises(DataError, match="failed verification: sha256"):
        data.load_dataset("tiny", progress=False)
    cache = tmp_path / "cache" / "handprop" / "tiny"
    names = {p.name for p in cache.iterdir()}
    assert "t10k-images-idx3-ubyte.gz" not in names
    assert not [n for n in names if n.endswith(".part")]  # no temporary left behind


def test_a_gzip_bomb_download_is_refused_unexpanded(tiny, server, tmp_path, monkeypatch):
    src, _ = tiny
    target = src / "t10k-labels-idx1-ubyte.gz"
    target.write_bytes(gzip.compress(gzip.decompress(target.read_bytes()) + bytes(1 << 24)))
    monkeypatch.setenv("HANDPROP_MIRROR", server.url)
    with pytest.raises(DataError, match="failed verification: the content is larger than the"):
        data.load_dataset("tiny", progress=False)
    cache = tmp_path / "cache" / "handprop" / "tiny"
    assert not (cache / "t10k-labels-idx1-ubyte.gz").exists()


def test_no_network_lists_the_ways_to_provide_the_data(tiny, monkeypatch):
    import socket

    with socket.socket() as s:  # a port with nothing listening
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    monkeypatch.setenv("HANDPROP_MIRROR", f"http://127.0.0.1:{port}/")
    with pytest.raises(DataError) as info:
        data.load_dataset("tiny", progress=False)
    message = str(info.value)
    for way in ("--data-dir", "HANDPROP_DATA", "handprop data fetch tiny", "cache"):
        assert way in message
    with pytest.raises(DataError, match="downloading is off"):
        data.load_dataset("tiny", download=False)


def test_unknown_dataset():
    with pytest.raises(DataError, match="unknown dataset 'cifar'; known: mnist, fashion-mnist"):
        data.load_dataset("cifar")


def test_digits_is_always_available():
    ds = data.load_dataset("digits")
    assert ds.images.shape == (1797, 8, 8) and ds.pixel_max == 16 and ds.n_train is None
    assert np.bincount(ds.labels).min() > 170


def test_normalize_is_float32_in_unit_range(rng):
    images = rng.integers(0, 256, size=(5, 4, 4)).astype(np.uint8)
    images[0, 0, 0], images[0, 0, 1] = 0, 255
    X = normalize(images, 255)
    assert X.dtype == np.float32 and X.shape == (5, 16)
    assert X.min() == 0 and X.max() == 1
    assert normalize(images, 255, dtype=np.float64).dtype == np.float64


def test_original_split_is_seeded_and_counts_are_checked():
    train, test = original_split(100, 50, 30, 20, seed=4)
    assert len(train) == 30 and len(test) == 20
    assert set(train) | set(test) == set(range(50))
    again = original_split(100, 50, 30, 20, seed=4)
    np.testing.assert_array_equal(train, again[0])
    assert not np.array_equal(train, original_split(100, 50, 30, 20, seed=5)[0])
    perm = np.random.default_rng(4).permutation(50)
    np.testing.assert_array_equal(test, perm[30:50])
    with pytest.raises(DataError, match="total = 200 samples asked, but the dataset holds 100"):
        original_split(100, 200, 10, 10, 0)
    with pytest.raises(DataError, match="must not exceed total"):
        original_split(100, 50, 40, 20, 0)
    with pytest.raises(DataError, match="test must be a positive integer"):
        original_split(100, 50, 40, 0, 0)


def test_standard_split(tiny):
    ds = data.load_dataset("tiny", tiny[0])
    train, test = standard_split(ds)
    assert train.tolist() == list(range(6)) and test.tolist() == list(range(6, 10))
    with pytest.raises(DataError, match="no official train/test split"):
        standard_split(data.load_dataset("digits"))


MNIST = mnist_dir()  # HANDPROP_TEST_MNIST only: never guessed


@pytest.mark.slow
@pytest.mark.mnist
def test_real_mnist():
    ds = data.load_dataset("mnist", MNIST, progress=False)
    assert ds.images.shape == (70000, 28, 28) and ds.n_train == 60000
    train_counts = np.bincount(ds.labels[:60000])
    test_counts = np.bincount(ds.labels[60000:])
    assert train_counts.tolist() == [5923, 6742, 5958, 6131, 5842, 5421, 5918, 6265, 5851, 5949]
    assert test_counts.tolist() == [980, 1135, 1032, 1010, 982, 892, 958, 1028, 974, 1009]
    for f in data.DATASETS["mnist"].files:
        content = data.idx.read_bytes(MNIST / (f.name + ".gz"))
        assert hashlib.sha256(content).hexdigest() == f.sha256
