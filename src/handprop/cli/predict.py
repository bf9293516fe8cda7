"""handprop predict: a saved model's (or an ensemble's) digit and probabilities for each
input."""

from __future__ import annotations

from pathlib import Path

import click

from handprop.cli import device_option, use_device


def split_models(args: tuple[Path, ...]) -> tuple[list[Path], list[Path]]:
    """The leading model arguments (.npz files and folders: run folders, grids) and the
    inputs after them."""
    k = 0
    while k < len(args) and (args[k].suffix.lower() == ".npz" or args[k].is_dir()):
        k += 1
    return list(args[:k]), list(args[k:])


@click.command("predict")
@click.argument("args", nargs=-1, required=True, type=click.Path(path_type=Path))
@click.option("--top", default=3, show_default=True, help="How many classes to list per input.")
@device_option
def command(args, top, device) -> None:
    """Predict the class of each INPUT (PNG/JPEG images, IDX or CSV files) with MODEL
    (a .npz model file or a run folder): handprop predict MODEL... INPUT...

    Several MODELs (or an experiment grid: each of its runs) form an ensemble: the
    mean of their probabilities. They must agree on the input (image shape, pixel
    scale) and the classes.

    Images are read MNIST-style: grayscale, white digit on black (a dark digit on a
    light background is inverted), cropped to the digit, fitted into 20x20 and centred
    by mass in 28x28. Every input is checked before the first line is printed; IDX and
    CSV rows are then predicted and printed batch by batch, on --device (cpu by
    default; a model trained on a GPU predicts on the CPU and the other way round).
    """
    from handprop.errors import ConfigError
    from handprop.predict import load_ensemble, open_inputs, predict_batches

    if top < 1:
        raise ConfigError(f"--top must be >= 1, got {top}")
    xp = use_device(device or "cpu")  # no GPU, no CuPy: one line, before any input is read
    models, inputs = split_models(args)
    if not models:
        raise ConfigError(
            f"{args[0]}: not a model; give a .npz model file or a run folder, then the inputs"
        )
    if not inputs:
        raise ConfigError("no inputs; give image, IDX or CSV files after the model(s)")
    nets = load_ensemble(models, device=xp)  # loaded on the host, then moved
    net = nets[0]
    inputs = open_inputs(inputs, net)
    classes = net.meta.get("class_names") or [str(i) for i in range(net.n_classes)]
    top = min(top, net.n_classes)
    width = max(len(item.name(item.count - 1)) for item in inputs)
    if len(nets) > 1:
        click.echo(f"ensemble of {len(nets)} models: the mean of their probabilities", err=True)
    for names, P in predict_batches(inputs, nets):
        order = P.argsort(axis=1)[:, ::-1][:, :top]
        click.echo(
            "\n".join(
                f"{name:<{width}}  -> {classes[o[0]]}   ("
                + "  ".join(f"{classes[j]}: {p[j]:.3f}" for j in o)
                + ")"
                for name, p, o in zip(names, P, order, strict=True)
            )
        )
