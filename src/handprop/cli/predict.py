"""handprop predict: a saved model's digit and probabilities for each input."""

from __future__ import annotations

from pathlib import Path

import click


@click.command("predict")
@click.argument("model", type=click.Path(path_type=Path))
@click.argument("inputs", nargs=-1, required=True, type=click.Path(path_type=Path))
@click.option("--top", default=3, show_default=True, help="How many classes to list per input.")
def command(model, inputs, top) -> None:
    """Predict the class of each INPUT (PNG/JPEG images, IDX or CSV files) with MODEL
    (a .npz model file or a run folder).

    Images are read MNIST-style: grayscale, white digit on black (a dark digit on a
    light background is inverted), cropped to the digit, fitted into 20x20 and centred
    by mass in 28x28. Every input is checked before the first line is printed; IDX and
    CSV rows are then predicted and printed batch by batch.
    """
    from handprop.errors import ConfigError
    from handprop.predict import load_model, open_inputs, predict_batches

    if top < 1:
        raise ConfigError(f"--top must be >= 1, got {top}")
    net = load_model(model)
    inputs = open_inputs(list(inputs), net)
    classes = net.meta.get("class_names") or [str(i) for i in range(net.n_classes)]
    top = min(top, net.n_classes)
    width = max(len(item.name(item.count - 1)) for item in inputs)
    for names, P in predict_batches(inputs, net):
        order = P.argsort(axis=1)[:, ::-1][:, :top]
        click.echo(
            "\n".join(
                f"{name:<{width}}  -> {classes[o[0]]}   ("
                + "  ".join(f"{classes[j]}: {p[j]:.3f}" for j in o)
                + ")"
                for name, p, o in zip(names, P, order, strict=True)
            )
        )
