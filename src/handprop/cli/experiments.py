"""handprop experiments: a CSV of runs to a grid of run folders and a summary."""

from __future__ import annotations

from pathlib import Path

import click

from handprop.cli import check_device_name, checkpoint_every, device_option
from handprop.errors import Interrupted


@click.command("experiments", short_help="Run every row of FILE.csv as a run of one grid.")
@click.argument("csv_file", metavar="FILE.csv", type=click.Path(path_type=Path))
@click.option("--out", type=click.Path(path_type=Path), help="Grid folder [runs/<FILE>].")
@click.option(
    "--jobs", default=1, show_default=True, type=click.IntRange(1), help="Runs side by side."
)
@click.option(
    "--base", type=click.Path(path_type=Path), help="Config whose values fill empty cells."
)
@click.option("--data-dir", type=click.Path(path_type=Path), help="Directory holding the data.")
@checkpoint_every
@device_option
@click.option(
    "--scheduler",
    metavar="ADDRESS",
    help="Run the rows on the Dask cluster behind this scheduler (tcp://HOST:8786), "
    "or 'local' for a LocalCluster of --jobs workers.",
)
@click.option(
    "--cluster",
    type=click.Choice(["local"]),
    help="'local': a Dask LocalCluster of --jobs worker processes (as --scheduler local).",
)
@click.option("-q", "--quiet", is_flag=True, help="No progress bars.")
def command(
    csv_file, out, jobs, base, data_dir, checkpoint_every, device, scheduler, cluster, quiet
) -> None:
    """Run every row of FILE.csv (run_name,d,dtrain,dtest,m,alpha,epochs,...).

    Running it again continues: finished rows are skipped (the summary keeps their
    results), interrupted or killed ones resume from their checkpoints. Ctrl-C stops
    the running rows with a checkpoint, cancels the queued ones and writes the summary.

    With --scheduler the rows are tasks on a Dask cluster whose workers need not share
    a disk with this machine: each worker finds the data itself (--data-dir is then a
    path on the workers; without it, each worker's HANDPROP_DATA or cache), and the run
    folders come back here into --out.

    --device sets every row's device (a device column, or the base config's, sets it
    per row); a row already run on another device is not run again.
    """
    from handprop.errors import ConfigError
    from handprop.grids.grid import load_base, read_grid, run_grid, summary_markdown
    from handprop.nn import backend
    from handprop.scale.mpi import refuse_ranks

    # each rank would run the whole grid into the same folders
    refuse_ranks(
        "handprop experiments",
        "a grid fans its rows out with --jobs N, or on a Dask cluster with --scheduler; "
        "mpiexec -n N goes with handprop train",
    )
    if cluster is not None:
        if scheduler not in (None, "local"):
            raise ConfigError(f"--cluster local and --scheduler {scheduler}: give one of them")
        scheduler = "local"
    if scheduler not in (None, "local") and jobs > 1:
        raise ConfigError(
            f"--jobs {jobs} sizes a local cluster; the workers of the cluster behind "
            f"{scheduler} are the ones started with `dask worker`"
        )

    if device is not None:
        check_device_name(device)  # usable here or not: checked below, or on the workers
    rows = read_grid(csv_file, load_base(base))
    if data_dir is not None:
        rows = [type(r)(r.name, r.config.replace(data_dir=str(data_dir)), r.line) for r in rows]
    if device is not None:
        rows = [type(r)(r.name, r.config.replace(device=device), r.line) for r in rows]
    if scheduler is None:
        # the rows' devices, checked here before the grid folder is made (on a cluster,
        # each worker checks its own: a worker without one fails its row in one line)
        for name in sorted({r.config.device for r in rows}):
            backend.device_namespace(name)
    out = out or Path("runs") / csv_file.stem

    def done(s) -> None:
        acc = "" if s.accuracy is None else f" accuracy {s.accuracy:.2%}"
        # a row complete before is not trained again; its summary row stays "completed"
        status = f"skipped, already {s.status}" if s.skipped else s.status
        click.echo(f"{s.name}: {status}{acc}" + (f" ({s.message})" if s.message else ""))

    def report(summaries) -> None:
        click.echo("")
        click.echo(summary_markdown(summaries), nl=False)
        click.echo(f"summary in {out}/summary.csv and summary.md")

    try:
        if scheduler is None:
            summaries = run_grid(
                rows,
                out,
                jobs=jobs,
                progress=not quiet and jobs == 1,
                on_done=done,
                checkpoint_seconds=checkpoint_every,
            )
        else:
            from handprop.grids.cluster import connect, run_grid_on_cluster

            with connect(scheduler, jobs if jobs > 1 else None) as client:
                summaries = run_grid_on_cluster(
                    rows,
                    out,
                    client,
                    progress=not quiet,
                    on_done=done,
                    checkpoint_seconds=checkpoint_every,
                )
    except KeyboardInterrupt as exc:
        if isinstance(exc, Interrupted) and exc.outcome is not None:
            report(exc.outcome)
        click.echo("handprop: interrupted; run the same command again to continue", err=True)
        raise
    report(summaries)
    failed = [s for s in summaries if s.status != "completed"]
    if failed:
        raise SystemExit(1)
