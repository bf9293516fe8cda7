"""handprop train: one config to one run folder."""

from __future__ import annotations

from pathlib import Path

import click

from handprop.cli import checkpoint_every, device_option, use_device
from handprop.data.registry import DATASETS
from handprop.errors import ConfigError, HandpropError, Interrupted

DATASET_NAMES = tuple(DATASETS)


@click.command("train", short_help="Train the network CONFIG describes into a run folder.")
@click.argument("config", required=False, type=click.Path(dir_okay=False, path_type=Path))
@click.option("--dataset", type=click.Choice(DATASET_NAMES), help="Dataset to train on.")
@click.option("--data-dir", type=click.Path(path_type=Path), help="Directory holding the files.")
@click.option(
    "--seed",
    type=int,
    help="Seed of the initialisation, the mini-batch order, the dropout masks and the "
    "augmentation. The split stays the config's (its split_seed, else its seed), so runs "
    "with --seed 0, 1, 2 share a test set and form an ensemble.",
)
@click.option(
    "--split-seed",
    type=int,
    help="Seed of the train/test split and the validation part [the config's split_seed, "
    "else its seed].",
)
@click.option("--out", type=click.Path(path_type=Path), help="Folder in which runs are made.")
@click.option("--resume", type=click.Path(path_type=Path), help="Continue an interrupted RUN.")
@click.option(
    "--epochs",
    type=click.IntRange(min=1),
    help="With --resume: train to this many epochs instead (not with a cosine schedule).",
)
@checkpoint_every
@device_option
@click.option("-q", "--quiet", is_flag=True, help="No progress bar.")
def command(
    config,
    dataset,
    data_dir,
    seed,
    split_seed,
    out,
    resume,
    epochs,
    checkpoint_every,
    device,
    quiet,
) -> None:
    """Train the network CONFIG describes (6-line .cfg or .toml) into a run folder.

    A checkpoint is written every --checkpoint-every seconds and on Ctrl-C or SIGTERM;
    `handprop train --resume RUN` continues from it, also after a kill (on --device,
    if given, else on the device it began on).
    """
    from handprop.config import load_config
    from handprop.nn import backend
    from handprop.run import resume_run, train_run
    from handprop.scale import mpi

    progress = not quiet
    world = mpi.world()  # MPI's under `mpiexec -n N`, else this process alone
    if device is not None:
        use_device(device)  # no GPU, no CuPy: one line now, before anything is written
    try:
        if resume is not None:
            if config is not None:
                raise ConfigError("give either CONFIG or --resume RUN, not both")
            for option, value in (("--seed", seed), ("--split-seed", split_seed)):
                if value is not None:
                    raise ConfigError(
                        f"{option} goes with CONFIG; a resumed run keeps the seeds it began "
                        f"with (in {resume / 'config.toml'})"
                    )
            result = resume_run(
                resume,
                progress=progress,
                epochs=epochs,
                checkpoint_seconds=checkpoint_every,
                world=world,
                device=device,
            )
        else:
            if config is None:
                raise ConfigError("missing CONFIG (a .cfg or .toml file), or --resume RUN")
            if epochs is not None:
                raise ConfigError("--epochs goes with --resume; set epochs in CONFIG instead")
            cfg = load_config(config)
            if seed is not None and split_seed is None:
                split_seed = cfg.resolved_split_seed  # --seed alone keeps the config's split
            overrides = {
                k: v
                for k, v in {
                    "dataset": dataset,
                    "data_dir": None if data_dir is None else str(data_dir),
                    "seed": seed,
                    "split_seed": split_seed,
                    "out": None if out is None else str(out),
                    "device": device,
                }.items()
                if v is not None
            }
            if overrides:
                cfg = cfg.replace(**overrides)
            backend.device_namespace(cfg.device)  # the config's device: checked before any file
            result = train_run(
                cfg,
                default_name=config.stem,
                progress=progress,
                checkpoint_seconds=checkpoint_every,
                world=world,
            )
    except KeyboardInterrupt as exc:
        result = exc.outcome if isinstance(exc, Interrupted) else None
        said = result.message if result is not None else "interrupted"
        if world.rank == 0:
            click.echo(f"\nhandprop: {said}", err=True)
        raise

    if result.status != "completed":
        if world.size > 1:  # every rank stopped at the same step: one of them says why
            if world.rank == 0:
                click.echo(f"handprop: error: {result.message} (recorded in {result.run_dir})")
            raise SystemExit(1)
        raise HandpropError(f"{result.message} (recorded in {result.run_dir})")
    if world.rank != 0:
        return
    m = result.metrics
    ranks = f", {world.size} MPI ranks" if world.size > 1 else ""
    on = f", on {m['device']}" if m.get("device", "cpu") != "cpu" else ""
    click.echo(
        f"test accuracy {m['accuracy']:.2%} on {m['split']['test']} samples "
        f"(train {m['split']['train']}, {result.epochs_completed} epochs, "
        f"{result.train_seconds:.1f} s, {m['n_params']:,d} parameters{ranks}{on})"
    )
    click.echo(f"results in {result.run_dir}/")
