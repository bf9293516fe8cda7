"""handprop export: a saved model as an ONNX file."""

from __future__ import annotations

from pathlib import Path

import click


@click.command("export", short_help="Write MODEL as an ONNX graph.")
@click.argument("model", type=click.Path(path_type=Path))
@click.option(
    "--format", "fmt", type=click.Choice(["onnx"]), default="onnx", show_default=True,
    help="The file format.",
)  # fmt: skip
@click.option(
    "-o", "--output", type=click.Path(path_type=Path),
    help="File to write [MODEL's folder/model.onnx, never overwritten].",
)  # fmt: skip
def command(model: Path, fmt: str, output: Path | None) -> None:
    """Write MODEL (a .npz model file or a run folder) as an ONNX graph.

    Built from handprop's layer list, each layer as the ONNX operator that computes
    the same: dense as Gemm, conv2d as Conv, maxpool2d and avgpool2d as MaxPool and
    AveragePool, flatten as Flatten, batchnorm as BatchNormalization (its running mean
    and variance), sigmoid, tanh and relu as Sigmoid, Tanh and Relu; dropout and
    identity (the identity at inference) are left out; Softmax (or, for an mse model,
    the outputs divided by their sum) gives the probabilities. Weights are
    initializers, the batch dimension is dynamic, the input's normalisation is in
    the metadata. The graph passes
    onnx.checker and, when onnxruntime is installed, must give handprop's probabilities
    to 1e-5 before it is written. The default file is never overwritten; -o FILE
    replaces an existing FILE only if it ends in .onnx. Needs the onnx extra:
    pip install -e ".[onnx]".
    """
    from handprop.errors import OutputError
    from handprop.export import CHECK_SAMPLES, export
    from handprop.predict import MODEL_FILE, load_model

    net = load_model(model)
    source = model / MODEL_FILE if model.is_dir() else model
    if output is None:
        output, overwrite = source.with_suffix(".onnx"), False
    else:
        overwrite = output.suffix.lower() == ".onnx"
        if output.exists() and not overwrite and not output.is_dir():
            raise OutputError(
                f"{output}: already exists and is not an .onnx file; handprop export "
                "replaces .onnx files only"
            )
    _, diff = export(net, output, name=source.parent.name or "handprop", overwrite=overwrite)
    checked = (
        f"onnxruntime agrees to {diff:.1e} on {CHECK_SAMPLES} random inputs"
        if diff is not None
        else "not run: onnxruntime is not installed"
    )
    click.echo(
        f"wrote {output} (ONNX opset 17, {net.n_params:,} parameters; "
        f"onnx.checker passed; {checked})"
    )
