"""Figures: every one a valid PNG of its fixed pixel size, written atomically."""

from __future__ import annotations

import struct
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

import handprop.figures as figures
from handprop.errors import ConfigError, DataError
from handprop.figures import pixel_size, png_bytes, write_figures
from handprop.runs import GridFolder, RunFolder
from test_runs import CLASS_NAMES, fake_images, write_grid, write_run

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def png_dimensions(data: bytes) -> tuple[int, int]:
    """(width, height) from a PNG's IHDR chunk, which must come first."""
    assert data[:8] == PNG_SIGNATURE
    length, kind = struct.unpack(">I4s", data[8:16])
    assert kind == b"IHDR" and length == 13
    return struct.unpack(">II", data[16:24])


@pytest.fixture
def images(monkeypatch) -> np.ndarray:
    """The fake dataset's images, served in place of handprop.data.load_dataset."""
    imgs = fake_images()
    monkeypatch.setattr(figures, "_load_images", lambda run: imgs)
    return imgs


@pytest.fixture
def run(tmp_path) -> RunFolder:
    return RunFolder(write_run(tmp_path / "run", comparisons=True))


# one builder per figure kind: (SIZES key, how to build it from a run folder)
RUN_FIGURES = {
    "confusion": lambda r: figures.confusion_figure(r.predictions, r.class_names, "handprop"),
    "per_class": lambda r: figures.per_class_figure(r.models, r.class_names),
    "training_curves": lambda r: figures.training_curves_figure(r.history),
    "misclassified": lambda r: figures.misclassified_figure(
        r.predictions, fake_images(), r.class_names
    ),
    "correct_incorrect": lambda r: figures.correct_incorrect_figure(r.models),
    "top_confusions": lambda r: figures.top_confusions_figure(r.models, r.class_names),
}


def size_of(kind: str, run: RunFolder) -> tuple[int, int]:
    """The pixel size a figure of ``kind`` must have for ``run``: fixed by the kind, and
    for the misclassified grid by the rows of errors it shows."""
    if kind == "misclassified":
        P = run.predictions
        return pixel_size(kind, figures.misclassified_rows(int((P.y_true != P.y_pred).sum())))
    return pixel_size(kind)


@pytest.mark.parametrize("kind", RUN_FIGURES)
def test_each_run_figure_is_a_png_of_its_fixed_size(run, kind):
    data = png_bytes(RUN_FIGURES[kind](run))
    assert png_dimensions(data) == size_of(kind, run)


def test_write_figures_writes_every_run_figure(tmp_path, images):
    # one comparison model: its figures take the same code paths as the other's
    run = write_run(tmp_path / "run", comparisons=True)
    (run / "predictions_sklearn_analogue.csv").unlink()
    result = write_figures(run)
    folder = run / "figures"
    expected = {
        "confusion_handprop.png": "confusion",
        "confusion_sklearn_default.png": "confusion",
        "per_class_metrics.png": "per_class",
        "training_curves.png": "training_curves",
        "correct_incorrect.png": "correct_incorrect",
        "top_confusions.png": "top_confusions",
        "misclassified.png": "misclassified",
        "first_layer.png": "first_layer",
        "diagnostics.png": "diagnostics",
    }
    assert {p.name for p in result.written} == set(expected)
    assert result.skipped == []
    for name, kind in expected.items():
        assert png_dimensions((folder / name).read_bytes()) == size_of(kind, RunFolder(run))
    # atomic writes leave no temporary file behind
    assert sorted(p.name for p in folder.iterdir()) == sorted(expected)


def test_unloadable_dataset_skips_only_the_misclassified_figure(tmp_path, monkeypatch):
    def fail(run):
        raise DataError("fake3: unknown dataset")

    monkeypatch.setattr(figures, "_load_images", fail)
    folder = write_run(tmp_path / "run")
    out = tmp_path / "elsewhere"
    result = write_figures(folder, out)
    assert "misclassified.png" not in {p.name for p in result.written}
    # 7: one confusion matrix + 6 other figures (diagnostics among them)
    assert len(result.written) == 7 and all(p.parent == out for p in result.written)
    assert result.skipped == [
        "misclassified: cannot load the dataset's images: fake3: unknown dataset"
    ]


def test_dataset_not_matching_the_indices_is_skipped(tmp_path, monkeypatch):
    monkeypatch.setattr(figures, "_load_images", lambda run: fake_images()[:20])
    figs, skipped = figures.build_run_figures(RunFolder(write_run(tmp_path / "run")))
    assert "misclassified" not in dict(figs)
    assert "do not match the indices" in skipped[0]


def test_run_without_history_skips_the_curves(tmp_path, images):
    figs, skipped = figures.build_run_figures(RunFolder(write_run(tmp_path / "r", history=False)))
    assert "training_curves" not in dict(figs)
    assert skipped == ["training_curves: the run has no history.csv"]


def test_perfect_run_still_draws_its_figures(tmp_path, images):
    from test_runs import Y_TRUE

    run = RunFolder(write_run(tmp_path / "r", y_pred=Y_TRUE))
    figs, _ = figures.build_run_figures(run)
    for stem in ("misclassified", "top_confusions"):
        assert png_dimensions(png_bytes(dict(figs)[stem])) == size_of(stem, run)
    assert size_of("misclassified", run) == pixel_size("misclassified", rows=1)


# --- grids --------------------------------------------------------------------------------


def test_grid_figures(tmp_path):
    grid = write_grid(
        tmp_path / "grid",
        {
            "small": {"train": 9, "epochs": 4},
            "long": {"train": 9, "epochs": 8},
            "wide": {"train": 18, "epochs": 8, "hidden": 64},
        },
    )
    result = write_figures(grid)
    names = {p.name: p for p in result.written}
    assert set(names) == {"grid_training_curves.png", "grid_accuracy.png"}
    for stem in ("grid_training_curves", "grid_accuracy"):
        assert png_dimensions(names[f"{stem}.png"].read_bytes()) == pixel_size(stem)
    varied = figures.grid_varied_parameters(GridFolder(grid))
    assert list(varied) == ["train samples", "epochs", "hidden size"]
    assert sorted(v for v, _, _ in varied["hidden size"]) == [16, 16, 64]


def test_grid_varying_one_parameter_has_one_panel(tmp_path):
    grid = GridFolder(write_grid(tmp_path / "g", {"e4": {"epochs": 4}, "e8": {"epochs": 8}}))
    assert list(figures.grid_varied_parameters(grid)) == ["epochs"]


def test_grid_varying_nothing_skips_the_accuracy_figure(tmp_path):
    grid = write_grid(tmp_path / "g", {"a": {}, "b": {}})
    result = write_figures(grid)
    assert [p.name for p in result.written] == ["grid_training_curves.png"]
    assert "grid_accuracy" in result.skipped[0]


# --- style and errors ---------------------------------------------------------------------


def test_style_does_not_leak_into_global_matplotlib_state(run):
    import matplotlib

    before = dict(matplotlib.rcParams)
    png_bytes(RUN_FIGURES["per_class"](run))
    assert dict(matplotlib.rcParams) == before


def test_missing_run_folder(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        write_figures(tmp_path / "missing")


def _runner() -> CliRunner:
    """A runner keeping stderr apart (the default from click 8.2, an option before)."""
    try:
        return CliRunner(mix_stderr=False)
    except TypeError:
        return CliRunner()


def test_cli_prints_the_files_written(tmp_path, monkeypatch):
    from handprop.cli.figures import command

    def fail(run):
        raise DataError("no such dataset")

    monkeypatch.setattr(figures, "_load_images", fail)
    folder = write_run(tmp_path / "run", history=False)
    out = tmp_path / "figs"
    result = _runner().invoke(command, [str(folder), "--out", str(out)])
    assert result.exit_code == 0, result.output
    printed = [Path(line) for line in result.stdout.splitlines()]
    warnings = result.stderr.splitlines()
    assert len(warnings) == 2 and all(w.startswith("handprop: warning: skipped ") for w in warnings)
    assert len(printed) == 6 and all(p.is_file() and p.parent == out for p in printed)


def test_first_layer_of_a_cnn_and_of_an_mlp(tmp_path):
    from handprop import nn

    cnn = nn.Network.from_layers(["conv 6 3", "relu", "maxpool 2"], (1, 8, 8), 3)
    images, what = figures.first_layer_images(cnn)
    np.testing.assert_array_equal(images, cnn.layers[0].W[:, 0])  # one input channel
    assert what == "all 6 3x3 filters of the convolution"
    mlp = nn.Network.from_spec([64, 40, 3], meta={"image_shape": [8, 8]})
    images, what = figures.first_layer_images(mlp)
    assert images.shape == (32, 8, 8) and "32 of 40 hidden units" in what
    np.testing.assert_array_equal(images[5], mlp.layers[0].W[:, 5].reshape(8, 8))
    for net in (cnn, mlp):
        data = png_bytes(figures.first_layer_figure(net))
        assert png_dimensions(data) == pixel_size("first_layer")


def test_first_layer_without_image_shaped_weights_is_skipped(tmp_path, images):
    from handprop import nn

    folder = write_run(tmp_path / "run")
    nn.save(nn.Network.from_spec([64, 16, 3]), folder / "model.npz")  # no image shape
    figs, skipped = figures.build_run_figures(RunFolder(folder))
    assert "first_layer" not in dict(figs)
    assert skipped == ["first_layer: the first layer Dense(d_in=64, d_out=16) has no "
                       "image-shaped weights to draw"]  # fmt: skip
    (folder / "model.npz").unlink()
    _, skipped = figures.build_run_figures(RunFolder(folder))
    assert skipped == ["first_layer: the run has no model.npz"]


def test_cli_user_error(tmp_path):
    from handprop.cli.figures import command

    result = CliRunner().invoke(command, [str(tmp_path / "missing")])
    assert result.exit_code == 1 and isinstance(result.exception, ConfigError)


def test_class_names_are_the_runs(run):
    assert run.class_names == CLASS_NAMES
