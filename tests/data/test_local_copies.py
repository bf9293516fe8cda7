"""A copy of a dataset on disk (issue 26): `handprop data fetch NAME --data-dir DIR` puts
it into the cache, verified (item 4); `handprop data info --data-dir DIR` reports each
dataset's copy in the lookup order, and a folder holding one dataset's files is not an
invalid copy of another that shares their names, as Fashion-MNIST does MNIST's (item 5)."""

import errno
import os
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from conftest import mnist_dir, pin_dataset, write_dataset
from handprop import data
from handprop.cli import main
from handprop.data import write_idx
from handprop.errors import DataError

NAMES = ("train-images-idx3-ubyte", "train-labels-idx1-ubyte")
NAMES += ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")


def arrays(seed):
    rng = np.random.default_rng(seed)
    shapes = ((6, 4, 4), (6,), (4, 4, 4), (4,))
    return {n: rng.integers(0, 10, s, dtype=np.uint8) for n, s in zip(NAMES, shapes, strict=True)}


def register(monkeypatch, name, arrs, system_dirs=()):
    return pin_dataset(monkeypatch, name, arrs, system_dirs)


write = write_dataset


def cli(*args):
    result = CliRunner().invoke(main, list(map(str, args)))
    assert result.exception is None or isinstance(result.exception, SystemExit)
    assert "Traceback" not in result.output
    return result


@pytest.fixture
def cache(tmp_path, monkeypatch):
    """The user cache under tmp_path; nothing else to find the data through."""
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    monkeypatch.delenv("HANDPROP_DATA", raising=False)
    monkeypatch.delenv("HANDPROP_MIRROR", raising=False)
    monkeypatch.delenv("HANDPROP_MEMORY_LIMIT", raising=False)
    return tmp_path / "xdg" / "handprop"


@pytest.fixture
def tiny(cache, tmp_path, monkeypatch):
    """'tiny' registered, its files in tmp_path/src; returns (src, the cache folder)."""
    arrs = arrays(0)
    register(monkeypatch, "tiny", arrs)
    return write(tmp_path / "src", arrs), cache / "tiny"


def cached(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in folder.iterdir()} if folder.is_dir() else {}


# item 4: fetch --data-dir copies into the cache


@pytest.mark.parametrize("compress", [True, False])
def test_fetch_data_dir_copies_verified_files_then_verify_says_ok(
    tmp_path, cache, monkeypatch, compress
):
    arrs = arrays(0)
    register(monkeypatch, "tiny", arrs)
    src = write(tmp_path / "src", arrs, compress)
    result = cli("data", "fetch", "tiny", "--data-dir", src)
    assert result.exit_code == 0, result.output
    assert result.stdout == (
        f"tiny: copied 4 files from {src} into {cache / 'tiny'}, "
        "each verified (sha256 of the content)\n"
    )
    names = [n + ".gz" * compress for n in NAMES]
    assert cached(cache / "tiny") == {n: (src / n).read_bytes() for n in names}
    result = cli("data", "verify", "tiny")
    assert result.exit_code == 0, result.output
    assert result.stdout.splitlines() == [
        f"OK         {cache / 'tiny' / n}  (sha256 of the content matches)" for n in names
    ]
    assert data.load_dataset("tiny", download=False).source == str(cache / "tiny")


def test_a_verified_copy_in_the_cache_is_kept(tiny):
    src, target = tiny
    assert cli("data", "fetch", "tiny", "--data-dir", src).exit_code == 0
    before = {p.name: p.stat().st_ino for p in target.iterdir()}
    result = cli("data", "fetch", "tiny", "--data-dir", src)
    assert result.exit_code == 0
    assert result.stdout == f"tiny: a verified copy is already in {target}; nothing copied\n"
    assert {p.name: p.stat().st_ino for p in target.iterdir()} == before
    # the cache given as --data-dir: nothing to copy either
    result = cli("data", "fetch", "tiny", "--data-dir", target)
    assert result.stdout == f"tiny: a verified copy is already in {target}; nothing copied\n"


def test_only_the_files_missing_from_the_cache_are_copied(tiny):
    src, target = tiny
    target.mkdir(parents=True)
    plain = NAMES[1]
    write_idx(target / plain, arrays(0)[plain], compress=False)  # verified, uncompressed
    result = cli("data", "fetch", "tiny", "--data-dir", src)
    assert result.exit_code == 0
    assert f"copied 3 files from {src} into {target} (1 already there)" in result.stdout
    assert sorted(cached(target)) == sorted([plain] + [n + ".gz" for n in NAMES if n != plain])


def test_a_copy_failing_verification_is_one_line_and_nothing_is_copied(tiny):
    src, target = tiny
    bad = src / "t10k-images-idx3-ubyte.gz"
    write_idx(bad, arrays(1)["t10k-images-idx3-ubyte"], compress=True)
    result = cli("data", "fetch", "tiny", "--data-dir", src)
    assert result.exit_code == 1 and result.stdout == ""
    assert result.stderr.startswith(f"handprop: error: {bad}: not the published tiny file: ")
    assert result.stderr.endswith("; nothing was copied into the cache\n")
    assert result.stderr.count("\n") == 1
    assert cached(target) == {}


def test_a_file_in_the_cache_failing_verification_is_replaced(tiny):
    """The cache is handprop's own: a file there that fails verification is replaced by
    a verified copy, renamed over it (issue 27; it used to be left, and refused)."""
    src, target = tiny
    target.mkdir(parents=True)
    bad = target / "train-labels-idx1-ubyte.gz"
    bad.write_bytes(b"a truncated download")
    elsewhere = target.parent / "kept"
    os.link(bad, elsewhere)  # renamed over, never written into: this link keeps its bytes
    result = cli("data", "fetch", "tiny", "--data-dir", src)
    assert result.exit_code == 0, result.output
    assert result.stdout == (
        f"tiny: copied 4 files from {src} into {target} (1 replacing a file that failed "
        "verification), each verified (sha256 of the content)\n"
    )
    assert cached(target) == {p.name: p.read_bytes() for p in src.iterdir()}
    assert elsewhere.read_bytes() == b"a truncated download"
    assert cli("data", "verify", "tiny").stdout.count("OK ") == 4


def test_a_link_or_folder_in_the_cache_failing_verification_is_left_alone(tiny, tmp_path):
    src, target = tiny
    target.mkdir(parents=True)
    theirs = tmp_path / "theirs"
    theirs.write_bytes(b"someone else's")
    link = target / "train-labels-idx1-ubyte.gz"
    link.symlink_to(theirs)
    result = cli("data", "fetch", "tiny", "--data-dir", src)
    assert result.exit_code == 1
    assert result.stderr.startswith(
        f"handprop: error: {link}: already in the cache but not the published tiny file ("
    )
    assert result.stderr.endswith(
        "it is not a regular file, so it is left as it is: move it away, then fetch again\n"
    )
    assert link.is_symlink() and theirs.read_bytes() == b"someone else's"
    assert sorted(cached(target)) == [link.name]  # nothing else copied either
    link.unlink()
    link.mkdir()
    result = cli("data", "fetch", "tiny", "--data-dir", src)
    assert result.exit_code == 1 and "it is left as it is" in result.stderr
    assert link.is_dir()


def test_a_link_at_the_destination_is_never_replaced(tiny):
    src, target = tiny
    target.mkdir(parents=True)
    dangling = target / "t10k-labels-idx1-ubyte.gz"
    dangling.symlink_to(target / "nowhere")  # not found as the file, still not to replace
    result = cli("data", "fetch", "tiny", "--data-dir", src)
    assert result.exit_code == 1
    assert f"{dangling}: already exists and is not a verified copy" in result.stderr
    assert dangling.is_symlink() and os.readlink(dangling) == str(target / "nowhere")
    assert not [p for p in target.iterdir() if p.name.endswith(".part")]


def test_an_unwritable_cache_is_one_line(tiny, monkeypatch):
    src, target = tiny

    def refuse(*args, **kwargs):
        raise PermissionError(errno.EACCES, "Permission denied")

    monkeypatch.setattr(data.fetch.tempfile, "mkstemp", refuse)
    result = cli("data", "fetch", "tiny", "--data-dir", src)
    assert result.exit_code == 1 and result.stdout == ""
    assert result.stderr == (
        f"handprop: error: {target}: cannot write train-images-idx3-ubyte.gz into the "
        "cache folder: Permission denied\n"
    )


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes through chmod 0500")
def test_a_read_only_cache_folder_is_one_line(tiny):
    src, target = tiny
    target.mkdir(parents=True)
    target.chmod(0o500)
    try:
        result = cli("data", "fetch", "tiny", "--data-dir", src)
    finally:
        target.chmod(0o700)
    assert result.exit_code == 1
    assert "cannot write train-images-idx3-ubyte.gz into the cache folder" in result.stderr


def test_a_cache_that_is_a_file_is_one_line(tiny, tmp_path, monkeypatch):
    src, _ = tiny
    (tmp_path / "afile").write_text("x")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "afile"))
    result = cli("data", "fetch", "tiny", "--data-dir", src)
    assert result.exit_code == 1
    assert result.stderr == (
        f"handprop: error: {tmp_path / 'afile' / 'handprop' / 'tiny'}: "
        "cannot create the cache folder: Not a directory\n"
    )


def test_a_copy_cut_short_leaves_no_file(tiny, monkeypatch):
    src, target = tiny

    def full(fd):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "fsync", full)
    result = cli("data", "fetch", "tiny", "--data-dir", src)
    assert result.exit_code == 1
    assert "cannot write train-images-idx3-ubyte.gz into the cache folder: No space" in (
        result.stderr
    )
    assert cached(target) == {}  # no temporary, no half-written file


def test_fetch_data_dir_honours_home_without_xdg(tiny, tmp_path, monkeypatch):
    src, _ = tiny
    monkeypatch.delenv("XDG_CACHE_HOME")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert cli("data", "fetch", "tiny", "--data-dir", src).exit_code == 0
    target = tmp_path / "home" / ".cache" / "handprop" / "tiny"
    assert sorted(cached(target)) == sorted(n + ".gz" for n in NAMES)


def test_fetch_data_dir_without_the_files(tiny, tmp_path):
    (tmp_path / "empty").mkdir()
    result = cli("data", "fetch", "tiny", "--data-dir", tmp_path / "empty")
    assert result.exit_code == 1
    assert f"{tmp_path / 'empty'}: does not hold the tiny files" in result.stderr


# item 5: another dataset's files are not an invalid copy


@pytest.fixture
def twins(cache, tmp_path, monkeypatch):
    """'tiny' and 'twin' share their file names, as MNIST and Fashion-MNIST do; twin's
    copy is installed in its system folder. Returns (tiny's folder, twin's)."""
    register(monkeypatch, "tiny", arrays(0))
    system = write(tmp_path / "usr-share-twin", arrays(1))
    register(monkeypatch, "twin", arrays(1), system_dirs=(str(system),))
    return write(tmp_path / "tiny-files", arrays(0)), system


def lines_of(output: str, name: str) -> list[str]:
    """The lines `data info` prints for dataset ``name`` (its line, notes, description)."""
    lines = output.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith(name + " "))
    end = next((i for i in range(start + 1, len(lines)) if lines[i][:1] != " "), len(lines))
    return lines[start:end]


def test_info_does_not_call_another_datasets_files_invalid(twins):
    tiny_dir, system = twins
    result = cli("data", "info", "--data-dir", tiny_dir)
    assert result.exit_code == 0, result.output
    assert "invalid" not in result.output
    tiny = lines_of(result.output, "tiny")
    assert tiny[0].split()[:3] == ["tiny", "available", str(tiny_dir)]
    assert "[--data-dir," in tiny[0]
    twin = lines_of(result.output, "twin")
    assert twin[0].split()[:4] == ["twin", "available", str(system), "[system,"]
    assert twin[1].strip() == f"(passed over {tiny_dir}: its files are tiny's, not twin's)"


def test_info_data_dir_holding_both_in_subfolders(twins):
    tiny_dir, _ = twins
    write(tiny_dir / "twin", arrays(1))
    twin = lines_of(cli("data", "info", "--data-dir", tiny_dir).output, "twin")
    assert twin[0].split()[:4] == ["twin", "available", str(tiny_dir / "twin"), "[--data-dir,"]


def test_info_still_reports_an_invalid_copy_of_the_dataset(twins):
    tiny_dir, _ = twins
    write_idx(tiny_dir / "t10k-images-idx3-ubyte.gz", arrays(2)["t10k-images-idx3-ubyte"])
    tiny = lines_of(cli("data", "info", "--data-dir", tiny_dir).output, "tiny")
    assert tiny[0].split()[:3] == ["tiny", "invalid", f"{tiny_dir / 't10k-images-idx3-ubyte.gz'}:"]


def test_loading_passes_over_another_datasets_folder_as_info_does(twins, monkeypatch):
    tiny_dir, system = twins
    monkeypatch.setenv("HANDPROP_DATA", str(tiny_dir))
    assert data.load_dataset("twin", download=False).source == str(system)
    assert data.load_dataset("tiny", download=False).source == str(tiny_dir)
    twin = lines_of(cli("data", "info").output, "twin")
    assert twin[0].split()[:4] == ["twin", "available", str(system), "[system,"]
    with pytest.raises(DataError, match=f"^{tiny_dir}: holds the tiny files, not twin's$"):
        data.load_dataset("twin", tiny_dir, download=False)
    result = cli("data", "verify", "twin", "--data-dir", tiny_dir)
    assert result.exit_code == 1 and result.stdout.count("FAIL ") == 4
    assert result.stderr.endswith("failed verification: it holds the tiny files\n")


# the real thing, where it is there

MNIST = str(mnist_dir())  # HANDPROP_TEST_MNIST only: never guessed
DEBIAN_FASHION = Path("/usr/share/datasets/fashion-mnist")


@pytest.mark.mnist
def test_real_mnist_fetched_from_a_folder_and_info_beside_debian_fashion(cache):
    result = cli("data", "fetch", "mnist", "--data-dir", MNIST)
    assert result.exit_code == 0 and "copied 4 files" in result.stdout
    result = cli("data", "verify", "mnist")
    assert result.exit_code == 0 and result.stdout.count("OK ") == 4
    assert str(cache / "mnist") in result.stdout
    result = cli("data", "info", "--data-dir", MNIST)
    assert "invalid" not in result.output
    fashion = lines_of(result.output, "fashion-mnist")
    if DEBIAN_FASHION.is_dir():
        assert fashion[0].split()[:3] == ["fashion-mnist", "available", str(DEBIAN_FASHION)]
    assert f"(passed over {MNIST}: its files are mnist's, not fashion-mnist's)" in result.output
