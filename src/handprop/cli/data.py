"""handprop data: which datasets are available, fetching and verifying them."""

from __future__ import annotations

from pathlib import Path

import click

from handprop.data.registry import DATASETS


@click.group("data")
def command() -> None:
    """Datasets: where they are, fetch them, verify them."""


@command.command("info")
@click.option(
    "--data-dir",
    type=click.Path(path_type=Path),
    help="Look in DIR (and DIR/NAME) first, then in the usual places.",
)
def info(data_dir) -> None:
    """Each known dataset: available or not, where, and its size.

    The copy reported is the first in the lookup order (--data-dir, HANDPROP_DATA, the
    cache, system folders), as loading finds it; a folder holding another dataset's
    files (MNIST and Fashion-MNIST share their names), and one in the lookup order whose
    files fail verification, are passed over, and said so."""
    from handprop.data import DATASETS, check_file, locate

    for name, spec in DATASETS.items():
        skipped: list[tuple[Path, str]] = []
        failed: list[tuple[Path, str]] = []
        if spec.builtin:
            where, status = "bundled with scikit-learn", "available"
        else:
            found = locate(spec, data_dir, skipped) if data_dir is not None else None
            if found is None:
                found = locate(spec, None, skipped, failed)
            if found is None and failed:  # no copy verifies: report the first one's faults
                found = locate(spec, None)
                failed = [(d, why) for d, why in failed if found and d != found[1]]
            if found is None:
                where, status = "not found (handprop data fetch " + name + ")", "missing"
            else:
                how, directory, paths = found
                checks = [check_file(p, f) for f, p in zip(spec.files, paths, strict=True)]
                bad = [(p, c) for p, c in zip(paths, checks, strict=True) if c[0] != "OK"]
                if bad:
                    path, (mark, why) = bad[0]
                    status = "unreadable" if mark == "UNREADABLE" else "invalid"
                    more = f" (and {len(bad) - 1} more)" if len(bad) > 1 else ""
                    where = f"{path}: {why}{more}"
                else:
                    size = sum(p.stat().st_size for p in paths) / 1e6
                    where, status = f"{directory} [{how}, {size:.1f} MB]", "available"
        click.echo(f"{name:<14} {status:<10} {where}")
        for directory, other in skipped:
            note = f"(passed over {directory}: its files are {other}'s, not {name}'s)"
            click.echo(f"{'':<14} {'':<10} {note}")
        for directory, why in failed:
            click.echo(f"{'':<14} {'':<10} (passed over {directory}: {why})")
        click.echo(f"{'':<14} {spec.description}")


@command.command(
    "fetch",
    short_help="Make dataset NAME available: found, or downloaded and verified.",
    epilog=f"NAME is one of: {', '.join(DATASETS)}.",
)
@click.argument("name")
@click.option(
    "--data-dir",
    type=click.Path(path_type=Path),
    help="Copy the files from DIR (or DIR/NAME) into the cache, verified.",
)
@click.option("-q", "--quiet", is_flag=True, help="No progress bar.")
def fetch(name, data_dir, quiet) -> None:
    """Make dataset NAME available: locate it, or download and verify it into the cache.

    With --data-dir, the files found there are verified and copied into the cache
    (gzipped or not, as they are); a verified copy already there is kept. A file of the
    cache that fails verification is replaced (written under a temporary name, verified,
    renamed over it): with --data-dir's, else with the next verified copy in the lookup
    order, else with a download."""
    from handprop.data import get_spec, load_dataset
    from handprop.data.fetch import (
        cache_dir,
        copy_into_cache,
        download,
        locate,
        not_in_dir_message,
    )
    from handprop.errors import DataError

    spec = get_spec(name)
    if data_dir is not None and not spec.builtin:
        skipped: list[tuple[Path, str]] = []
        found = locate(spec, data_dir, skipped)
        if found is None:
            raise DataError(not_in_dir_message(spec, data_dir, skipped))
        _, directory, paths = found
        target, copied, replaced = copy_into_cache(spec, paths)
        if not copied:
            click.echo(f"{name}: a verified copy is already in {target}; nothing copied")
        else:
            kept = len(spec.files) - len(copied)
            notes = [f"{kept} already there"] * bool(kept)
            if replaced:
                a_file = "a file" if len(replaced) == 1 else "files"
                notes.append(f"{len(replaced)} replacing {a_file} that failed verification")
            click.echo(
                f"{name}: copied {_files(copied)} from {directory} into {target}"
                + (f" ({'; '.join(notes)})" if notes else "")
                + ", each verified (sha256 of the content)"
            )
        return
    if not spec.builtin:
        failed: list[tuple[Path, str]] = []
        found = locate(spec, None, None, failed)
        cache = cache_dir(spec.name)
        bad = next((why for d, why in failed if d == cache), None)
        repaired: list[Path] = []
        if found is None:  # no verified copy anywhere: download, replacing bad cached files
            download(spec, progress=not quiet, replaced=repaired)
            source = "a verified download"
        elif bad is not None:  # the cache's copy fails: repair it from the verified one
            repaired = copy_into_cache(spec, found[2])[2]
            source = f"a verified copy from {found[1]}"
        if bad is not None and repaired:
            names = ", ".join(p.name for p in repaired)
            click.echo(f"{name}: {cache}: {bad}; replaced {names} with {source}")
    ds = load_dataset(name, data_dir, progress=not quiet)
    if spec.builtin:
        click.echo(f"{name}: bundled, {len(ds)} samples")
        return
    click.echo(f"{name}: {len(ds)} samples ({ds.n_train} train) in {ds.source}")


def _files(paths: list[Path]) -> str:
    return f"{len(paths)} file" + "s" * (len(paths) != 1)


@command.command(
    "verify",
    short_help="Check dataset NAME's files against their pinned checksums.",
    epilog=f"NAME is one of: {', '.join(DATASETS)}.",
)
@click.argument("name")
@click.option("--data-dir", type=click.Path(path_type=Path), help="Verify the files in DIR.")
def verify(name, data_dir) -> None:
    """Check every file of dataset NAME against its pinned checksum: OK, FAIL,
    UNREADABLE or MISSING for each, then exit 1 if any is not OK.

    Without --data-dir, the copy checked is the one loading uses: a copy earlier in the
    lookup order that fails verification is skipped, and said so on stderr; when no copy
    verifies, the first one is checked."""
    from handprop.data import check_file, find_file, get_spec, locate, no_data_message
    from handprop.data.fetch import candidate_dirs
    from handprop.errors import DataError

    spec = get_spec(name)
    if spec.builtin:
        click.echo(f"{name}: bundled with scikit-learn; nothing to verify")
        return
    skipped: list[tuple[Path, str]] = []
    failed: list[tuple[Path, str]] = []
    found = locate(spec, data_dir, skipped, None if data_dir is not None else failed)
    if found is not None:
        for d, why in failed:
            click.echo(f"handprop: skipped {d}: {why}", err=True)
    elif failed:
        found = locate(spec, None)
    if found is not None:
        directory = found[1]
    elif data_dir is not None:  # report what is there, and what is missing
        dirs = [d for _, d in candidate_dirs(spec, data_dir)]
        directory = next((d for d in dirs if any(find_file(d, f) for f in spec.files)), dirs[0])
    else:
        raise DataError(no_data_message(spec, "there is nothing to verify"))
    failed = 0
    for f in spec.files:
        path = find_file(directory, f)
        if path is None:
            mark, why, path = "MISSING", "no such file", directory / (f.name + "[.gz]")
        else:
            mark, why = check_file(path, f)
        failed += mark != "OK"
        click.echo(f"{mark:<10} {path}  ({why})")
    if failed:
        raise DataError(
            f"{failed} of {len(spec.files)} files of {name} in {directory} failed verification"
            + "".join(f": it holds the {o} files" for d, o in skipped if d == directory)
        )
