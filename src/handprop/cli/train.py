"""handprop train: one config to one run folder."""

from __future__ import annotations

import sys
from pathlib import Path

import click

from handprop.errors import ConfigError, DivergenceError


@click.command("train")
@click.argument("config", required=False, type=click.Path(dir_okay=False, path_type=Path))
@click.option("--dataset", help="Dataset name (mnist, fashion-mnist, digits).")
@click.option("--data-dir", type=click.Path(path_type=Path), help="Directory holding the files.")
@click.option("--seed", type=int, help="Seed of the split and the initialisation.")
@click.option("--out", type=click.Path(path_type=Path), help="Folder in which runs are made.")
@click.option("--resume", type=click.Path(path_type=Path), help="Continue an interrupted RUN.")
@click.option("-q", "--quiet", is_flag=True, help="No progress bar.")
def command(config, dataset, data_dir, seed, out, resume, quiet) -> None:
    """Train the network CONFIG describes (6-line .cfg or .toml) into a run folder."""
    from handprop.config import load_config
    from handprop.train import resume_run, train_run

    progress = not quiet
    try:
        if resume is not None:
            if config is not None:
                raise ConfigError("give either CONFIG or --resume RUN, not both")
            result = resume_run(resume, progress=progress)
        else:
            if config is None:
                raise ConfigError("missing CONFIG (a .cfg or .toml file), or --resume RUN")
            cfg = load_config(config)
            overrides = {
                k: v
                for k, v in {
                    "dataset": dataset,
                    "data_dir": None if data_dir is None else str(data_dir),
                    "seed": seed,
                    "out": None if out is None else str(out),
                }.items()
                if v is not None
            }
            if overrides:
                cfg = cfg.replace(**overrides)
            result = train_run(cfg, default_name=config.stem, progress=progress)
    except KeyboardInterrupt:
        click.echo("\nhandprop: interrupted; the run folder holds a checkpoint", err=True)
        sys.exit(130)

    if result.status == "diverged":
        raise DivergenceError(f"{result.message} (recorded in {result.run_dir})")
    m = result.metrics
    click.echo(
        f"test accuracy {m['accuracy']:.2%} on {m['split']['test']} samples "
        f"(train {m['split']['train']}, {result.epochs_completed} epochs, "
        f"{result.train_seconds:.1f} s, {m['n_params']:,d} parameters)"
    )
    click.echo(f"results in {result.run_dir}/")
