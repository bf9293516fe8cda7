"""handprop predict: a saved model's (or an ensemble's) digit and probabilities for each
input, and its accuracy on the inputs that carry labels."""

from __future__ import annotations

import csv
import io
import json
from pathlib import Path

import click

from handprop.cli import device_option_saying, use_device

#: the columns of ``--format csv`` (and the keys of ``--format json``'s predictions)
CSV_COLUMNS = ("input", "predicted", "probability", "label")


def split_models(args: tuple[Path, ...]) -> tuple[list[Path], list[Path]]:
    """The leading model arguments (.npz files and folders: run folders, grids) and the
    inputs after them."""
    k = 0
    while k < len(args) and (args[k].suffix.lower() == ".npz" or args[k].is_dir()):
        k += 1
    return list(args[:k]), list(args[k:])


@click.command("predict", short_help="Predict the class of images, IDX or CSV rows with MODEL.")
@click.argument(
    "args", nargs=-1, required=True, metavar="MODEL... INPUT...", type=click.Path(path_type=Path)
)
@click.option(
    "--top", default=3, show_default=True, help="How many classes to list per input (text)."
)
@click.option(
    "--format",
    "fmt",
    type=click.Choice(["text", "csv", "json"]),
    default="text",
    show_default=True,
    help="text: a line per input, then the accuracy; csv: a header and a row per input "
    f"({', '.join(CSV_COLUMNS)}; label empty when unknown), the accuracy on stderr; "
    'json: the same rows as objects, and the accuracy: {"predictions": [...], '
    '"accuracy": ...}.',
)
@device_option_saying(
    "Default: cpu. A model predicts on either, whichever device it was trained on."
)
def command(args, top, fmt, device) -> None:
    """Predict the class of each INPUT with MODEL (a .npz model file or a run folder).

    INPUTs are images (PNG, JPEG, ...), IDX files and CSV files. Several MODELs (or an
    experiment grid: each of its runs) form an ensemble: the mean of their
    probabilities. They must agree on the input (image shape, pixel scale) and the
    classes.

    Labelled inputs are scored too, and the last line gives the accuracy on each,
    e.g. "accuracy: 97.98% (291/297) on FILE": an IDX images file whose labels file
    lies beside it (t10k-images-idx3-ubyte[.gz] and t10k-labels-idx1-ubyte[.gz]:
    "images" -> "labels" and "idx3" -> "idx1" in the name), and a CSV file (label
    first, then the pixels). The labels must pair with the images, one class id of
    the model per image, or nothing is predicted.

    Images are prepared as the model's training images were: grayscale, white digit
    on black (a dark digit on a light background is inverted), cropped to the digit
    and centred (for MNIST: fitted into 20x20 and centred by mass in 28x28). Every
    input is checked before the first line is printed; IDX and CSV rows are then
    predicted and printed batch by batch, on --device.
    """
    from handprop.errors import ConfigError
    from handprop.predict import Accuracy, load_ensemble, open_inputs, predict_rows

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
    accuracy = Accuracy()
    if fmt == "csv":
        click.echo(",".join(CSV_COLUMNS))
    elif fmt == "json":
        click.echo('{"predictions": [', nl=False)
    first = True
    for batch in predict_rows(inputs, nets):
        P, labels = batch.P, batch.labels
        predicted = P.argmax(axis=1)
        accuracy.add(batch, predicted)
        if fmt == "text":
            order = P.argsort(axis=1)[:, ::-1][:, :top]
            click.echo(
                "\n".join(
                    f"{name:<{width}}  -> {classes[o[0]]}   ("
                    + "  ".join(f"{classes[j]}: {p[j]:.3f}" for j in o)
                    + ")"
                    for name, p, o in zip(batch.names, P, order, strict=True)
                )
            )
            continue
        rows = [
            (
                name,
                classes[c],
                float(P[i, c]),
                None if labels is None else classes[labels[i]],
            )
            for i, (name, c) in enumerate(zip(batch.names, predicted, strict=True))
        ]
        if fmt == "csv":
            text = io.StringIO()
            writer = csv.writer(text, lineterminator="\n")
            writer.writerows((n, c, f"{p:.6f}", "" if y is None else y) for n, c, p, y in rows)
            click.echo(text.getvalue(), nl=False)
        else:  # streamed: one object a line, never the whole list in memory
            for row in rows:
                obj = dict(zip(CSV_COLUMNS, row, strict=True))
                obj["probability"] = round(obj["probability"], 6)
                click.echo(("\n" if first else ",\n") + json.dumps(obj), nl=False)
                first = False
    if fmt == "json":
        click.echo(f'\n], "accuracy": {json.dumps(accuracy.summary())}}}')
        return
    for line in accuracy.lines():
        click.echo(line, err=fmt == "csv")  # csv: stdout holds the rows alone
