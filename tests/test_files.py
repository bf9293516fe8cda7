"""Files that are not regular, or of an insane size (issue 27, class 1): every reader of a
user's file refuses a FIFO (it would block forever), a device (/dev/zero never ends), a
folder and a huge sparse file before opening it, in one line naming the path."""

import contextlib
import os
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from handprop import files
from handprop.errors import ConfigError, DataError, HandpropError, ModelFileError

needs_fifo = pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="no FIFOs here")
needs_dev_zero = pytest.mark.skipif(not Path("/dev/zero").exists(), reason="no /dev/zero")


@contextlib.contextmanager
def no_hang(seconds: float = 20):
    """Fail, rather than block the suite, if the body hangs (a FIFO opened for reading
    waits for a writer): SIGALRM interrupts the blocked system call."""

    def alarm(signum, frame):
        raise TimeoutError(f"still blocked after {seconds} s")

    previous = signal.signal(signal.SIGALRM, alarm)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


def _net():
    from handprop import nn

    return nn.Network.from_spec("16-4-3", rng=0, meta={"image_shape": [4, 4]})


def _predict(path):
    from handprop.predict import open_inputs

    return open_inputs([path], _net())


def _read_csv(path):
    from handprop.data import read_csv

    return read_csv(path)


def _read_idx(path):
    from handprop.data import read_idx

    return read_idx(path)


def _load_model(path):
    from handprop import nn

    return nn.load(path)


def _load_config(path):
    from handprop.config import load_config

    return load_config(path)


def _read_grid(path):
    from handprop.grids.grid import read_grid

    return read_grid(path)


def _read_json(path):
    from handprop.run.reader import read_json

    return read_json(path)


def _read_run_config(path):
    from handprop.run.reader import read_config

    return read_config(path)


# (file name, reader, error, what the message calls it, its limit)
READERS = [
    ("run.cfg", _load_config, ConfigError, "a config file", files.MAX_CONFIG_BYTES),
    ("run.toml", _load_config, ConfigError, "a config file", files.MAX_CONFIG_BYTES),
    ("grid.csv", _read_grid, ConfigError, "an experiment CSV", files.MAX_GRID_BYTES),
    ("data.csv", _read_csv, DataError, "a CSV file", files.MAX_CSV_BYTES),
    ("t10k-images-idx3-ubyte", _read_idx, DataError, "an IDX file", files.MAX_IDX_BYTES),
    ("model.npz", _load_model, ModelFileError, "a model file", files.MAX_MODEL_BYTES),
    ("digit.png", _predict, DataError, "an image", files.MAX_IMAGE_BYTES),
    ("rows.csv", _predict, DataError, "a CSV file", files.MAX_CSV_BYTES),
    ("rows.idx", _predict, DataError, "an IDX file", files.MAX_IDX_BYTES),
    ("metrics.json", _read_json, DataError, "a JSON file", files.MAX_RUN_LOG_BYTES),
    ("config.toml", _read_run_config, ConfigError, "a config file", files.MAX_CONFIG_BYTES),
]
IDS = [f"{r[1].__name__}-{r[0]}" for r in READERS]


def one_line(exc: BaseException) -> str:
    message = str(exc)
    assert "\n" not in message and "Traceback" not in message
    return message


@needs_fifo
@pytest.mark.parametrize("name, reader, error, what, limit", READERS, ids=IDS)
def test_a_fifo_is_refused_without_blocking(tmp_path, name, reader, error, what, limit):
    path = tmp_path / name
    os.mkfifo(path)
    with no_hang(), pytest.raises(error) as err:
        reader(path)
    assert one_line(err.value) == (
        f"{path}: is a FIFO (named pipe), not a regular file; expected {what}"
    )


@needs_dev_zero
@pytest.mark.parametrize("name, reader, error, what, limit", READERS, ids=IDS)
def test_dev_zero_is_refused_unread(tmp_path, name, reader, error, what, limit):
    path = tmp_path / name
    path.symlink_to("/dev/zero")  # the reader's own suffix, /dev/zero's endless bytes
    with no_hang(), pytest.raises(error) as err:
        reader(path)
    assert one_line(err.value) == (
        f"{path}: is a character device, not a regular file; expected {what}"
    )


@pytest.mark.parametrize("name, reader, error, what, limit", READERS, ids=IDS)
def test_a_huge_sparse_file_is_refused_unread(tmp_path, name, reader, error, what, limit):
    path = tmp_path / name
    with open(path, "wb") as f:
        f.truncate(limit + 1)  # sparse: no disk, and nothing of it is read
    with no_hang(), pytest.raises(error) as err:
        reader(path)
    assert one_line(err.value) == (
        f"{path}: {limit + 1:,} bytes is too large for {what} "
        f"(at most {files.format_bytes(limit)}); is this the right file?"
    )


@pytest.mark.parametrize("name, reader, error, what, limit", READERS, ids=IDS)
def test_a_folder_is_one_line(tmp_path, name, reader, error, what, limit):
    path = tmp_path / name
    path.mkdir()
    with no_hang(), pytest.raises(HandpropError) as err:
        reader(path)
    assert one_line(err.value).startswith(f"{path}: is a folder")


def test_a_file_at_the_limit_is_read(tmp_path):
    """The limit is the most bytes allowed, not one fewer."""
    path = tmp_path / "f"
    path.write_bytes(b"x" * 100)
    assert files.regular_file(path, "thing", 100) == 100
    assert files.read_regular(path, "thing", 100) == b"x" * 100
    with pytest.raises(DataError, match=r"f: 100 bytes is too large for a thing \(at most 99 B\)"):
        files.read_regular(path, "thing", 99)


def test_a_missing_file_is_left_to_the_caller(tmp_path):
    with pytest.raises(FileNotFoundError):
        files.regular_file(tmp_path / "absent", "config file", 10)


CLI = "import sys; from handprop.cli import main; sys.argv[0] = 'handprop'; main()"


@needs_fifo
@pytest.mark.parametrize(
    "args, message",
    [
        (["train", "{fifo}.cfg"], "{fifo}.cfg: is a FIFO (named pipe), not a regular file; "),
        (["train", "/dev/zero"], "/dev/zero: is a character device, not a regular file; "),
        (["experiments", "{fifo}.csv"], "{fifo}.csv: is a FIFO (named pipe), not a regular file"),
        (["predict", "{fifo}.npz", "x.png"], "{fifo}.npz: is a FIFO (named pipe), not a regular"),
    ],
)
def test_the_command_line_does_not_hang(tmp_path, args, message):
    """`mkfifo fifo.cfg; handprop train fifo.cfg` blocked forever; `handprop train
    /dev/zero` read until the memory was gone. Run as a user would, with a timeout."""
    fifo = str(tmp_path / "fifo")
    for suffix in (".cfg", ".csv", ".npz"):
        os.mkfifo(fifo + suffix)
    result = subprocess.run(
        [sys.executable, "-c", CLI, *(a.format(fifo=fifo) for a in args)],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=tmp_path,
        env={**os.environ, "HANDPROP_MEMORY_LIMIT": "2G"},
    )
    assert result.returncode == 1, result.stderr
    assert result.stderr.startswith("handprop: error: " + message.format(fifo=fifo))
    assert result.stderr.count("\n") == 1 and result.stdout == ""


def test_a_file_swapped_for_a_fifo_after_the_check_is_not_read(tmp_path, monkeypatch):
    """read_regular checks the open file again: a FIFO put in place between the look
    and the open is refused, never read (it is opened without blocking)."""
    if not hasattr(os, "mkfifo"):
        pytest.skip("no FIFOs here")
    path = tmp_path / "run.cfg"
    path.write_text("x")
    real = files.regular_file

    def swap(p, *args):
        size = real(p, *args)
        path.unlink()
        os.mkfifo(path)
        return size

    monkeypatch.setattr(files, "regular_file", swap)
    with no_hang(), pytest.raises(ConfigError, match="is a FIFO"):
        files.read_regular(path, "config file", 100, ConfigError)


def test_a_plain_file_still_loads(tmp_path):
    """The checks refuse nothing ordinary: a model, an IDX file and a CSV file read."""
    from handprop import nn
    from handprop.data import read_csv, read_idx, write_idx

    net = _net()
    nn.save(net, tmp_path / "m.npz")
    assert nn.load(tmp_path / "m.npz").n_params == net.n_params
    write_idx(tmp_path / "x.idx", np.arange(32, dtype=np.uint8).reshape(2, 4, 4))
    assert read_idx(tmp_path / "x.idx").shape == (2, 4, 4)
    (tmp_path / "d.csv").write_text("label,a,b,c,d\n1,0,1,2,3\n")
    assert read_csv(tmp_path / "d.csv")[1].shape == (1, 2, 2)
