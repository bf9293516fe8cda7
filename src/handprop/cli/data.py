"""handprop data: which datasets are available, fetching and verifying them."""

from __future__ import annotations

from pathlib import Path

import click


@click.group("data")
def command() -> None:
    """Datasets: where they are, fetch them, verify them."""


@command.command("info")
@click.option("--data-dir", type=click.Path(path_type=Path), help="Also look in DIR.")
def info(data_dir) -> None:
    """Each known dataset: available or not, where, and its size."""
    from handprop.data import DATASETS, check_file, locate

    for name, spec in DATASETS.items():
        if spec.builtin:
            where, status = "bundled with scikit-learn", "available"
        else:
            found = locate(spec, data_dir)
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
        click.echo(f"{'':<14} {spec.description}")


@command.command("fetch")
@click.argument("name")
@click.option("--data-dir", type=click.Path(path_type=Path), help="Copy from DIR into the cache.")
@click.option("-q", "--quiet", is_flag=True, help="No progress bar.")
def fetch(name, data_dir, quiet) -> None:
    """Make dataset NAME available: locate it, or download and verify it into the cache."""
    from handprop.data import get_spec, load_dataset

    spec = get_spec(name)
    ds = load_dataset(name, data_dir, progress=not quiet)
    if spec.builtin:
        click.echo(f"{name}: bundled, {len(ds)} samples")
        return
    click.echo(f"{name}: {len(ds)} samples ({ds.n_train} train) in {ds.source}")


@command.command("verify")
@click.argument("name")
@click.option("--data-dir", type=click.Path(path_type=Path), help="Verify the files in DIR.")
def verify(name, data_dir) -> None:
    """Check every file of dataset NAME against its pinned checksum: OK, FAIL,
    UNREADABLE or MISSING for each, then exit 1 if any is not OK."""
    from handprop.data import check_file, find_file, get_spec, locate, no_data_message
    from handprop.data.fetch import candidate_dirs
    from handprop.errors import DataError

    spec = get_spec(name)
    if spec.builtin:
        click.echo(f"{name}: bundled with scikit-learn; nothing to verify")
        return
    found = locate(spec, data_dir)
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
        )
