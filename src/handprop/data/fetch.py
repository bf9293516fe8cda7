"""Finding a dataset's files, verifying them, and downloading them when absent."""

from __future__ import annotations

import errno
import hashlib
import os
import stat
import tempfile
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

from handprop.atomic import _umask
from handprop.data.idx import UnreadableFileError, open_content, reading
from handprop.data.registry import DATASETS, DatasetSpec, FileSpec
from handprop.errors import DataError

ENV_DATA = "HANDPROP_DATA"
ENV_MIRROR = "HANDPROP_MIRROR"  # a base URL tried before the dataset's own mirrors
TIMEOUT_S = 30
CHUNK = 1 << 16


def cache_dir(name: str) -> Path:
    """~/.cache/handprop/<name>, honouring XDG_CACHE_HOME."""
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "handprop" / name


def candidate_dirs(spec: DatasetSpec, data_dir: str | Path | None) -> list[tuple[str, Path]]:
    """Where to look, in order, each with how it was chosen."""
    if data_dir is not None:
        return [("--data-dir", Path(data_dir)), ("--data-dir", Path(data_dir) / spec.name)]
    dirs: list[tuple[str, Path]] = []
    env = os.environ.get(ENV_DATA)
    if env:
        dirs += [(ENV_DATA, Path(env)), (ENV_DATA, Path(env) / spec.name)]
    dirs.append(("cache", cache_dir(spec.name)))
    dirs += [("system", Path(d)) for d in spec.system_dirs]
    return dirs


def find_file(directory: Path, f: FileSpec) -> Path | None:
    """``NAME.gz`` or ``NAME`` in ``directory``, a regular file preferred; something else
    of that name (a directory, a FIFO) is returned too, for the reader to name it."""
    found = []
    for candidate in (directory / (f.name + ".gz"), directory / f.name):
        with reading(candidate):
            try:
                mode = candidate.stat().st_mode
            except (FileNotFoundError, NotADirectoryError):
                continue
        if stat.S_ISREG(mode):
            return candidate
        found.append(candidate)
    return found[0] if found else None


def copies(
    spec: DatasetSpec,
    data_dir: str | Path | None,
    skipped: list[tuple[Path, str]] | None = None,
) -> Iterator[tuple[str, Path, list[Path]]]:
    """(how it was chosen, directory, its files) of every candidate directory holding
    every file, in the lookup order; nothing is verified.

    A directory whose files are another registered dataset's (MNIST and Fashion-MNIST
    share their file names) is not this dataset's copy: it is passed over, and appended
    to ``skipped`` as (directory, the other dataset's name).
    """
    if data_dir is not None:
        with reading(Path(data_dir)):
            if not Path(data_dir).exists():
                raise DataError(f"{data_dir}: no such data directory")
            if not Path(data_dir).is_dir():
                raise DataError(f"{data_dir}: the data directory is a file, not a folder")
    for how, directory in candidate_dirs(spec, data_dir):
        paths = [find_file(directory, f) for f in spec.files]
        if all(paths):
            other = owner(spec, paths)  # type: ignore[arg-type]
            if other is None:
                yield how, directory, paths  # type: ignore[misc]
            elif skipped is not None and (directory, other) not in skipped:
                skipped.append((directory, other))


def locate(
    spec: DatasetSpec,
    data_dir: str | Path | None,
    skipped: list[tuple[Path, str]] | None = None,
    failed: list[tuple[Path, str]] | None = None,
) -> tuple[str, Path, list[Path]] | None:
    """The first of :func:`copies`, or None.

    With ``failed``, every file of a copy found in the lookup order (``HANDPROP_DATA``,
    the cache, system folders) is verified first: a copy that fails is passed over, for
    the next place in the order, and appended to ``failed`` as (directory, why:
    :func:`failure`). A copy in ``--data-dir`` is the one asked for: never passed over.
    """
    for how, directory, paths in copies(spec, data_dir, skipped):
        why = None if failed is None or how == "--data-dir" else failure(spec, paths)
        if why is None:
            return how, directory, paths
        failed.append((directory, why))  # type: ignore[union-attr]
    return None


def failure(spec: DatasetSpec, paths: list[Path]) -> str | None:
    """Why the copy ``paths`` of ``spec`` cannot be used, naming its first file that
    fails verification ("its train-images-idx3-ubyte.gz fails verification (...)"), or
    None when every file verifies."""
    for f, path in zip(spec.files, paths, strict=True):
        status, why = check_file(path, f)
        if status == "UNREADABLE":
            return f"its {path.name} cannot be read ({why})"
        if status != "OK":
            return f"its {path.name} fails verification ({why})"
    return None


def owner(spec: DatasetSpec, paths: list[Path]) -> str | None:
    """The other registered dataset these files are, or None (they are ``spec``'s, or
    no known dataset's: corrupt or foreign files are left for verification to name).

    Judged by the smallest file (test labels, 10 kB): its content checksum is
    ``spec``'s, or another dataset's file of the same name.
    """
    i = min(range(len(spec.files)), key=lambda i: spec.files[i].size or float("inf"))
    f, path = spec.files[i], paths[i]
    if check_file(path, f)[0] == "OK":
        return None
    for other in DATASETS.values():
        if other.name == spec.name:
            continue
        for g in other.files:
            if g.name == f.name and g.sha256 and check_file(path, g)[0] == "OK":
                return other.name
    return None


def not_in_dir_message(
    spec: DatasetSpec, data_dir: str | Path, skipped: list[tuple[Path, str]]
) -> str:
    """Why ``data_dir`` gave no copy of ``spec``: another dataset's files, or none."""
    if skipped:
        directory, other = skipped[0]
        return f"{directory}: holds the {other} files, not {spec.name}'s"
    missing = ", ".join(f.name + "[.gz]" for f in spec.files)
    return f"{data_dir}: does not hold the {spec.name} files ({missing})"


def check_file(path: Path, f: FileSpec) -> tuple[str, str]:
    """("OK", how), ("FAIL", why) or ("UNREADABLE", why): the content's sha256 and size
    against the pinned ones. Decompression stops past the pinned size (a gzip bomb is a
    FAIL); a file with no pinned checksum FAILs, as it is never used unverified."""
    if not f.sha256:
        return "FAIL", "no checksum is pinned for this file; it cannot be verified"
    digest, size = hashlib.sha256(), 0
    try:
        with open_content(path) as (stream, _):
            while chunk := stream.read(CHUNK):
                digest.update(chunk)
                size += len(chunk)
                if f.size is not None and size > f.size:
                    return "FAIL", f"the content is larger than the published {f.size} bytes"
    except UnreadableFileError as exc:
        return "UNREADABLE", str(exc).removeprefix(f"{path}: ")
    except DataError as exc:
        return "FAIL", str(exc).removeprefix(f"{path}: ")
    if f.size is not None and size != f.size:
        return "FAIL", f"the content is {size} bytes, expected {f.size}"
    if digest.hexdigest() != f.sha256:
        return "FAIL", f"sha256 of the content is {digest.hexdigest()}, expected {f.sha256}"
    return "OK", "sha256 of the content matches"


def mirrors(spec: DatasetSpec) -> list[str]:
    env = os.environ.get(ENV_MIRROR)
    return ([env] if env else []) + list(spec.mirrors)


def no_data_message(spec: DatasetSpec, reason: str) -> str:
    names = ", ".join(f.name + ".gz" for f in spec.files)
    ways = [
        f"pass --data-dir DIR (a directory holding {names})",
        f"set {ENV_DATA}=DIR",
        f"copy the files into {cache_dir(spec.name)}",
        f"run `handprop data fetch {spec.name}` where there is a network",
    ]
    if spec.system_dirs:
        ways.append(f"install Debian's dataset-{spec.name} package ({spec.system_dirs[0]})")
    return f"{spec.name} not found and {reason}. Ways to provide it: " + "; ".join(ways)


def download(spec: DatasetSpec, progress: bool = True, replaced: list[Path] | None = None) -> Path:
    """Download every file missing from the cache, or failing verification there, into
    the cache; each is verified before it is kept. A cached file that fails is replaced
    in place (:func:`replaceable`), and appended to ``replaced``."""
    target = make_cache_dir(spec)
    for f in spec.files:
        existing = find_file(target, f)
        dest = target / (f.name + ".gz")
        if existing is not None:
            status, why = check_file(existing, f)
            if status == "OK":
                continue
            replaceable(existing, spec, why)
            dest = existing
        elif os.path.lexists(dest):  # a dangling link: not handprop's to replace
            raise _taken(dest, spec)
        errors = []
        for base in mirrors(spec):
            url = base.rstrip("/") + "/" + f.name + ".gz"
            try:
                _download_verified(url, dest, f, progress, spec, existing is not None)
                if existing is not None and replaced is not None:
                    replaced.append(existing)
                break
            except CacheWriteError:
                raise  # the cache's fault, not the mirror's: no other mirror can help
            except (urllib.error.URLError, OSError, ValueError) as exc:
                errors.append(f"{url}: {getattr(exc, 'reason', exc)}")
            except DataError as exc:
                errors.append(str(exc))
        else:
            raise DataError(
                no_data_message(spec, "the download failed (" + "; ".join(errors) + ")")
            )
    return target


class CacheWriteError(DataError):
    """A file cannot be written into the cache folder (read-only, full, gone)."""

    @classmethod
    def of(cls, dest: Path, exc: OSError) -> CacheWriteError:
        return cls(
            f"{dest.parent}: cannot write {dest.name} into the cache folder: {exc.strerror or exc}"
        )


def make_cache_dir(spec: DatasetSpec) -> Path:
    target = cache_dir(spec.name)
    try:
        target.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise DataError(
            f"{target}: cannot create the cache folder: {exc.strerror or exc}"
        ) from None
    return target


def _download_verified(
    url: str, dest: Path, f: FileSpec, progress: bool, spec: DatasetSpec, replace: bool
) -> None:
    """Fetch ``url`` to a temporary file beside ``dest``; into place only once verified:
    renamed over ``dest`` when ``replace`` (a cached file failing verification), else
    linked (``dest`` must not exist)."""
    from tqdm import tqdm

    try:
        fd, tmp_name = tempfile.mkstemp(prefix=f".{dest.name}.", suffix=".part", dir=dest.parent)
    except OSError as exc:
        raise CacheWriteError.of(dest, exc) from None
    tmp = Path(tmp_name)
    try:
        with os.fdopen(fd, "wb") as out, urllib.request.urlopen(url, timeout=TIMEOUT_S) as resp:
            total = int(resp.headers.get("Content-Length") or 0) or None
            with tqdm(
                total=total,
                unit="B",
                unit_scale=True,
                desc=dest.name,
                disable=not progress,
                leave=False,
            ) as bar:
                got = 0
                for chunk in iter(lambda: resp.read(CHUNK), b""):
                    got += len(chunk)
                    if f.size is not None and got > f.size + f.size // 100 + CHUNK:
                        raise DataError(
                            f"{url}: sent more than {got - len(chunk)} bytes, "
                            f"too many for a {f.size}-byte file"
                        )
                    try:
                        out.write(chunk)
                    except OSError as exc:  # a full disk
                        raise CacheWriteError.of(dest, exc) from None
                    bar.update(len(chunk))
        status, why = check_file(tmp, f)
        if status != "OK":
            raise DataError(f"{url}: downloaded file failed verification: {why}")
        try:
            _into_place(tmp, dest, spec, replace)
        except OSError as exc:
            raise CacheWriteError.of(dest, exc) from None
    finally:
        tmp.unlink(missing_ok=True)


def copy_into_cache(spec: DatasetSpec, paths: list[Path]) -> tuple[Path, list[Path], list[Path]]:
    """Copy a located copy of ``spec``'s files into the cache (``handprop data fetch
    --data-dir``, or a repair from the next verified copy).

    Every file is verified before anything is written; a file already in the cache
    that verifies is kept (nothing copied for it); a regular file there that fails
    verification is replaced in place (the cache is handprop's own; a link, a folder or
    a FIFO is left as it is: :func:`replaceable`). Each copy is written under a
    temporary name, verified again and renamed (or linked, where nothing was) into
    place, so no half-written file is ever seen. Returns the cache folder, the files
    written there, and those of them that replaced a file failing verification.
    """
    for f, p in zip(spec.files, paths, strict=True):
        status, why = check_file(p, f)
        if status == "UNREADABLE":
            raise UnreadableFileError(f"{p}: {why}; nothing was copied into the cache")
        if status != "OK":
            raise DataError(
                f"{p}: not the published {spec.name} file: {why}; nothing was copied into the cache"
            )
    target = make_cache_dir(spec)
    todo = []
    for f, p in zip(spec.files, paths, strict=True):
        existing = find_file(target, f)
        if existing is None:
            todo.append((f, p, target / p.name, False))
            continue
        if existing.resolve() == p.resolve():
            continue
        status, why = check_file(existing, f)
        if status != "OK":
            replaceable(existing, spec, why)
            todo.append((f, p, existing, True))
    for f, p, dest, replace in todo:
        _copy_verified(p, dest, f, spec, replace)
    return target, [t[2] for t in todo], [t[2] for t in todo if t[3]]


def replaceable(path: Path, spec: DatasetSpec, why: str) -> None:
    """Refuse to replace ``path``, a file of the cache failing verification (``why``),
    unless it is a regular file: a link (its target may be anyone's), a folder or a
    FIFO there is left as it is."""
    if not stat.S_ISREG(os.lstat(path).st_mode):
        raise DataError(
            f"{path}: already in the cache but not the published {spec.name} file ({why}); "
            "it is not a regular file, so it is left as it is: move it away, then fetch again"
        )


def _taken(dest: Path, spec: DatasetSpec) -> DataError:
    return DataError(
        f"{dest}: already exists and is not a verified copy; it is left as it is: "
        f"move it away, then fetch {spec.name} again"
    )


def _into_place(tmp: Path, dest: Path, spec: DatasetSpec, replace: bool) -> None:
    """``tmp`` (verified) renamed over ``dest`` when ``replace`` (a regular file of the
    cache failing verification, still one now), else linked to ``dest``, which must not
    exist (a link never replaces a file; a rename would)."""
    if replace:
        if not stat.S_ISREG(os.lstat(dest).st_mode):  # changed since it was checked
            raise _taken(dest, spec)
        os.replace(tmp, dest)
    else:
        _link_no_clobber(tmp, dest, spec)


def _copy_verified(
    src: Path, dest: Path, f: FileSpec, spec: DatasetSpec, replace: bool = False
) -> None:
    """``src`` to a temporary file beside ``dest``, synced and verified, then into place
    (:func:`_into_place`)."""

    def cannot(exc: OSError) -> DataError:
        return CacheWriteError.of(dest, exc)

    try:
        fd, tmp_name = tempfile.mkstemp(prefix=f".{dest.name}.", suffix=".part", dir=dest.parent)
    except OSError as exc:
        raise cannot(exc) from None
    tmp = Path(tmp_name)
    try:
        os.chmod(fd, 0o666 & ~_umask())  # mkstemp's 0600, as open() would have made it
        with os.fdopen(fd, "wb") as out:
            with reading(src):
                source = open(src, "rb")  # noqa: SIM115 - closed below
            with source:
                while True:
                    with reading(src):
                        chunk = source.read(CHUNK)
                    if not chunk:
                        break
                    out.write(chunk)
            out.flush()
            os.fsync(out.fileno())
        status, why = check_file(tmp, f)
        if status != "OK":  # src changed while it was copied
            raise DataError(f"{src}: its copy failed verification ({why}); nothing was kept")
        _into_place(tmp, dest, spec, replace)
    except OSError as exc:
        raise cannot(exc) from None
    finally:
        tmp.unlink(missing_ok=True)


def _link_no_clobber(tmp: Path, dest: Path, spec: DatasetSpec) -> None:
    exists = _taken(dest, spec)
    try:
        os.link(tmp, dest)
        return
    except FileExistsError:
        raise exists from None
    except OSError as exc:
        if exc.errno not in (errno.EPERM, errno.ENOTSUP, errno.EOPNOTSUPP, errno.EXDEV):
            raise
    # a file system without hard links (FAT, some network ones): rename, after a check
    if os.path.lexists(dest):
        raise exists
    os.replace(tmp, dest)
