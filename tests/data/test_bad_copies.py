"""A copy of a dataset that fails verification (issue 27, class 3) and a cache that
cannot be written (class 4).

A truncated copy in the cache shadowed Debian's good one: training refused though a
verified copy existed, and `handprop data fetch` could not repair the cache. A copy in
the lookup order that fails verification is now skipped, saying so, for the next place;
`handprop data fetch NAME` replaces the bad cached files (the cache is handprop's own).
"""

import errno
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from conftest import FileServer, pin_dataset, write_dataset
from handprop import data
from handprop.cli import main
from handprop.data import fetch, write_idx
from handprop.errors import DataError

NAMES = ("train-images-idx3-ubyte", "train-labels-idx1-ubyte")
NAMES += ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")
DEBIAN_FASHION = Path("/usr/share/datasets/fashion-mnist")


def arrays(seed):
    rng = np.random.default_rng(seed)
    shapes = ((6, 4, 4), (6,), (4, 4, 4), (4,))
    return {n: rng.integers(0, 10, s, dtype=np.uint8) for n, s in zip(NAMES, shapes, strict=True)}


def cli(*args, **env):
    result = CliRunner().invoke(main, list(map(str, args)), env=env or None)
    assert result.exception is None or isinstance(result.exception, SystemExit)
    assert "Traceback" not in result.output
    return result


def truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[:20])


@pytest.fixture
def places(tmp_path, monkeypatch):
    """'tiny' registered with a system folder holding a good copy, and a copy in the
    user cache; returns (cache copy, system copy)."""
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    for var in ("HANDPROP_DATA", "HANDPROP_MIRROR", "HANDPROP_MEMORY_LIMIT"):
        monkeypatch.delenv(var, raising=False)
    system = write_dataset(tmp_path / "usr-share-tiny", arrays(0))
    pin_dataset(monkeypatch, "tiny", arrays(0), system_dirs=(str(system),))
    cache = write_dataset(tmp_path / "xdg" / "handprop" / "tiny", arrays(0))
    return cache, system


def test_a_truncated_cached_copy_is_skipped_for_the_system_copy(places, capsys):
    cache, system = places
    truncate(cache / "train-images-idx3-ubyte.gz")
    ds = data.load_dataset("tiny", download=False)
    assert ds.source == str(system)
    np.testing.assert_array_equal(ds.images[:6], arrays(0)["train-images-idx3-ubyte"])
    err = capsys.readouterr().err
    assert err.startswith(
        f"handprop: skipped {cache}: its train-images-idx3-ubyte.gz fails verification "
        "(truncated or corrupt gzip data"
    )
    assert err.count("\n") == 1


def test_a_cached_copy_of_other_content_is_skipped_too(places, capsys):
    cache, system = places
    write_idx(cache / "t10k-labels-idx1-ubyte.gz", arrays(1)["t10k-labels-idx1-ubyte"], True)
    assert data.load_dataset("tiny", download=False).source == str(system)
    err = capsys.readouterr().err
    assert err.startswith(f"handprop: skipped {cache}: its t10k-labels-idx1-ubyte.gz fails ")
    assert "sha256 of the content is" in err


def test_a_good_cached_copy_is_used_and_nothing_said(places, capsys):
    cache, _ = places
    assert data.load_dataset("tiny", download=False).source == str(cache)
    assert capsys.readouterr().err == ""


def test_a_bad_handprop_data_copy_is_skipped_for_the_cache(places, tmp_path, monkeypatch, capsys):
    cache, _ = places
    env = write_dataset(tmp_path / "env", arrays(0))
    (env / "t10k-images-idx3-ubyte.gz").write_bytes(b"")
    monkeypatch.setenv("HANDPROP_DATA", str(env))
    assert data.load_dataset("tiny", download=False).source == str(cache)
    assert capsys.readouterr().err.startswith(f"handprop: skipped {env}: its t10k-images")


def test_when_no_copy_verifies_the_first_ones_fault_is_the_error(places, capsys):
    cache, system = places
    truncate(cache / "train-images-idx3-ubyte.gz")
    truncate(system / "train-labels-idx1-ubyte.gz")
    with pytest.raises(DataError) as err:
        data.load_dataset("tiny")  # downloading on: still no download over a bad copy
    message = str(err.value)
    assert message.startswith(f"{cache / 'train-images-idx3-ubyte.gz'}: ")
    assert "`handprop data fetch tiny` to download a verified copy into the cache" in message
    assert capsys.readouterr().err == ""  # nothing was skipped for another


def test_a_bad_copy_in_data_dir_is_refused_not_skipped(places):
    _, system = places
    truncate(system / "train-images-idx3-ubyte.gz")
    with pytest.raises(DataError, match=r"train-images-idx3-ubyte.gz: truncated or corrupt"):
        data.load_dataset("tiny", system, download=False)


def test_info_and_verify_pass_over_a_bad_cached_copy(places):
    cache, system = places
    truncate(cache / "train-images-idx3-ubyte.gz")
    lines = cli("data", "info").output.splitlines()
    line, note = lines[next(i for i, x in enumerate(lines) if x.startswith("tiny ")) :][:2]
    assert line.split()[:4] == ["tiny", "available", str(system), "[system,"]
    assert note.strip().startswith(
        f"(passed over {cache}: its train-images-idx3-ubyte.gz fails verification (truncated"
    )
    result = cli("data", "verify", "tiny")
    assert result.exit_code == 0 and result.stdout.count("OK ") == 4
    assert str(system) in result.stdout and str(cache) not in result.stdout
    assert result.stderr.startswith(f"handprop: skipped {cache}: its train-images")
    # no verified copy anywhere: verify checks the first, and fails
    truncate(system / "train-images-idx3-ubyte.gz")
    result = cli("data", "verify", "tiny")
    assert result.exit_code == 1 and str(cache / "train-images-idx3-ubyte.gz") in result.stdout
    result = cli("data", "info")
    tiny = next(x for x in result.output.splitlines() if x.startswith("tiny "))
    assert tiny.split()[:3] == ["tiny", "invalid", f"{cache / 'train-images-idx3-ubyte.gz'}:"]


def test_fetch_repairs_the_cache_from_the_verified_copy(places):
    cache, system = places
    bad = cache / "train-images-idx3-ubyte.gz"
    truncate(bad)
    before = {p.name: p.stat().st_ino for p in cache.iterdir()}
    result = cli("data", "fetch", "tiny")
    assert result.exit_code == 0, result.output
    lines = result.stdout.splitlines()
    assert lines[0].startswith(
        f"tiny: {cache}: its train-images-idx3-ubyte.gz fails verification (truncated"
    )
    assert lines[0].endswith(
        f"; replaced train-images-idx3-ubyte.gz with a verified copy from {system}"
    )
    assert lines[1] == f"tiny: 10 samples (6 train) in {cache}"
    assert bad.read_bytes() == (system / bad.name).read_bytes()
    after = {p.name: p.stat().st_ino for p in cache.iterdir()}
    assert after.keys() == before.keys()  # no temporary file left, nothing else added
    assert [n for n in after if after[n] != before[n]] == [bad.name]  # only it replaced
    assert result.stderr == ""
    assert cli("data", "verify", "tiny").stdout.count("OK ") == 4
    assert data.load_dataset("tiny", download=False).source == str(cache)


@pytest.fixture
def mirror(places, tmp_path, monkeypatch):
    """The good files served over HTTP as the dataset's mirror; the system copy gone."""
    cache, system = places
    served = shutil.copytree(system, tmp_path / "served")
    shutil.rmtree(system)
    server = FileServer(served)
    monkeypatch.setenv("HANDPROP_MIRROR", server.url)
    try:
        yield cache
    finally:
        server.close()


def test_fetch_downloads_over_a_bad_cached_file(mirror):
    cache = mirror
    bad = cache / "t10k-labels-idx1-ubyte.gz"
    truncate(bad)
    with pytest.raises(DataError, match="t10k-labels-idx1-ubyte.gz: truncated or corrupt"):
        data.load_dataset("tiny")  # loading alone does not download over it
    result = cli("data", "fetch", "tiny", "-q")
    assert result.exit_code == 0, result.output
    first, second = result.stdout.splitlines()
    assert first.startswith(f"tiny: {cache}: its t10k-labels-idx1-ubyte.gz fails verification (")
    assert first.endswith("; replaced t10k-labels-idx1-ubyte.gz with a verified download")
    assert second == f"tiny: 10 samples (6 train) in {cache}"
    assert sorted(p.name for p in cache.iterdir()) == sorted(n + ".gz" for n in NAMES)
    assert cli("data", "verify", "tiny").stdout.count("OK ") == 4


def test_fetch_downloads_over_a_bad_uncompressed_cached_file(mirror):
    """The bad file is replaced where it is (gzip is told from the bytes, not the
    name): a good one beside it would be shadowed by nothing, a bad one left there would
    still be found first."""
    cache = mirror
    plain = cache / "train-labels-idx1-ubyte"
    (cache / (plain.name + ".gz")).unlink()
    plain.write_bytes(b"\x00\x00\x08\x01")  # an IDX header and no labels
    result = cli("data", "fetch", "tiny", "-q")
    assert result.exit_code == 0, result.output
    assert f"replaced {plain.name} with a verified download" in result.stdout
    assert data.load_dataset("tiny", download=False).source == str(cache)
    assert data.check_file(plain, data.get_spec("tiny").files[1])[0] == "OK"


# class 4: a cache that cannot be written


@pytest.mark.skipif(not Path("/proc/self").is_dir(), reason="no /proc here")
@pytest.mark.parametrize("with_data_dir", [True, False])
def test_a_cache_under_proc_is_one_line(places, with_data_dir):
    """`XDG_CACHE_HOME=/proc/nope handprop data fetch mnist [--data-dir D]`."""
    cache, system = places
    shutil.rmtree(cache)
    args = ["data", "fetch", "tiny"] + ["--data-dir", system] * with_data_dir
    if not with_data_dir:
        shutil.rmtree(system)  # nothing to find: the download needs the cache first
    result = cli(*args, XDG_CACHE_HOME="/proc/nope")
    assert result.exit_code == 1 and result.stdout == ""
    assert result.stderr == (
        "handprop: error: /proc/nope/handprop/tiny: cannot create the cache folder: "
        "No such file or directory\n"
    )


@pytest.mark.parametrize("with_data_dir", [True, False])
def test_a_cache_path_that_is_a_file_is_one_line(places, tmp_path, with_data_dir):
    _, system = places
    (tmp_path / "afile").write_text("x")
    args = ["data", "fetch", "tiny"] + ["--data-dir", system] * with_data_dir
    if not with_data_dir:
        shutil.rmtree(system)
    result = cli(*args, XDG_CACHE_HOME=str(tmp_path / "afile"))
    assert result.exit_code == 1 and result.stdout == ""
    assert result.stderr == (
        f"handprop: error: {tmp_path / 'afile' / 'handprop' / 'tiny'}: cannot create the "
        "cache folder: Not a directory\n"
    )
    assert (tmp_path / "afile").read_text() == "x"


def read_only(*args, **kwargs):
    raise OSError(errno.EROFS, "Read-only file system")


@pytest.mark.parametrize("step", ["mkstemp", "replace"])
def test_a_bad_cached_file_on_a_read_only_cache_is_one_line_and_kept(places, monkeypatch, step):
    """Repairing the cache from the system copy: a temporary file that cannot be made,
    or a rename refused, is one line naming the cache folder; the bad file stays."""
    cache, _ = places
    bad = cache / "train-images-idx3-ubyte.gz"
    truncate(bad)
    before = bad.read_bytes()
    target = fetch.tempfile if step == "mkstemp" else fetch.os
    monkeypatch.setattr(target, step, read_only)
    result = cli("data", "fetch", "tiny")
    assert result.exit_code == 1 and result.stdout == ""
    assert result.stderr == (
        f"handprop: error: {cache}: cannot write train-images-idx3-ubyte.gz into the cache "
        "folder: Read-only file system\n"
    )
    assert bad.read_bytes() == before
    assert not [p for p in cache.iterdir() if p.name.endswith(".part")]


@pytest.mark.parametrize("step", ["mkstemp", "replace"])
def test_a_download_into_a_read_only_cache_is_one_line(mirror, monkeypatch, step):
    """The cache's fault is named as such, not as a failed download from every mirror."""
    cache = mirror
    truncate(cache / "t10k-labels-idx1-ubyte.gz")
    target = fetch.tempfile if step == "mkstemp" else fetch.os
    monkeypatch.setattr(target, step, read_only)
    result = cli("data", "fetch", "tiny", "-q")
    assert result.exit_code == 1 and result.stdout == ""
    assert result.stderr == (
        f"handprop: error: {cache}: cannot write t10k-labels-idx1-ubyte.gz into the cache "
        "folder: Read-only file system\n"
    )
    assert not [p for p in cache.iterdir() if p.name.endswith(".part")]


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes through chmod 0500")
def test_a_read_only_cache_with_a_bad_file_is_one_line(places):
    cache, _ = places
    truncate(cache / "train-images-idx3-ubyte.gz")
    cache.chmod(0o500)
    try:
        result = cli("data", "fetch", "tiny")
    finally:
        cache.chmod(0o700)
    assert result.exit_code == 1 and result.stderr.count("\n") == 1
    assert "cannot write train-images-idx3-ubyte.gz into the cache folder" in result.stderr


# the real thing, where Debian's dataset-fashion-mnist is installed


@pytest.mark.skipif(
    not DEBIAN_FASHION.is_dir(),
    reason=f"{DEBIAN_FASHION} absent: apt-get install -y dataset-fashion-mnist",
)
def test_a_truncated_fashion_mnist_in_the_cache_and_debians_copy(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    for var in ("HANDPROP_DATA", "HANDPROP_MIRROR", "HANDPROP_MEMORY_LIMIT"):
        monkeypatch.delenv(var, raising=False)
    cache = Path(shutil.copytree(DEBIAN_FASHION, tmp_path / "xdg" / "handprop" / "fashion-mnist"))
    bad = cache / "train-images-idx3-ubyte.gz"
    bad.write_bytes(bad.read_bytes()[:100_000])  # a download cut short
    ds = data.load_dataset("fashion-mnist", download=False, progress=False)
    assert ds.source == str(DEBIAN_FASHION) and ds.n_train == 60000
    assert capsys.readouterr().err.startswith(
        f"handprop: skipped {cache}: its train-images-idx3-ubyte.gz fails verification"
    )
    result = cli("data", "fetch", "fashion-mnist")
    assert result.exit_code == 0, result.output
    assert f"replaced train-images-idx3-ubyte.gz with a verified copy from {DEBIAN_FASHION}" in (
        result.stdout
    )
    assert bad.read_bytes() == (DEBIAN_FASHION / bad.name).read_bytes()
    result = cli("data", "verify", "fashion-mnist")
    assert result.exit_code == 0 and result.stdout.count(f"OK         {cache}") == 4
