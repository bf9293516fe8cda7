"""handprop predict: a saved model's digit and probabilities for each input."""

from __future__ import annotations

from pathlib import Path

import click


@click.command("predict")
@click.argument("model", type=click.Path(path_type=Path))
@click.argument("inputs", nargs=-1, required=True, type=click.Path(path_type=Path))
@click.option("--top", default=3, show_default=True, help="How many classes to list per input.")
def command(model, inputs, top) -> None:
    """Predict the class of each INPUT (PNG/JPEG images, IDX or CSV files) with MODEL.

    Images are read MNIST-style: grayscale, white digit on black (a dark digit on a
    light background is inverted), cropped to the digit, fitted into 20x20 and centred
    by mass in 28x28.
    """
    from handprop import nn
    from handprop.predict import load_inputs

    net = nn.load(model)
    names, X = load_inputs(list(inputs), net)
    P = net.predict_proba(X)
    classes = net.meta.get("class_names") or [str(i) for i in range(net.n_classes)]
    width = max(len(n) for n in names)
    for name, p in zip(names, P, strict=True):
        order = p.argsort()[::-1][:top]
        ranked = "  ".join(f"{classes[j]}: {p[j]:.3f}" for j in order)
        click.echo(f"{name:<{width}}  -> {classes[order[0]]}   ({ranked})")
