"""handprop predict on hostile inputs: one line naming the file, exit 1, nothing printed
before every input has been checked; large inputs streamed batch by batch."""

import gzip
import struct

import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image

from handprop.cli import main
from handprop.data import write_idx
from handprop.errors import DataError
from handprop.nn import Network, save
from handprop.predict import open_inputs, predict_batches, prepare_image


def run(*args):
    return CliRunner().invoke(main, list(map(str, args)), catch_exceptions=False)


def one_error_line(result, message):
    assert result.exit_code == 1, result.output
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("handprop: error: "), result.output
    assert message in lines[0], lines[0]


@pytest.fixture
def model(tmp_path):
    """An 8x8-image model (the digits' shape), as a run folder holds it."""
    net = Network.from_spec(
        "64-8-10", rng=0, meta={"image_shape": [8, 8], "pixel_max": 16.0, "dataset": "digits"}
    )
    folder = tmp_path / "run"
    folder.mkdir()
    save(net, folder / "model.npz")
    return net, folder


@pytest.fixture
def images(rng):
    return rng.integers(0, 17, (5, 8, 8), dtype=np.uint8)


def test_a_run_folder_is_a_model(tmp_path, model, images):
    _, folder = model
    write_idx(tmp_path / "x.idx", images)
    by_folder = run("predict", folder, tmp_path / "x.idx")
    by_file = run("predict", folder / "model.npz", tmp_path / "x.idx")
    assert by_folder.exit_code == 0 and by_folder.output == by_file.output
    assert len(by_folder.output.splitlines()) == 5
    (tmp_path / "empty").mkdir()
    one_error_line(
        run("predict", tmp_path / "empty", tmp_path / "x.idx"), "a folder without a model.npz"
    )


@pytest.mark.parametrize("top", [0, -1])
def test_top_must_be_at_least_one(tmp_path, model, images, top):
    write_idx(tmp_path / "x.idx", images)
    one_error_line(
        run("predict", model[1], tmp_path / "x.idx", "--top", top), f"--top must be >= 1, got {top}"
    )


def test_top_is_capped_at_the_number_of_classes(tmp_path, model, images):
    write_idx(tmp_path / "x.idx", images[:1])
    result = run("predict", model[1], tmp_path / "x.idx", "--top", 50)
    assert result.exit_code == 0
    assert result.output.count(": 0.") + result.output.count(": 1.") == 10


def test_idx_rows_are_streamed_in_batches(tmp_path, model, images, monkeypatch):
    from handprop import predict

    net, _ = model
    write_idx(tmp_path / "x.idx", images)
    write_idx(tmp_path / "z.idx.gz", images[:3], compress=True)
    monkeypatch.setattr(predict, "BATCH_ROWS", 2)
    inputs = open_inputs([tmp_path / "x.idx", tmp_path / "z.idx.gz"], net)
    assert isinstance(inputs[0].rows, np.memmap)  # a raw file is mapped, not read
    batches = list(predict_batches(inputs, net))
    assert [len(names) for names, _ in batches] == [2, 2, 1, 2, 1]
    P = np.concatenate([p for _, p in batches])
    X = np.concatenate([images, images[:3]]).reshape(8, 64) / np.float32(16)
    np.testing.assert_allclose(P, net.predict_proba(X), rtol=1e-6)
    assert batches[2][0] == [f"{tmp_path / 'x.idx'}[4]"]


def idx_header(dims, code=8):
    return bytes([0, 0, code, len(dims)]) + struct.pack(f">{len(dims)}I", *dims)


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (idx_header((0, 8, 8)), "holds no images (dims 0x8x8)"),
        (idx_header((5, 0, 8)), "images of 0x8 (0 values each); the model expects 8x8"),
        (idx_header((2, 32, 32)) + bytes(2048), "images of 32x32 (1,024 values each)"),
        (idx_header((5,)) + bytes(5), "holds labels, not images"),
        (idx_header((10**6, 8, 8)) + bytes(100), "need 64,000,000 data bytes, the file has 100"),
        (idx_header((65535,) * 4), "the model expects 8x8 (64 values)"),
        (b"\x89PNG\r\n", "not an image, CSV or IDX file"),
        (idx_header((1, 8, 8), 0x0D) + np.full(64, 1e30, ">f4").tobytes(), "must lie in [0, 255]"),
        (idx_header((1, 8, 8), 0x0D) + np.full(64, np.nan, ">f4").tobytes(), "NaN or infinite"),
    ],
    ids=[
        "no images",
        "no pixels",
        "32x32",
        "labels",
        "truncated",
        "huge dims",
        "png",
        "1e30",
        "nan",
    ],
)
def test_bad_idx_inputs_are_one_line(tmp_path, model, content, message):
    (tmp_path / "bad.idx").write_bytes(content)
    result = run("predict", model[1], tmp_path / "bad.idx")
    one_error_line(result, message)
    assert "bad.idx: " in result.output


def test_a_truncated_gzip_idx_is_refused_before_any_output(tmp_path, model, images):
    write_idx(tmp_path / "good.idx", images)
    data = gzip.compress((tmp_path / "good.idx").read_bytes())
    (tmp_path / "bad.idx.gz").write_bytes(data[: len(data) - 20])
    result = run("predict", model[1], tmp_path / "good.idx", tmp_path / "bad.idx.gz")
    one_error_line(result, "bad.idx.gz: truncated")


@pytest.mark.parametrize(
    ("text", "message"),
    [("", "no data rows"), ("label,a,b\n", "no data rows"), ("5\n", "a label and pixel")],
)
def test_empty_csv_inputs_are_one_line(tmp_path, model, text, message):
    (tmp_path / "x.csv").write_text(text)
    one_error_line(run("predict", model[1], tmp_path / "x.csv"), message)


def digit_page(size=(60, 40)):
    """A dark '1' on a white page, off centre."""
    page = np.full(size, 255, dtype=np.uint8)
    page[10:40, 8:12] = 0
    return page


def test_image_variants_read_as_the_same_digit(tmp_path):
    page = digit_page()
    Image.fromarray(page).save(tmp_path / "gray.png")
    expected = prepare_image(tmp_path / "gray.png", (28, 28))
    Image.fromarray(page.astype(np.uint16) * 257).save(tmp_path / "deep.png")  # 16-bit
    frames = [Image.fromarray(page), Image.fromarray(255 - page)]
    frames[0].save(tmp_path / "anim.gif", save_all=True, append_images=frames[1:])
    dark = np.zeros((*page.shape, 4), dtype=np.uint8)  # dark ink on a transparent page
    dark[..., 3] = 255 - page
    Image.fromarray(dark, "RGBA").save(tmp_path / "dark.png")
    light = dark.copy()  # light ink on a transparent page
    light[..., :3] = 255
    Image.fromarray(light, "RGBA").save(tmp_path / "light.png")
    for name in ("deep.png", "anim.gif", "dark.png", "light.png"):
        np.testing.assert_allclose(
            prepare_image(tmp_path / name, (28, 28)), expected, atol=0.02, err_msg=name
        )


@pytest.mark.parametrize(
    ("make", "message"),
    [
        (lambda p: p.write_text("not a picture"), "not a readable image"),
        (lambda p: p.write_bytes(b""), "not a readable image"),
        (lambda p: Image.new("L", (30, 30), 255).save(p), "the image is blank"),
        (lambda p: Image.new("L", (30, 30), 0).save(p), "the image is blank"),
    ],
)
def test_bad_images_are_one_line(tmp_path, make, message):
    net = Network.from_spec("784-10-10", rng=0, meta={"image_shape": [28, 28]})
    save(net, tmp_path / "m.npz")
    make(tmp_path / "x.png")
    one_error_line(run("predict", tmp_path / "m.npz", tmp_path / "x.png"), f"x.png: {message}")


def test_a_truncated_png_is_one_line(tmp_path):
    Image.fromarray(digit_page((300, 300))).save(tmp_path / "full.png")
    data = (tmp_path / "full.png").read_bytes()
    (tmp_path / "cut.png").write_bytes(data[: len(data) // 2])
    with pytest.raises(DataError, match=r"cut\.png: not a readable image"):
        prepare_image(tmp_path / "cut.png", (28, 28))


@pytest.mark.parametrize("side", [40, 100])  # over the limit (a warning), over twice it
def test_images_over_the_pixel_limit_are_refused(tmp_path, monkeypatch, side):
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)
    Image.fromarray(digit_page((side, side))).save(tmp_path / "big.png")
    with pytest.raises(
        DataError, match=rf"big\.png: the image has {side * side:,} pixels, more than the 1,000"
    ):
        prepare_image(tmp_path / "big.png", (28, 28))


def test_a_model_with_nan_parameters_predicts_nothing(tmp_path, model, images):
    net, _ = model
    net.params[:] = np.nan
    save(net, tmp_path / "nan.npz")
    write_idx(tmp_path / "x.idx", images)
    one_error_line(run("predict", tmp_path / "nan.npz", tmp_path / "x.idx"), "NaN or infinite")
