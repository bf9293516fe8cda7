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
    from handprop.data import DATASETS, locate, verify_files
    from handprop.errors import DataError

    for name, spec in DATASETS.items():
        if spec.builtin:
            where, status = "bundled with scikit-learn", "available"
        else:
            found = locate(spec, data_dir)
            if found is None:
                where, status = "not found (handprop data fetch " + name + ")", "missing"
            else:
                how, directory, paths = found
                size = sum(p.stat().st_size for p in paths) / 1e6
                where, status = f"{directory} [{how}, {size:.1f} MB]", "available"
                try:
                    verify_files(spec, paths)
                except DataError as exc:
                    where, status = str(exc), "invalid"
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
    """Check the files of dataset NAME against their pinned checksums."""
    from handprop.data import check_file, get_spec, locate, no_data_message
    from handprop.errors import DataError

    spec = get_spec(name)
    if spec.builtin:
        click.echo(f"{name}: bundled with scikit-learn; nothing to verify")
        return
    found = locate(spec, data_dir)
    if found is None:
        raise DataError(no_data_message(spec, "there is nothing to verify"))
    _, directory, paths = found
    failed = 0
    for f, path in zip(spec.files, paths, strict=True):
        ok, why = check_file(path, f)
        mark = {True: "OK", False: "FAIL", None: "UNCHECKED"}[ok]
        failed += ok is False
        click.echo(f"{mark:<9} {path}  ({why})")
    if failed:
        raise DataError(f"{failed} file(s) of {name} in {directory} failed verification")
