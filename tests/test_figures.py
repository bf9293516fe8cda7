"""Figures: every one a valid PNG of its fixed pixel size, written atomically."""

from __future__ import annotations

import struct
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

import handprop.analysis.figures as figures
import handprop.analysis.figures.writing as figure_writing
from handprop import nn
from handprop.analysis.figures import pixel_size, png_bytes, write_figures
from handprop.errors import ConfigError, DataError
from handprop.run.reader import GridFolder, LayerDiagnostics, Predictions, RunFolder
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
    monkeypatch.setattr(figure_writing, "_load_images", lambda run: imgs)
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
    if kind == "first_layer":
        images, _ = figures.first_layer_images(nn.load(run.path / "model.npz"))
        return pixel_size(kind, figures.first_layer_rows(len(images)))
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

    monkeypatch.setattr(figure_writing, "_load_images", fail)
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
    monkeypatch.setattr(figure_writing, "_load_images", lambda run: fake_images()[:20])
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

    monkeypatch.setattr(figure_writing, "_load_images", fail)
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
    # as many rows as the images fill: 6 filters one row, 32 units the full four
    for net, rows in ((cnn, 1), (mlp, 4)):
        data = png_bytes(figures.first_layer_figure(net))
        assert figures.first_layer_rows(len(figures.first_layer_images(net)[0])) == rows
        assert png_dimensions(data) == pixel_size("first_layer", rows)
    assert pixel_size("first_layer", 4) == pixel_size("first_layer")  # the full grid
    assert [figures.first_layer_rows(n) for n in (1, 8, 9, 16, 32, 64)] == [1, 1, 2, 2, 4, 4]


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


# --- figures that misled (issue 26): what each one now draws -----------------------------


def predictions(y_true: np.ndarray, y_pred: np.ndarray, k: int) -> Predictions:
    """Predictions of ``y_pred`` for ``y_true`` (probabilities one-hot on the prediction)."""
    y_true, y_pred = np.asarray(y_true), np.asarray(y_pred)
    return Predictions(
        np.arange(len(y_true)), y_true, y_pred, np.eye(k)[y_pred], Path("predictions.csv")
    )


def overlap(a, b, tolerance: float = 1) -> bool:
    """Whether two display boxes overlap by more than ``tolerance`` pixels."""
    t = tolerance
    return a.x0 < b.x1 - t and b.x0 < a.x1 - t and a.y0 < b.y1 - t and b.y0 < a.y1 - t


@pytest.mark.parametrize(
    ("lowest", "floor"),
    [(0.88, 0.85), (1.0, 0.95), (0.95, 0.9), (0.86, 0.85), (0.855, 0.8), (0.4, 0.0)],
)
def test_per_class_floor_is_a_step_below_the_lowest_score(lowest, floor):
    assert figures.per_class_floor(np.array([1.0, lowest, np.nan])) == floor


def test_per_class_axes_zoom_on_high_scores_and_say_where():
    # 3 classes of 20: one 0 predicted as 1 and one 2 predicted as 1; lowest score
    # precision of class 1: 20 / 22 = 0.909 -> the axes start at 0.85
    y_true = np.repeat([0, 1, 2], 20)
    y_pred = y_true.copy()
    y_pred[[0, 40]] = 1
    fig = figures.per_class_figure({"handprop": predictions(y_true, y_pred, 3)}, ["a", "b", "c"])
    axes = fig.axes
    assert [ax.get_ylim() for ax in axes] == [(0.85, 1.0)] * 3
    assert [ax.get_ylabel() for ax in axes] == [
        f"{m}\n(axis from 0.85)" for m in ("precision", "recall", "F1")
    ]
    assert "from 0.85, not 0" in fig.get_suptitle()
    # a score far from 1 (class 2 never predicted: 0): from 0, as before, and no note
    fig = figures.per_class_figure({"handprop": predictions(y_true, y_true % 2, 3)}, list("abc"))
    assert [ax.get_ylim() for ax in fig.axes] == [(0.0, 1.0)] * 3
    assert "from" not in fig.get_suptitle() + fig.axes[0].get_ylabel()


def test_grid_accuracy_joins_only_runs_that_differ_in_that_setting_alone(tmp_path):
    grid = GridFolder(
        write_grid(
            tmp_path / "g",
            {
                "h16_e4": {"hidden": 16, "epochs": 4},
                "h32_e4": {"hidden": 32, "epochs": 4},
                "h32_e8": {"hidden": 32, "epochs": 8},
                # differs from every other run in three settings: on no line
                "big": {"hidden": 64, "epochs": 12, "train": 9},
            },
        )
    )
    varied = figures.grid_varied_parameters(grid)
    assert list(varied) == ["train samples", "epochs", "hidden size"]
    others = ["train samples", "epochs"]
    [line] = figures.grid_lines(grid, "hidden size", others)
    assert [(v, r) for v, _, r in line.points] == [(16, "h16_e4"), (32, "h32_e4")]
    assert line.held == "train samples 18, epochs 4"
    fig = figures.grid_accuracy_figure(grid, varied)
    panels = {ax.get_xlabel(): ax for ax in fig.axes if ax.get_xlabel()}
    keys = [ax for ax in fig.axes if not ax.axison]  # the legends' row under the panels

    def drawn(label):
        return [list(line.get_xdata()) for line in panels[label].get_lines()]

    # before: one line through the mean accuracy at every value, whatever else differed
    assert drawn("hidden size") == [[16, 32]]
    assert drawn("epochs") == [[4, 8]]
    assert drawn("train samples") == []
    notes = [t.get_text() for key in keys for t in key.get_legend().get_texts()]
    assert "no line: no two runs differ only in train samples" in notes
    assert "train samples 18, hidden size 32" in notes  # what the epochs line holds equal


def test_grid_lines_tell_apart_groups_that_differ_in_another_setting(tmp_path):
    folder = write_grid(
        tmp_path / "g", {name: {"epochs": e} for name, e in [("a4", 4), ("a8", 8), ("b4", 4)]}
    )
    config = folder / "b4" / "config.toml"
    config.write_text(config.read_text().replace("learning_rate = 2.5", "learning_rate = 0.5"))
    (folder / "b8").mkdir()
    for f in (folder / "a8").iterdir():
        (folder / "b8" / f.name).write_bytes(f.read_bytes())
    (folder / "b8" / "config.toml").write_text(
        config.read_text().replace("epochs = 4", "epochs = 8")
    )
    lines = figures.grid_lines(GridFolder(folder), "epochs", [])
    assert sorted(line.held for line in lines) == ["learning_rate 0.5", "learning_rate 2.5"]


def test_grid_training_curves_keep_every_run_visible_and_the_legend_off_the_title(tmp_path):
    # "short" is the first 4 epochs of "long", point for point: drawn last, it lies on top
    names = ["long", "short", "c", "d", "e"]
    grid = GridFolder(
        write_grid(tmp_path / "g", {n: {"epochs": 8 if n == "long" else 4} for n in names})
    )
    fig = figures.grid_training_curves_figure(grid)
    ax_loss, ax_acc = fig.axes
    lines = {line.get_label(): line for line in ax_loss.get_lines()}
    looks = {
        (str(ln.get_color()), str(ln.get_linestyle()), ln.get_marker()) for ln in lines.values()
    }
    assert len(looks) == len(names)  # no two runs drawn alike
    assert len({ln.get_linestyle() for ln in lines.values()}) > 1
    assert lines["short"].get_zorder() > lines["long"].get_zorder()
    np.testing.assert_array_equal(lines["short"].get_ydata(), lines["long"].get_ydata()[:4])
    [legend] = fig.legends
    assert [t.get_text() for t in legend.get_texts()] == sorted(names)  # the grid's order
    renderer = fig.canvas.get_renderer()
    fig.draw(renderer)
    box = legend.get_window_extent(renderer)
    # not beside the title (where it was), and over no curve
    assert box.y1 < fig._suptitle.get_window_extent(renderer).y0
    for ax in (ax_loss, ax_acc):
        assert not overlap(box, ax.get_tightbbox(renderer))


def test_top_confusion_count_labels_fit_their_bars(tmp_path):
    # 10 confused pairs on 10 classes, three models: most counts of the other two are 0
    rng = np.random.default_rng(0)
    y_true = np.repeat(np.arange(10), 30)
    pairs = [(t, (t + 1 + t % 3) % 10) for t in range(10)]
    models = {}
    for model, n_pairs in (("handprop", 10), ("sklearn_default", 3), ("sklearn_analogue", 1)):
        y_pred = y_true.copy()
        for t, p in pairs[:n_pairs]:
            rows = np.flatnonzero(y_true == t)[: 1 + rng.integers(0, 3)]
            y_pred[rows] = p
        models[model] = predictions(y_true, y_pred, 10)
    fig = figures.top_confusions_figure(models, [str(i) for i in range(10)])
    [ax] = fig.axes
    renderer = fig.canvas.get_renderer()
    fig.draw(renderer)
    labels = ax.texts
    assert len(labels) == 30  # a count per model and pair
    sizes = {t.get_fontsize() for t in labels}
    assert len(sizes) == 1 and 6 <= sizes.pop() <= 9
    # each label (its line box, descent included) no taller than its bar: neighbours'
    # labels, such as the 0s of three models side by side, cannot run together
    bar = ax.patches[0].get_window_extent(renderer).height
    boxes = [t.get_window_extent(renderer) for t in labels]
    assert max(b.height for b in boxes) <= bar
    crowded = [
        (labels[i].get_text(), labels[j].get_text())
        for i in range(len(boxes))
        for j in range(i + 1, len(boxes))
        if overlap(boxes[i], boxes[j], tolerance=0)
    ]
    assert crowded == []
    zeros = [t for t in labels if t.get_text() == "0"]  # their bar has no length: in grey
    assert len(zeros) >= 10 and all(t.get_color() == "0.45" for t in zeros)


def diagnostics_layer(number: int, update_ratio: list[float | None]) -> LayerDiagnostics:
    epoch = np.arange(1, len(update_ratio) + 1) * 10.0
    ratio = np.array([np.nan if r is None else r for r in update_ratio])
    nan = np.full(len(epoch), np.nan)
    values = {"grad_norm": 0.1 / epoch, "weight_norm": 1 + epoch / 100, "update_ratio": ratio}
    return LayerDiagnostics(
        number, f"dense {number}", "sigmoid", epoch, {**values, "saturated": nan, "dead": nan}
    )


def test_diagnostics_mark_a_zero_update_at_the_bottom_of_its_log_axis():
    # a cosine schedule's last step has learning rate 0: an update ratio of 0
    layers = [
        diagnostics_layer(1, [None, 1e-2, 1e-3, 0.0]),
        diagnostics_layer(2, [None, 1e-2, 1e-3, 1e-4]),
    ]
    fig = figures.diagnostics_figure([("cosine", layers)])
    ax_grad, _, ax_ratio, _ = fig.axes
    marks = [line for line in ax_ratio.get_lines() if line.get_marker() == figures.ZERO_MARKER]
    assert len(marks) == 1  # layer 1's zero; a missing value (epoch 10) is no zero
    [(x, y)] = marks[0].get_xydata()
    assert x == 40
    # y in axes coordinates: at the bottom whatever the log axis' range
    bottom = ax_ratio.transAxes.inverted().transform(marks[0].get_transform().transform((x, y)))
    assert bottom[1] == pytest.approx(0.03)
    assert ax_ratio.get_xlim()[1] >= 40 and ax_ratio.get_ylim()[0] > 0
    [note] = [t.get_text() for t in ax_ratio.get_legend().get_texts()]
    assert note.startswith("epoch 40: update 0 (learning rate 0") and "not on a log axis" in note
    assert ax_grad.get_legend() is None  # no zero there, no note
