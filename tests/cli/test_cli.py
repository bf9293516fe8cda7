"""The handprop command: exit codes and one-line messages for user errors."""

import re

import numpy as np
import pytest
from click.testing import CliRunner

from handprop.cli import main


def run(*args):
    return CliRunner().invoke(main, list(map(str, args)), catch_exceptions=False)


def test_help_lists_every_command():
    out = run("--help").output
    names = ("train", "predict", "data", "experiments", "evaluate", "compare", "figures", "report")
    for name in names:
        assert name in out


@pytest.mark.parametrize(
    "args, message",
    [
        (["train", "absent.cfg"], "absent.cfg"),
        (["train"], "missing CONFIG"),
        (["data", "fetch", "cifar"], "unknown dataset 'cifar'"),
        (["predict", "absent.npz", "x.png"], "no such model file"),
        (["train", "--resume", "nowhere"], "nowhere: not found; --resume needs a run folder"),
        (["compare", "nowhere"], "nowhere"),
    ],
)
def test_user_errors_exit_1_with_one_line(args, message):
    result = run(*args)
    assert result.exit_code == 1
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("handprop: error: ")
    assert message in lines[0]


def test_bad_config_line_is_named(tmp_path):
    cfg = tmp_path / "run.cfg"
    cfg.write_text("20000\n18000\n2000\nten # hidden\n2.5\n1000\n")
    result = run("train", cfg)
    assert result.exit_code == 1
    assert "run.cfg line 4" in result.output and "'ten'" in result.output


def test_train_then_predict_on_digits(tmp_path):
    cfg = tmp_path / "d.toml"
    cfg.write_text(
        'dataset = "digits"\ntotal = 600\ntrain = 500\ntest = 100\nhidden = 16\n'
        f'learning_rate = 2.0\nepochs = 100\nout = "{tmp_path / "runs"}"\n'
    )
    result = run("train", cfg, "-q", "--seed", "1")
    assert result.exit_code == 0, result.output
    assert "test accuracy" in result.output and "results in" in result.output
    run_dir = tmp_path / "runs" / "d"
    assert (run_dir / "model.npz").is_file()

    from handprop.data import load_dataset, write_idx

    ds = load_dataset("digits")
    write_idx(tmp_path / "x.idx", ds.images[:3])
    result = run("predict", run_dir / "model.npz", tmp_path / "x.idx")
    assert result.exit_code == 0, result.output
    lines = result.output.strip().splitlines()
    assert len(lines) == 3 and all("->" in line for line in lines)


def test_predict_reads_an_image_like_mnist(tmp_path):
    from PIL import Image

    from handprop.images import prepare_image
    from handprop.nn import Network, save

    # a dark "1" on a white page, off centre
    page = np.full((60, 40), 255, dtype=np.uint8)
    page[10:40, 8:12] = 0
    Image.fromarray(page).save(tmp_path / "one.png")
    img = prepare_image(tmp_path / "one.png", (28, 28))
    assert img.shape == (28, 28) and img.max() == pytest.approx(1.0)
    assert img[0].max() == 0 and img[:, 0].max() == 0  # background is black
    rows = np.nonzero(img.max(axis=1) > 0.5)[0]
    assert rows.max() - rows.min() + 1 == 20  # longer side fitted to 20 pixels
    cy, cx = np.argwhere(img > 0.5).mean(axis=0)
    assert abs(cy - 13.5) <= 1 and abs(cx - 13.5) <= 1  # centred by mass

    net = Network.from_spec("784-10-10", rng=0, meta={"image_shape": [28, 28]})
    save(net, tmp_path / "m.npz")
    result = run("predict", tmp_path / "m.npz", tmp_path / "one.png")
    assert result.exit_code == 0 and "one.png" in result.output


def test_predict_with_a_cnn_reshapes_rows_into_images(tmp_path):
    from PIL import Image

    from handprop.data import write_idx
    from handprop.nn import Network, save

    net = Network.from_layers(
        ["conv 4 3", "relu", "maxpool 2"], (1, 28, 28), 10, rng=0, meta={"image_shape": [28, 28]}
    )
    save(net, tmp_path / "cnn.npz")
    images = np.random.default_rng(0).integers(0, 256, (2, 28, 28), dtype=np.uint8)
    write_idx(tmp_path / "x.idx", images)
    Image.fromarray(images[0]).save(tmp_path / "a.png")
    result = run("predict", tmp_path / "cnn.npz", tmp_path / "x.idx", tmp_path / "a.png")
    assert result.exit_code == 0, result.output
    lines = result.output.strip().splitlines()
    assert len(lines) == 3 and all("->" in line for line in lines)
    expected = net.predict(images[:, None] / np.float32(255))
    assert [line.split("->")[1].split()[0] for line in lines[:2]] == [str(c) for c in expected]


def test_a_bad_thread_count_is_reported_before_any_file_is_written(tmp_path, monkeypatch):
    from handprop.nn import threads

    monkeypatch.setenv("HANDPROP_THREADS", "many")
    monkeypatch.setattr(threads, "_threads", 0)  # read the variable again
    cfg = tmp_path / "d.toml"
    cfg.write_text(f'dataset = "digits"\nhidden = 8\nepochs = 2\nout = "{tmp_path / "runs"}"\n')
    result = run("train", cfg, "-q")
    assert result.exit_code == 1
    assert result.output.strip() == (
        "handprop: error: HANDPROP_THREADS must be a whole number >= 1, got 'many'"
    )
    assert not (tmp_path / "runs").exists()


def command_summaries(args, width):
    """The Commands section of ``handprop ARGS --help`` at ``width`` columns: each name
    and its summary, wrapped lines joined."""
    result = CliRunner().invoke(main, [*args, "--help"], terminal_width=width)
    assert result.exit_code == 0, result.output
    summaries = {}
    for line in result.output.split("Commands:\n", 1)[1].splitlines():
        if not line.strip():
            break
        entry = re.match(r"  (\S+)\s+(.*)", line)  # continued lines are indented further
        if entry:
            name = entry[1]
            summaries[name] = entry[2]
        else:
            summaries[name] += " " + line.strip()
    return summaries


@pytest.mark.parametrize("width", [80, 50, 200])
@pytest.mark.parametrize("group", [[], ["data"]])
def test_no_command_summary_is_cut_short(group, width):
    cli = main.commands[group[0]] if group else main
    summaries = command_summaries(group, width)
    assert set(summaries) == set(cli.commands)
    for name, summary in summaries.items():
        assert not summary.endswith("..."), f"{name}: {summary}"
        whole = cli.commands[name].short_help
        assert summary.replace(" ", "") == whole.replace(" ", ""), name  # wrapped, not cut


def help_text(*args):
    result = CliRunner().invoke(main, [*args, "--help"], prog_name="handprop", terminal_width=200)
    assert result.exit_code == 0, result.output
    return " ".join(result.output.split())


@pytest.mark.parametrize("name", ["evaluate", "report", "compare", "figures"])
def test_commands_that_take_a_run_say_a_config_file_names_its_latest_run(name):
    assert "a config file (.toml, .cfg: its latest run)" in help_text(name)


def test_predict_help_names_its_arguments_and_its_own_device():
    text = help_text("predict")
    assert "Usage: handprop predict [OPTIONS] MODEL... INPUT..." in text
    assert "ARGS" not in text
    device = text.split("--device cpu|cuda", 1)[1]
    assert "Default: cpu" in device and "config" not in device
    assert "Overrides the config's device" in help_text("train")  # train has a config
    assert "accuracy" in text and "--format [text|csv|json]" in text


def test_export_help_names_every_layer_it_exports():
    from handprop.nn import LAYERS

    text = help_text("export")
    for kind in LAYERS:
        assert kind in text, kind
    assert "batchnorm as BatchNormalization" in text


def test_data_fetch_help_lists_the_dataset_names():
    from handprop.data import DATASETS

    text = help_text("data", "fetch")
    assert all(name in text for name in DATASETS)
