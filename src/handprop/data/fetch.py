"""Finding a dataset's files, verifying them, and downloading them when absent."""

from __future__ import annotations

import hashlib
import os
import shutil
import stat
import tempfile
import urllib.error
import urllib.request
from pathlib import Path

from handprop.data.idx import UnreadableFileError, open_content, reading
from handprop.data.registry import DatasetSpec, FileSpec
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


def locate(spec: DatasetSpec, data_dir: str | Path | None) -> tuple[str, Path, list[Path]] | None:
    """The first candidate directory holding every file, or None."""
    if data_dir is not None:
        with reading(Path(data_dir)):
            if not Path(data_dir).exists():
                raise DataError(f"{data_dir}: no such data directory")
            if not Path(data_dir).is_dir():
                raise DataError(f"{data_dir}: the data directory is a file, not a folder")
    for how, directory in candidate_dirs(spec, data_dir):
        paths = [find_file(directory, f) for f in spec.files]
        if all(paths):
            return how, directory, paths  # type: ignore[return-value]
    return None


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


def download(spec: DatasetSpec, progress: bool = True) -> Path:
    """Download every missing file into the cache, verified before it is kept."""
    target = make_cache_dir(spec)
    for f in spec.files:
        existing = find_file(target, f)
        if existing is not None and check_file(existing, f)[0] == "OK":
            continue
        errors = []
        for base in mirrors(spec):
            url = base.rstrip("/") + "/" + f.name + ".gz"
            try:
                _download_verified(url, target / (f.name + ".gz"), f, progress)
                break
            except (urllib.error.URLError, OSError, ValueError) as exc:
                errors.append(f"{url}: {getattr(exc, 'reason', exc)}")
            except DataError as exc:
                errors.append(str(exc))
        else:
            raise DataError(
                no_data_message(spec, "the download failed (" + "; ".join(errors) + ")")
            )
    return target


def make_cache_dir(spec: DatasetSpec) -> Path:
    target = cache_dir(spec.name)
    try:
        target.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise DataError(
            f"{target}: cannot create the cache folder: {exc.strerror or exc}"
        ) from None
    return target


def _download_verified(url: str, dest: Path, f: FileSpec, progress: bool) -> None:
    """Fetch ``url`` to a temporary file beside ``dest``; rename only once verified."""
    from tqdm import tqdm

    fd, tmp_name = tempfile.mkstemp(prefix=f".{dest.name}.", suffix=".part", dir=dest.parent)
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
                    out.write(chunk)
                    bar.update(len(chunk))
        status, why = check_file(tmp, f)
        if status != "OK":
            raise DataError(f"{url}: downloaded file failed verification: {why}")
        os.replace(tmp, dest)
    finally:
        tmp.unlink(missing_ok=True)


def copy_into_cache(spec: DatasetSpec, paths: list[Path]) -> Path:
    """Copy located files into the cache (used by `handprop data fetch --data-dir`)."""
    target = make_cache_dir(spec)
    for p in paths:
        if p.parent.resolve() != target.resolve():
            shutil.copyfile(p, target / p.name)
    return target
