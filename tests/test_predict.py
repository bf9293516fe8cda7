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
from handprop.images import prepare_image
from handprop.nn import Network, save
from handprop.predict import open_inputs, predict_batches


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


def test_a_model_with_a_negative_batchnorm_variance_predicts_nothing(tmp_path, images):
    """It predicted NaN probabilities, exit 0 (and export wrote them): refused at load."""
    net = Network.from_layers(
        ["dense 8", "batchnorm", "relu"], (64,), 10, rng=0, meta={"image_shape": [8, 8]}
    )
    net.layers[1].running_var[3] = -1.0
    save(net, tmp_path / "neg.npz")
    write_idx(tmp_path / "x.idx", images)
    message = "neg.npz: batchnorm layer 1's running_var (running variance) has 1 negative value"
    one_error_line(run("predict", tmp_path / "neg.npz", tmp_path / "x.idx"), message)
    one_error_line(run("export", tmp_path / "neg.npz", "-o", tmp_path / "neg.onnx"), message)
    assert not (tmp_path / "neg.onnx").exists()


# -- labelled inputs: the accuracy, --format csv|json --------------------------------


def predicted(net, images):
    return net.predict(images.reshape(len(images), -1) / np.float32(16))


@pytest.fixture
def labelled(tmp_path, model, images):
    """An MNIST-named IDX pair (gzip images, raw labels) whose labels are the model's
    own predictions with the first two changed: 3 of 5 right."""
    net, _ = model
    labels = predicted(net, images).astype(np.uint8)
    labels[:2] = (labels[:2] + 1) % 10
    write_idx(tmp_path / "t10k-images-idx3-ubyte.gz", images, compress=True)
    write_idx(tmp_path / "t10k-labels-idx1-ubyte", labels)
    return tmp_path / "t10k-images-idx3-ubyte.gz", tmp_path / "t10k-labels-idx1-ubyte", labels


def write_csv(path, labels, images, header=True):
    rows = [",".join(map(str, [y, *x.ravel()])) for y, x in zip(labels, images, strict=True)]
    head = ["label," + ",".join(f"pixel{i}" for i in range(images[0].size))] if header else []
    path.write_text("\n".join(head + rows) + "\n")


def test_an_idx_file_with_labels_beside_it_prints_the_accuracy(tmp_path, model, labelled):
    images, labels, _ = labelled
    result = run("predict", model[1], images)
    assert result.exit_code == 0, result.output
    *lines, last = result.output.splitlines()
    assert last == f"accuracy: 60.00% (3/5) on {images} (labels: {labels})"
    # the lines above are those of the same images without labels, as before
    (tmp_path / "alone").mkdir()
    alone = tmp_path / "alone" / images.name
    alone.write_bytes(images.read_bytes())
    plain = run("predict", model[1], alone).output
    assert plain == "\n".join(lines).replace(str(images), str(alone)) + "\n"
    assert "accuracy" not in plain


@pytest.mark.parametrize(
    ("images", "labels"),
    [
        ("train-images-idx3-ubyte", "train-labels-idx1-ubyte.gz"),
        ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"),
        ("train-images.idx3-ubyte", "train-labels.idx1-ubyte"),  # as Kaggle names them
        ("digits-images.idx", "digits-labels.idx"),
    ],
)
def test_labels_are_found_beside_the_images_by_name(tmp_path, images, labels):
    from handprop.predict import labels_beside

    (tmp_path / images).touch()
    assert labels_beside(tmp_path / images) is None
    (tmp_path / labels).touch()
    assert labels_beside(tmp_path / images) == tmp_path / labels
    assert labels_beside(tmp_path / "x.idx") is None


def test_a_csv_file_is_scored_by_its_label_column(tmp_path, model, images):
    net, _ = model
    labels = predicted(net, images)
    labels[0] = (labels[0] + 1) % 10
    write_csv(tmp_path / "x.csv", labels, images)
    write_csv(tmp_path / "y.csv", labels[:2], images[:2], header=False)
    write_idx(tmp_path / "z.idx", images)  # no labels: predicted, not scored
    result = run("predict", model[1], tmp_path / "x.csv", tmp_path / "z.idx", tmp_path / "y.csv")
    assert result.exit_code == 0, result.output
    assert result.output.splitlines()[-3:] == [
        f"accuracy: 80.00% (4/5) on {tmp_path / 'x.csv'}",
        f"accuracy: 50.00% (1/2) on {tmp_path / 'y.csv'}",
        "accuracy: 71.43% (5/7) on all 2 labelled inputs",
    ]
    assert len(result.output.splitlines()) == 12 + 3


def test_format_csv_is_a_header_and_a_row_per_input(tmp_path, model, images, labelled):
    import csv

    net, _ = model
    write_idx(tmp_path / "x.idx", images[:2])
    result = run("predict", model[1], labelled[0], tmp_path / "x.idx", "--format", "csv")
    assert result.exit_code == 0, result.output
    rows = list(csv.reader(result.stdout.splitlines()))
    assert rows[0] == ["input", "predicted", "probability", "label"]
    P = net.predict_proba(images.reshape(5, -1) / np.float32(16))
    assert [r[0] for r in rows[1:]] == [f"{labelled[0]}[{i}]" for i in range(5)] + [
        f"{tmp_path / 'x.idx'}[{i}]" for i in range(2)
    ]
    assert [int(r[1]) for r in rows[1:6]] == list(P.argmax(axis=1))
    np.testing.assert_allclose([float(r[2]) for r in rows[1:6]], P.max(axis=1), atol=1e-6)
    assert [r[3] for r in rows[1:]] == [str(y) for y in labelled[2]] + ["", ""]
    assert result.stderr == f"accuracy: 60.00% (3/5) on {labelled[0]} (labels: {labelled[1]})\n"


def test_format_json_is_the_rows_as_objects_and_the_accuracy(tmp_path, model, images, labelled):
    import json

    write_idx(tmp_path / "x.idx", images[:1])
    result = run("predict", model[1], labelled[0], tmp_path / "x.idx", "--format", "json")
    assert result.exit_code == 0, result.output
    out = json.loads(result.stdout)
    assert [p["label"] for p in out["predictions"]] == [str(y) for y in labelled[2]] + [None]
    assert set(out["predictions"][0]) == {"input", "predicted", "probability", "label"}
    assert out["accuracy"] == {
        "correct": 3,
        "total": 5,
        "accuracy": 0.6,
        "inputs": [
            {
                "input": str(labelled[0]),
                "labels": str(labelled[1]),
                "correct": 3,
                "total": 5,
                "accuracy": 0.6,
            }
        ],
    }
    unlabelled = run("predict", model[1], tmp_path / "x.idx", "--format", "json")
    assert json.loads(unlabelled.stdout)["accuracy"] is None


@pytest.mark.parametrize(
    ("labels", "message"),
    [
        (np.zeros(4, np.uint8), "4 labels for the 5 images of"),
        (np.zeros(6, np.uint8), "6 labels for the 5 images of"),
        (np.array([0, 1, 10, 2, 3], np.uint8), "label 10 (item 2) is not a class id of the model"),
        (np.array([0, 1, 10, 2, -1], np.int16), "2 labels are not class ids of the model"),
        (np.zeros((5, 1), np.uint8), "dims 5x1, not labels"),
        (np.zeros(5, np.float32), "float32 values, not class ids"),
    ],
    ids=["too few", "too many", "class 10", "two bad", "2-d", "float"],
)
def test_bad_labels_beside_the_images_are_one_line(tmp_path, model, images, labels, message):
    write_idx(tmp_path / "a-images-idx3-ubyte", images)
    write_idx(tmp_path / "a-labels-idx1-ubyte", labels)
    result = run("predict", model[1], tmp_path / "a-images-idx3-ubyte")
    one_error_line(result, f"{tmp_path / 'a-labels-idx1-ubyte'}: {message}")


def test_a_csv_label_that_is_no_class_of_the_model_is_one_line(tmp_path, model, images):
    write_csv(tmp_path / "x.csv", [1, 2, 10, 3, 4], images)
    one_error_line(
        run("predict", model[1], tmp_path / "x.csv"), "x.csv line 4: a label must lie in [0, 10)"
    )


def test_labelled_idx_rows_are_still_streamed(tmp_path, model, images, monkeypatch):
    from handprop import predict

    net, _ = model
    labels = predicted(net, images).astype(np.uint8)
    labels[3] = (labels[3] + 1) % 10
    write_idx(tmp_path / "x-images.idx", images)
    write_idx(tmp_path / "x-labels.idx", labels)
    monkeypatch.setattr(predict, "BATCH_ROWS", 2)
    inputs = open_inputs([tmp_path / "x-images.idx"], net)
    assert isinstance(inputs[0].rows, np.memmap)  # a raw file is mapped, not read
    accuracy = predict.Accuracy()
    batches = list(predict.predict_rows(inputs, net))
    assert [(b.lo, b.hi) for b in batches] == [(0, 2), (2, 4), (4, 5)]
    for b in batches:
        np.testing.assert_array_equal(b.labels, labels[b.lo : b.hi])
        accuracy.add(b, b.P.argmax(axis=1))
    assert accuracy.summary()["correct"] == 4


# -- issue 27: a camera's EXIF orientation, float images with NaN, a CSV without labels --


def upright_seven() -> np.ndarray:
    """A dark 7 on a white page, taller than wide: turned, it reads as something else."""
    page = np.full((60, 40), 255, dtype=np.uint8)
    page[8:12, 8:32] = 0  # the bar
    for r in range(12, 52):  # the stem, slanting down to the left
        c = 30 - (r - 12) // 3
        page[r, c - 2 : c + 2] = 0
    return page


#: EXIF orientation -> how a camera stores an upright picture under it (the tag says
#: how to turn it back): 3 turned half round, 6 and 8 a quarter each way, 2 mirrored
STORED = {
    3: Image.Transpose.ROTATE_180,
    6: Image.Transpose.ROTATE_90,
    8: Image.Transpose.ROTATE_270,
    2: Image.Transpose.FLIP_LEFT_RIGHT,
}


def save_oriented(path, page: np.ndarray, orientation: int | None, **kwargs) -> None:
    """``page`` stored as a camera under ``orientation`` stores it (None: no tag)."""
    img = Image.fromarray(page)
    if orientation is None:
        img.save(path, **kwargs)
        return
    exif = Image.Exif()
    exif[0x0112] = orientation
    img.transpose(STORED[orientation]).save(path, exif=exif, **kwargs)


@pytest.mark.parametrize("orientation", list(STORED))
def test_the_exif_orientation_is_applied(tmp_path, orientation):
    page = upright_seven()
    save_oriented(tmp_path / "up.png", page, None)
    save_oriented(tmp_path / "turned.png", page, orientation)
    upright = prepare_image(tmp_path / "up.png", (28, 28))
    np.testing.assert_array_equal(prepare_image(tmp_path / "turned.png", (28, 28)), upright)
    # a JPEG, as a phone writes it: the same up to the codec's loss
    save_oriented(tmp_path / "up.jpg", page, None, quality=95)
    save_oriented(tmp_path / "turned.jpg", page, orientation, quality=95)
    jpeg = prepare_image(tmp_path / "up.jpg", (28, 28))
    np.testing.assert_allclose(prepare_image(tmp_path / "turned.jpg", (28, 28)), jpeg, atol=0.02)
    assert np.abs(jpeg - upright).max() < 0.02
    # without the tag the same pixels are another picture: the tag is what turned it
    Image.fromarray(page).transpose(STORED[orientation]).save(tmp_path / "bare.png")
    assert np.abs(prepare_image(tmp_path / "bare.png", (28, 28)) - upright).max() > 0.5


def test_predict_reads_a_turned_jpeg_upright(tmp_path, model):
    import json

    folder = model[1]
    page = upright_seven()
    save_oriented(tmp_path / "up.jpg", page, None, quality=95)
    save_oriented(tmp_path / "turned.jpg", page, 6, quality=95)
    result = run(
        "predict", folder, tmp_path / "up.jpg", tmp_path / "turned.jpg", "--format", "json"
    )
    assert result.exit_code == 0, result.output
    up, turned = json.loads(result.stdout)["predictions"]
    assert turned["predicted"] == up["predicted"]
    assert turned["probability"] == pytest.approx(up["probability"], abs=0.01)


def float_tiff(path, values: np.ndarray) -> None:
    Image.fromarray(values.astype(np.float32), mode="F").save(path)


def stroke() -> np.ndarray:
    page = np.zeros((40, 30), dtype=np.float32)
    page[5:35, 12:16] = 1.0
    return page


@pytest.mark.parametrize(
    "values",
    [
        np.full((40, 30), np.nan),
        np.where(np.arange(1200).reshape(40, 30) == 7, np.nan, stroke()),
        np.where(stroke() > 0, np.inf, 0),
        np.where(stroke() > 0, 1, -np.inf),
    ],
    ids=["all NaN", "one NaN", "inf ink", "-inf page"],
)
def test_float_images_with_nan_or_inf_pixels_are_one_line(tmp_path, model, values):
    float_tiff(tmp_path / "x.tiff", values)
    result = run("predict", model[1], tmp_path / "x.tiff")
    one_error_line(result, "x.tiff: holds NaN or infinite pixel values")
    float_tiff(tmp_path / "fine.tiff", stroke())  # a finite float image still reads
    assert run("predict", model[1], tmp_path / "fine.tiff").exit_code == 0


def test_a_csv_without_its_label_column_says_so(tmp_path, model, images):
    rows = images.reshape(5, 64).astype(int)
    rows[:, 0] = 3  # the first pixel reads as a label: the rows look one value short
    text = "\n".join(",".join(map(str, r)) for r in rows) + "\n"
    (tmp_path / "x.csv").write_text(text)
    one_error_line(
        run("predict", model[1], tmp_path / "x.csv"),
        "x.csv: rows of 64 values: the label column is missing (a CSV row holds its label "
        "first, then the model's 8x8 (64 values))",
    )
    (tmp_path / "short.csv").write_text(
        "\n".join(t[: t.rindex(",")] for t in text.split("\n")[:-1])
    )
    one_error_line(
        run("predict", model[1], tmp_path / "short.csv"),
        "short.csv: rows of 1x62 (62 values each); the model expects 8x8 (64 values)",
    )
