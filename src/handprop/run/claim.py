"""Folders handprop owns: made exclusively, marked, locked while in use.

handprop never deletes, overwrites or reuses a folder it did not make. Every run folder
(and grid folder) it makes gets a marker file first, in the same step that claims the
name: ``os.mkdir`` without ``exist_ok`` either makes the folder or fails, so two runs
started at once never share one (the second takes ``NAME-2``). A folder without the
marker is somebody else's: handprop refuses to write into it.

While a process trains in a run folder it holds an exclusive lock on the marker
(``fcntl.flock``; the kernel drops it when the process dies, ``kill -9`` included), so
a second ``--resume`` or a second grid on the same folder is refused instead of mixing
its files into the first one's. A grid folder is locked the same way, as a whole, while
one ``handprop experiments`` runs it (:class:`GridLock`): a second one on the same
``--out`` is refused before it touches any row or the summary.
"""

from __future__ import annotations

import contextlib
import glob
import json
import os
import time
from collections.abc import Iterable
from pathlib import Path
from typing import ClassVar

from handprop.atomic import output_error
from handprop.errors import OutputError

try:  # POSIX
    import fcntl
except ImportError:  # pragma: no cover - Windows: no lock, the marker still guards
    fcntl = None

RUN_MARKER = ".handprop-run"
GRID_MARKER = ".handprop-grid"
#: the file a grid's lock is held on, inside the grid folder; it holds the holder's pid
GRID_LOCK = ".handprop-grid.lock"


def _check_path(path: Path) -> None:
    if "\0" in str(path):
        raise OutputError(f"{str(path)!r}: a path cannot hold a NUL byte")


def _make_base(base: Path) -> None:
    """The folder runs are made in (``--out``): made if missing, never claimed."""
    _check_path(base)
    if base.exists() and not base.is_dir():
        raise OutputError(f"{base}: not a folder; --out must name a folder")
    try:
        base.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise output_error(base, exc, "cannot make the folder") from None


def _mark(folder: Path, marker: str) -> None:
    """Write the marker into a folder this process has just made (or found empty)."""
    info = {"made_by": "handprop", "pid": os.getpid(), "time": time.time()}
    try:
        with open(folder / marker, "x", encoding="utf-8") as f:
            f.write(json.dumps(info) + "\n")
    except FileExistsError:
        pass  # another handprop process marked it first: the lock decides who trains
    except OSError as exc:
        with contextlib.suppress(OSError):
            folder.rmdir()  # empty but for what failed: ours to remove
        raise output_error(folder / marker, exc) from None


def make_folder(base: str | Path, name: str, marker: str = RUN_MARKER) -> Path:
    """Make a new folder ``base/name`` (or ``name-2``, ``name-3``, ... when taken).

    The name is claimed by one atomic ``mkdir``; the marker is written at once.

    Raises
    ------
    OutputError
        ``base`` cannot be made or written (a file, read-only, a full disk, ...).
    """
    base = Path(base)
    _make_base(base)
    for k in range(1, 10_000):
        folder = base / (name if k == 1 else f"{name}-{k}")
        if _claim(folder, marker):
            return folder
    raise OutputError(f"{base}: {name}, {name}-2, ... {name}-9999 are all taken")


def _claim(folder: Path, marker: str) -> bool:
    """Make ``folder`` with one atomic mkdir and mark it: True, or False when the name
    is taken already (by anyone)."""
    try:
        folder.mkdir()
    except FileExistsError:
        return False
    except OSError as exc:
        raise output_error(folder, exc, "cannot make the folder") from None
    _mark(folder, marker)
    return True


def is_owned(folder: str | Path, marker: str = RUN_MARKER) -> bool:
    """Whether handprop made ``folder`` (it holds the marker)."""
    return (Path(folder) / marker).is_file()


def make_or_adopt(folder: str | Path, marker: str = RUN_MARKER) -> tuple[Path, bool]:
    """The folder ``folder`` exactly (a grid row, a grid): made now, one handprop made,
    or an empty one (then marked as handprop's).

    Returns the folder and whether it was made now.

    Raises
    ------
    OutputError
        ``folder`` exists and handprop did not make it (no marker), or it cannot be made.
    """
    folder = Path(folder)
    _make_base(folder.parent)
    if _claim(folder, marker):
        return folder, True
    if not folder.is_dir():
        raise OutputError(f"{folder}: exists and is not a folder; handprop will not replace it")
    if not is_owned(folder, marker):
        try:
            empty = not any(folder.iterdir())
        except OSError as exc:
            raise output_error(folder, exc, "cannot read the folder") from None
        if not empty:
            raise OutputError(
                f"{folder}: exists and was not made by handprop (no {marker} inside); "
                "handprop never writes into a folder it did not make: choose another "
                "name or --out"
            )
        _mark(folder, marker)  # an empty folder holds nothing to lose: take it
    return folder, False


class FolderLock:
    """An exclusive lock on a run folder's marker, held while a process trains in it.

    Re-entrant within a process: a grid row locks its folder, then the training it
    calls locks it again without waiting on itself.

    Raises
    ------
    OutputError
        Another live process holds the lock (it is training in this folder now), or
        the folder has no marker.
    """

    #: folder -> [open marker file, how many holders in this process]
    _held: ClassVar[dict[Path, list]] = {}

    def __init__(self, folder: str | Path, marker: str = RUN_MARKER) -> None:
        self.folder = Path(folder).resolve()
        held = self._held.get(self.folder)
        if held is not None:
            held[1] += 1
            return
        path = self.folder / marker
        try:
            file = open(path, "r+", encoding="utf-8")  # noqa: SIM115 - held open
        except FileNotFoundError:
            raise OutputError(
                f"{folder}: was not made by handprop (no {marker} inside); "
                "handprop never writes into a folder it did not make"
            ) from None
        except OSError as exc:
            raise output_error(path, exc, "cannot open") from None
        if fcntl is not None:
            try:
                fcntl.flock(file, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError:
                file.close()
                raise OutputError(
                    f"{folder}: another handprop process is training in this folder now"
                ) from None
        self._held[self.folder] = [file, 1]

    def release(self) -> None:
        """Drop this hold; the last one closes the file, which drops the lock."""
        held = self._held[self.folder]
        held[1] -= 1
        if held[1] == 0:
            del self._held[self.folder]
            held[0].close()

    def __enter__(self) -> FolderLock:
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()


class GridLock:
    """An exclusive lock on a grid folder handprop made, held while one process runs
    the grid: ``fcntl.flock`` on :data:`GRID_LOCK` inside it (made now if missing),
    which the kernel drops when the process ends, ``kill -9`` included. The file holds
    the holder's pid, for the message a second process gets.

    Not re-entrant: a second GridLock on the same folder is refused, in this process
    too. Child processes forked while it is held call :meth:`close_inherited`, so that
    a child outliving its parent never holds the grid.

    Raises
    ------
    OutputError
        Another process holds the grid ("OUT is in use by another handprop experiments
        (pid N)"), or the folder is not a grid folder handprop made.
    """

    #: the lock files this process holds open (a forked child closes its copies)
    _open: ClassVar[set[int]] = set()

    def __init__(self, folder: str | Path, marker: str = GRID_MARKER) -> None:
        self.folder = Path(folder)
        if not is_owned(self.folder, marker):
            raise OutputError(
                f"{folder}: was not made by handprop (no {marker} inside); "
                "handprop never writes into a folder it did not make"
            )
        path = self.folder / GRID_LOCK
        # never through a link planted in its place (it would truncate its target)
        flags = os.O_RDWR | os.O_CREAT | getattr(os, "O_NOFOLLOW", 0)
        try:
            self.fd: int | None = os.open(path, flags, 0o644)  # not inherited on exec
        except OSError as exc:
            raise output_error(path, exc, "cannot open") from None
        if fcntl is not None:
            try:
                fcntl.flock(self.fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError:
                holder = _holder(self.fd)
                os.close(self.fd)
                self.fd = None
                pid = f" (pid {holder})" if holder else ""
                raise OutputError(
                    f"{folder} is in use by another handprop experiments{pid}; "
                    "wait for it or choose another --out"
                ) from None
        self._open.add(self.fd)
        with contextlib.suppress(OSError, AttributeError):  # the pid only names the holder
            os.ftruncate(self.fd, 0)
            os.pwrite(self.fd, f"{os.getpid()}\n".encode(), 0)

    def release(self) -> None:
        """Drop the lock (closing the file drops it); the file stays for the next run."""
        if self.fd is not None:
            self._open.discard(self.fd)
            os.close(self.fd)
            self.fd = None

    @classmethod
    def close_inherited(cls) -> None:
        """In a child forked while locks were held: close its copies of the lock files.
        (Closing a copy leaves the parent's lock as it is: a flock goes when the last
        descriptor of the open file goes.)"""
        for fd in list(cls._open):
            with contextlib.suppress(OSError):
                os.close(fd)
        cls._open.clear()

    def __enter__(self) -> GridLock:
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()


def _holder(fd: int) -> int | None:
    """The pid the grid's lock file names (the holder writes it right after locking:
    look for a moment), None when it names none."""
    for _ in range(20):
        with contextlib.suppress(OSError, ValueError, AttributeError):
            text = os.pread(fd, 32, 0).decode("ascii").strip()
            if text:
                return int(text)
        time.sleep(0.01)
    return None


def remove_own_files(folder: str | Path, names: Iterable[str]) -> None:
    """Remove the named files that handprop writes, before a run starts again in its
    own folder; anything else in the folder is left as it is."""
    folder = Path(folder)
    for name in names:
        try:
            (folder / name).unlink(missing_ok=True)
        except IsADirectoryError:
            continue
        except OSError as exc:
            raise output_error(folder / name, exc, "cannot remove") from None


def remove_stale_temporaries(folder: str | Path, names: Iterable[str]) -> None:
    """Remove what a killed process left of its atomic writes of the named files
    (``.NAME.XXXXXXXX.tmp``, see :mod:`handprop.atomic`); nothing else is touched."""
    folder = Path(folder)
    for name in names:
        for tmp in folder.glob(f".{glob.escape(name)}.*.tmp"):
            with contextlib.suppress(OSError):
                tmp.unlink()


def remove_if_unused(folder: str | Path, marker: str = RUN_MARKER) -> None:
    """Remove a folder handprop made that holds nothing but its marker (a run refused
    before it began); any other folder is left as it is."""
    folder = Path(folder)
    with contextlib.suppress(OSError):
        if [p.name for p in folder.iterdir()] == [marker]:
            (folder / marker).unlink()
            folder.rmdir()
