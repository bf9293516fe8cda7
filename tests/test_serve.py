"""handprop serve: the JSON API (Starlette's test client) and the page in a real browser.

The API tests need the serve extra (starlette, uvicorn) and httpx (the test client's
transport); the browser test also needs Playwright for Python and Debian's Chromium
(``apt-get install chromium``). Each is skipped, saying which, when that is absent.
The models are trained here: the main job's (``experiments/quickstart.toml``) and a
second MLP on scikit-learn's 8x8 digits (offline), and one on real MNIST when
``HANDPROP_TEST_MNIST`` names its folder.
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
import os
import re
import shutil
import socket
import subprocess
import sys
import time
import warnings
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image

from conftest import mnist_dir
from handprop.cli import main
from handprop.images import prepare_image
from handprop.nn import Network, save

ROOT = Path(__file__).parents[1]
MNIST = mnist_dir()
CHROMIUM = Path("/usr/bin/chromium")

pytest.importorskip("starlette", reason="starlette not installed (pip install -e '.[serve]')")
pytest.importorskip("uvicorn", reason="uvicorn not installed (pip install -e '.[serve]')")


def make_client(app):
    pytest.importorskip("httpx", reason="httpx (Starlette's test client) not installed")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # Starlette would rather have httpx2; httpx works
        from starlette.testclient import TestClient
    return TestClient(app)


def cli(*args):
    result = CliRunner().invoke(main, [str(a) for a in args], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    return result.output


def train(folder: Path, name: str, lines: str) -> Path:
    config = folder / f"{name}.toml"
    config.write_text(f'{lines}\nout = "{folder / "runs"}"\nname = "{name}"\nseed = 0\n')
    cli("train", config, "-q")
    return folder / "runs" / name


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> Path:
    """A folder of runs: the main job's model and another MLP on the 8x8 digits, and
    one on MNIST when it is here."""
    folder = tmp_path_factory.mktemp("serve")
    cli("train", ROOT / "experiments/quickstart.toml", "--out", folder / "runs", "-q")
    train(folder, "digits", DIGITS)
    if MNIST is not None:
        train(folder, "mnist", MNIST_MLP.format(data=MNIST))
    return folder / "runs"


DIGITS = """dataset = "digits"
total = 1797
train = 1500
test = 297
hidden = 32
activation = "sigmoid"
init = "glorot_uniform"
learning_rate = 2.0
epochs = 150
eval_every = 50"""

MNIST_MLP = """dataset = "mnist"
data_dir = "{data}"
total = 12000
train = 10000
test = 2000
hidden = 64
activation = "relu"
init = "he_normal"
optimizer = "adam"
learning_rate = 0.002
batch_size = 64
epochs = 4
eval_every = 4"""


def png(pixels: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(pixels.astype(np.uint8)).save(buf, "PNG")
    return buf.getvalue()


def stroke_png(width: int = 20) -> bytes:
    """A vertical white stroke on black, off centre: a 1."""
    page = np.zeros((280, 280), np.uint8)
    page[40:240, 100 : 100 + width] = 255
    return png(page)


@pytest.fixture(scope="module")
def client(runs):
    from handprop.serve import find_models
    from handprop.serve.app import create_app

    return make_client(create_app(find_models(runs)))


def post_png(client, data: bytes, **params):
    return client.post(
        "/api/predict", content=data, params=params, headers={"Content-Type": "image/png"}
    )


# -- the API ---------------------------------------------------------------------------


def test_models_lists_every_run_with_dataset_and_accuracy(client, runs):
    data = client.get("/api/models").json()
    ids = [m["id"] for m in data["models"]]
    assert ids == sorted(p.name for p in runs.iterdir())
    digits = next(m for m in data["models"] if m["id"] == "digits")
    assert digits["dataset"] == "digits" and 0.8 < digits["accuracy"] <= 1
    assert digits["image_shape"] == [8, 8] and digits["kind"] == "mlp"
    assert digits["classes"] == [str(i) for i in range(10)]


def digit_images() -> tuple[Path, np.ndarray]:
    """Real test digits: MNIST's first 12 test images, or the 8x8 digits'."""
    if MNIST is not None:
        from handprop.data import load_dataset

        ds = load_dataset("mnist", data_dir=MNIST, progress=False)
        return "mnist", ds.images[ds.n_train : ds.n_train + 12]
    from sklearn.datasets import load_digits

    return "digits", (load_digits().images[:12] * 255 / 16).round()


def test_digits_as_png_get_the_answers_of_handprop_predict(client, runs, tmp_path):
    model, images = digit_images()
    files = []
    for i, image in enumerate(images):
        big = np.kron(image, np.ones((4, 4)))  # a larger picture, as a user would send
        (tmp_path / f"{i}.png").write_bytes(png(big))
        files.append(tmp_path / f"{i}.png")
    out = cli("predict", runs / model, *files, "--top", 10)
    for path, line in zip(files, out.strip().splitlines(), strict=True):
        answer = post_png(client, path.read_bytes(), model=model).json()
        label, rest = re.match(r"\S+\s+-> (\S+)\s+\((.*)\)", line).groups()
        assert answer["label"] == label, path.name
        expected = {k: float(v) for k, v in re.findall(r"(\S+): ([\d.]+)", rest)}
        got = dict(zip(answer["classes"], answer["probabilities"], strict=True))
        for name, p in expected.items():
            assert got[name] == pytest.approx(p, abs=6e-4)
    correct = sum(
        post_png(client, f.read_bytes(), model=model).json()["prediction"] == y
        for f, y in zip(files, _labels(model), strict=True)
    )
    assert correct >= 10


def _labels(model: str) -> np.ndarray:
    if model == "mnist":
        from handprop.data import load_dataset

        ds = load_dataset("mnist", data_dir=MNIST, progress=False)
        return ds.labels[ds.n_train : ds.n_train + 12]
    from sklearn.datasets import load_digits

    return load_digits().target[:12]


def own_test_images(run: Path) -> tuple[np.ndarray, np.ndarray]:
    """The run's test images (uint8, 0-255) and labels, from its split."""
    from handprop.data import load_dataset

    config = (run / "config.toml").read_text()
    dataset = re.search(r'^dataset = "(.*)"', config, re.M)[1]
    ds = load_dataset(dataset, data_dir=MNIST if dataset == "mnist" else None, progress=False)
    idx = np.load(run / "split.npz")["test_idx"]
    images = ds.images[idx].astype(np.float64) * (255 / ds.pixel_max)
    return images.round().astype(np.uint8), ds.labels[idx]


@pytest.mark.parametrize(
    ("model", "points"),
    [("quickstart", 3), pytest.param("mnist", 1, marks=pytest.mark.mnist)],
)
def test_a_models_own_test_digits_as_pictures_read_as_its_arrays_do(
    client, runs, tmp_path, model, points
):
    """Each test digit saved as a PNG four times its size, as a user would send it, and
    read through ``handprop predict`` and the API: the accuracy within ``points`` of the
    model's own (on the arrays), so the picture is prepared as the dataset was."""
    images, labels = own_test_images(runs / model)
    files = []
    for i, image in enumerate(images):
        files.append(tmp_path / f"{i:05d}.png")
        files[-1].write_bytes(png(np.kron(image, np.ones((4, 4), np.uint8))))
    array_accuracy = json.loads((runs / model / "metrics.json").read_text())["accuracy"]
    out = cli("predict", runs / model, *files)
    said = [re.match(r"\S+\s+-> (\S+)", line)[1] for line in out.splitlines()[: len(files)]]
    by_predict = np.mean(np.array(said) == labels.astype(str))
    by_api = np.mean(
        [
            post_png(client, f.read_bytes(), model=model).json()["prediction"] == y
            for f, y in zip(files, labels, strict=True)
        ]
    )
    assert by_predict == by_api
    assert by_predict >= array_accuracy - points / 100, (by_predict, array_accuracy)


def test_the_answer_shows_the_input_the_saliency_and_the_hidden_units(client, runs):
    answer = post_png(client, stroke_png(), model="digits").json()
    assert answer["label"] == "1"
    assert sum(answer["probabilities"]) == pytest.approx(1, abs=1e-4)
    expected = prepare_image(stroke_png(), (8, 8), prep="fill")  # as the 8x8 digits were
    np.testing.assert_allclose(answer["input"], expected, atol=1e-4)
    S = np.array(answer["saliency"])
    assert S.shape == (8, 8) and np.abs(S).max() == pytest.approx(1)
    first = answer["first_layer"]
    assert first["kind"] == "dense" and first["n_units"] == 32 and len(first["units"]) == 8
    values = [u["value"] for u in first["units"]]
    assert values == sorted(values, reverse=True)
    assert all(len(u["weights"]) == 64 for u in first["units"])


def test_the_saliency_is_the_gradient_of_the_top_score(tmp_path, rng):
    """Checked against central differences on the logit, in float64."""
    from handprop.serve.models import load_served

    net = Network.from_spec(
        "64-12-10", activation="tanh", dtype=np.float64, rng=3, meta={"image_shape": [8, 8]}
    )
    save(net, tmp_path / "m.npz")
    model = load_served(tmp_path / "m.npz", "m", None)
    image = rng.random((8, 8))
    answer = model.explain(image)
    top = answer["prediction"]
    numeric = np.zeros(64)
    for i in range(64):
        for sign in (1, -1):
            x = image.reshape(1, 64).copy()
            x[0, i] += sign * 1e-6
            numeric[i] += sign * net.forward(x)[0, top] / 2e-6
    got = np.array(answer["saliency"]).ravel() * answer["saliency_scale"]
    np.testing.assert_allclose(got, numeric, atol=1e-4 * np.abs(numeric).max())


def test_a_cnn_shows_its_first_feature_maps(tmp_path):
    from handprop.serve import find_models
    from handprop.serve.app import create_app

    net = Network.from_layers(
        ["conv 4 3", "relu", "maxpool 2", "dense 16", "relu", "dropout 0.5"],
        (1, 28, 28),
        10,
        rng=0,
        meta={"image_shape": [28, 28], "dataset": "fashion-mnist",
              "class_names": ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
                              "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot"]},
    )  # fmt: skip
    save(net, tmp_path / "cnn.npz")
    client = make_client(create_app(find_models(tmp_path / "cnn.npz")))
    info = client.get("/api/models").json()["models"][0]
    assert info["kind"] == "cnn" and info["classes"][1] == "Trouser"
    answer = post_png(client, stroke_png()).json()
    assert answer["label"] in info["classes"]
    first = answer["first_layer"]
    assert first["kind"] == "conv" and first["shape"] == [26, 26] and len(first["maps"]) == 4
    assert all(0 <= v <= 255 for m in first["maps"] for v in m)  # after the ReLU
    # the same answer twice: dropout is off and nothing is left over between requests
    again = post_png(client, stroke_png()).json()
    assert again["probabilities"] == answer["probabilities"]
    assert again["saliency"] == answer["saliency"]


def test_a_prepared_array_as_json(client):
    image = prepare_image(stroke_png(), (8, 8), prep="fill")
    answer = client.post("/api/predict", json={"pixels": image.tolist(), "model": "digits"})
    assert answer.status_code == 200
    by_png = post_png(client, stroke_png(), model="digits").json()
    assert answer.json()["probabilities"] == pytest.approx(by_png["probabilities"], abs=1e-5)


#: JSON that Python reads (NaN is not standard JSON, but json.loads takes it)
NAN_JSON = ('{"model": "digits", "pixels": [' + ",".join(["[" + ",".join(["NaN"] * 8) + "]"] * 8)
            + "]}").encode()  # fmt: skip


def bomb() -> bytes:
    """A PNG of a few KB that claims 144 million pixels."""
    buf = io.BytesIO()
    Image.new("1", (12000, 12000)).save(buf, "PNG")
    return buf.getvalue()


def big_image() -> bytes:
    buf = io.BytesIO()
    Image.new("1", (4000, 3000)).save(buf, "PNG")  # 12 megapixels, over the server's 10
    return buf.getvalue()


def float_tiff(values: np.ndarray) -> bytes:
    """A float ("F" mode) TIFF of a white stroke on black, ``values`` where it says."""
    buf = io.BytesIO()
    Image.fromarray(values.astype(np.float32), mode="F").save(buf, "TIFF")
    return buf.getvalue()


STROKE = np.zeros((40, 30))
STROKE[5:35, 12:16] = 1.0


def pixels_json(first: str, model: str = "digits") -> bytes:
    """An 8 x 8 "pixels" body whose first value is the literal ``first``, zeros else."""
    rows = ["[" + ",".join([first] + ["0"] * 7) + "]"] + ["[" + ",".join(["0"] * 8) + "]"] * 7
    return f'{{"model": "{model}", "pixels": [{",".join(rows)}]}}'.encode()


def as_json(content: bytes) -> dict:
    return {"content": content, "headers": {"Content-Type": "application/json"}}


def as_tiff(content: bytes) -> dict:
    return {"content": content, "headers": {"Content-Type": "image/tiff"}}


BAD = {
    "empty": (
        {"content": b"", "headers": {"Content-Type": "image/png"}},
        400, "the request body is empty",
    ),
    "not an image": (
        {"content": b"hello, world", "headers": {"Content-Type": "application/octet-stream"},
         "params": {"name": "notes.txt"}},
        422, "notes.txt: not a readable image (not a format Pillow knows)",
    ),
    "truncated png": (
        {"content": stroke_png()[:60], "headers": {"Content-Type": "image/png"}},
        422, "upload: ",
    ),
    "blank": (
        {"content": png(np.zeros((50, 50))), "headers": {"Content-Type": "image/png"}},
        422, "upload: the image is blank (one colour); no digit to read",
    ),
    "huge upload": (
        {"content": b"\0" * (8 * 2**20 + 1), "headers": {"Content-Type": "image/png"}},
        413, "the request body is over the 8,388,608 bytes handprop serve accepts",
    ),
    "decompression bomb": (
        {"content": bomb(), "headers": {"Content-Type": "image/png"}},
        413, "upload: the image has 144,000,000 pixels, more than the 89,478,485",
    ),
    "too many pixels": (
        {"content": big_image(), "headers": {"Content-Type": "image/png"}},
        413, "upload: the image has 12,000,000 pixels, more than the 10,000,000",
    ),
    "malformed json": (
        {"content": b'{"pixels": [[0, 1,]]', "headers": {"Content-Type": "application/json"}},
        400, "the request body is not valid JSON: ",
    ),
    "json not an object": (
        {"json": [1, 2, 3]}, 422, 'the JSON body must be an object with "pixels"',
    ),
    "json wrong shape": (
        {"json": {"pixels": [[0.5] * 8] * 7, "model": "digits"}},
        422, "model 'digits' needs \"pixels\": a 8 x 8 array",
    ),
    "json not numbers": (
        {"json": {"pixels": [["a"] * 8] * 8, "model": "digits"}},
        422, "every value must be a number",
    ),
    "json out of range": (
        {"json": {"pixels": [[255] * 8] * 8, "model": "digits"}},
        422, "values must lie in [0, 1], got 255 to 255",
    ),
    "json nan": (
        {"content": NAN_JSON,
         "headers": {"Content-Type": "application/json"}},
        422, "got NaN or infinite values",
    ),
    "unknown model": (
        {"content": stroke_png(), "headers": {"Content-Type": "image/png"},
         "params": {"model": "nope"}},
        404, "unknown model 'nope'; known: digits",
    ),
    "unknown model in json": (
        {"json": {"pixels": [[0] * 8] * 8, "model": "nope"}},
        404, "unknown model 'nope'",
    ),
    "wrong content type": (
        {"content": b"a=1", "headers": {"Content-Type": "application/x-www-form-urlencoded"}},
        415, "unsupported Content-Type 'application/x-www-form-urlencoded'",
    ),
    # issue 27: float images with NaN or inf pixels, numbers too large for a float
    "all-nan tiff": (
        as_tiff(float_tiff(np.full((40, 30), np.nan))),
        422, "upload: holds NaN or infinite pixel values",
    ),
    "one nan in a tiff": (
        as_tiff(float_tiff(np.where(np.arange(1200).reshape(40, 30) == 7, np.nan, STROKE))),
        422, "upload: holds NaN or infinite pixel values",
    ),
    "inf tiff": (
        as_tiff(float_tiff(np.where(STROKE > 0, np.inf, 0))),
        422, "upload: holds NaN or infinite pixel values",
    ),
    "json 400-digit integer": (
        as_json(pixels_json("1" + "0" * 399)),
        422, "the JSON body holds a number too large for a float: 100000000000... (400 characters)",
    ),
    "json 5000-digit integer": (  # over int()'s 4,300 digits
        as_json(pixels_json("-" + "9" * 5000)),
        422, "the JSON body holds a number too large for a float: -99999999999... (5,001 char",
    ),
    "json 1e400": (
        as_json(pixels_json("1e400")),
        422, "the JSON body holds a number too large for a float: 1e400",
    ),
    "json nested deeply": (
        as_json(b'{"pixels": ' + b"[" * 100_000 + b"]" * 100_000 + b"}"),
        400, "the request body is not valid JSON: nested too deeply",
    ),
    "json booleans": (
        as_json(pixels_json("true")), 422, "every value must be a number",
    ),
    "json a list in a row": (
        as_json(pixels_json("[0.5]")), 422, "every value must be a number",
    ),
    "json a million numbers": (
        as_json(b'{"pixels": [' + b"0," * 999_999 + b"0]}"),
        422, "got a list of 1,000,000 numbers",
    ),
    "json a huge model name": (
        as_json(b'{"model": "' + b"m" * 100_000 + b'", "pixels": []}'),
        404, "unknown model 'mmmm",
    ),
}  # fmt: skip


@pytest.mark.parametrize("case", list(BAD))
def test_bad_input_is_a_4xx_with_one_line_and_the_server_keeps_serving(client, case):
    kwargs, status, message = BAD[case]
    response = client.post("/api/predict", **kwargs)
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert message in error and "\n" not in error, error
    assert post_png(client, stroke_png(), model="digits").json()["label"] == "1"


def test_wrong_routes_and_methods_are_json_lines(client):
    assert client.get("/api/nothing").json() == {"error": "no such page: /api/nothing"}
    response = client.get("/api/predict")
    assert response.status_code == 405
    assert response.json() == {"error": "GET is not allowed on /api/predict"}


def test_the_page_and_its_files_are_served_from_the_package(client):
    page = client.get("/")
    assert page.status_code == 200 and "text/html" in page.headers["content-type"]
    for src in re.findall(r'(?:src|href)="(/static/[^"]+)"', page.text):
        assert client.get(src).status_code == 200, src
    assert "http" not in re.sub(r"<!--.*?-->", "", page.text)  # no CDN: works offline


# -- start-up --------------------------------------------------------------------------


def one_error_line(result, message):
    assert result.exit_code == 1, result.output
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("handprop: error: "), result.output
    assert message in lines[0], lines[0]


def test_a_model_that_fails_to_load_is_refused_at_start_up(tmp_path, runs):
    grid = tmp_path / "grid"
    shutil.copytree(runs / "digits", grid / "good")
    (grid / "broken").mkdir()
    (grid / "broken" / "model.npz").write_bytes(b"PK\x03\x04 not really")
    result = CliRunner().invoke(main, ["serve", str(grid), "--port", "1"])
    one_error_line(result, "broken/model.npz: not a readable .npz model file")
    empty = tmp_path / "empty"
    empty.mkdir()
    one_error_line(CliRunner().invoke(main, ["serve", str(empty)]), "no model.npz in it")
    one_error_line(
        CliRunner().invoke(main, ["serve", str(tmp_path / "missing")]),
        "no such model file, run folder or folder of runs",
    )


def test_a_port_in_use_is_one_line(runs):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen(1)
        port = taken.getsockname()[1]
        result = CliRunner().invoke(main, ["serve", str(runs / "digits"), "--port", port])
    one_error_line(result, f"cannot listen on 127.0.0.1:{port}")


# -- the page in a real browser ----------------------------------------------------------


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def served(runs, tmp_path):
    """``handprop serve RUNS`` as a subprocess on a free 127.0.0.1 port, printing into a
    file (a pipe nobody reads would fill and stop it); always stopped. Gives the
    address and the file."""
    with serving(runs, tmp_path / "serve.log") as (url, out):
        yield url, out


@contextlib.contextmanager
def serving(runs: Path, out: Path, before: str = ""):
    """``handprop serve RUNS`` as :func:`served` starts it, its stdout and stderr into
    ``out``; ``before``: Python run in the server's process before the command."""
    port = free_port()
    with out.open("w") as log:
        proc = subprocess.Popen(
            [
                sys.executable,
                "-c",
                before + "\nfrom handprop.cli import main; main()",
                "serve",
                str(runs),
                "--port",
                str(port),
            ],
            stdout=log,
            stderr=subprocess.STDOUT,
            text=True,
        )
    try:
        for _ in range(1200):  # 120 s at most
            if "\n" in out.read_text() or proc.poll() is not None:
                break
            time.sleep(0.1)
        line = out.read_text().split("\n")[0]
        assert f"http://127.0.0.1:{port}/" in line, out.read_text() or "(nothing in 120 s)"
        yield f"http://127.0.0.1:{port}", out
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


@pytest.fixture
def server(served) -> str:
    return served[0]


def test_the_server_prints_one_line_per_request(served):
    import httpx

    url, out = served
    httpx.get(url + "/")
    httpx.get(url + "/favicon.ico")
    httpx.post(url + "/api/predict?model=digits", content=stroke_png(),
               headers={"Content-Type": "image/png"})  # fmt: skip
    httpx.post(url + "/api/predict", content=b"", headers={"Content-Type": "image/png"})
    for _ in range(50):
        lines = out.read_text().splitlines()[1:]
        if len(lines) >= 4:
            break
        time.sleep(0.1)
    pattern = r"\d\d:\d\d:\d\d {} {} {} \d+ ms"
    expected = [("GET", "/", 200), ("GET", "/favicon.ico", 200),
                ("POST", "/api/predict", 200), ("POST", "/api/predict", 400)]  # fmt: skip
    assert len(lines) == 4, lines
    for line, (method, path, status) in zip(lines, expected, strict=True):
        assert re.fullmatch(pattern.format(method, re.escape(path), status), line), line


# -- issue 27: turned photos, failed requests in the log, serving beyond this machine ----


def upright_seven() -> np.ndarray:
    """A dark 7 on a white page (as tests/test_predict.py draws it)."""
    page = np.full((60, 40), 255, dtype=np.uint8)
    page[8:12, 8:32] = 0
    for r in range(12, 52):
        c = 30 - (r - 12) // 3
        page[r, c - 2 : c + 2] = 0
    return page


def photo(page: np.ndarray, fmt: str, orientation: int | None = None) -> bytes:
    """``page`` as a camera stores it upright under EXIF ``orientation`` 6: turned a
    quarter to the left, the tag saying to turn it back (None: as it is, no tag)."""
    buf = io.BytesIO()
    img = Image.fromarray(page)
    if orientation is None:
        img.save(buf, fmt, quality=95)
    else:
        exif = Image.Exif()
        exif[0x0112] = orientation
        img.transpose(Image.Transpose.ROTATE_90).save(buf, fmt, quality=95, exif=exif)
    return buf.getvalue()


def test_a_turned_photo_is_read_upright(client):
    page = upright_seven()
    for fmt, atol in (("PNG", 0), ("JPEG", 0.02)):
        answers = [
            client.post("/api/predict", content=data, params={"model": "digits"},
                        headers={"Content-Type": f"image/{fmt.lower()}"}).json()
            for data in (photo(page, fmt), photo(page, fmt, 6))
        ]  # fmt: skip
        up, turned = (np.array(a["input"]) for a in answers)
        np.testing.assert_allclose(turned, up, atol=atol, err_msg=fmt)
        assert answers[1]["label"] == answers[0]["label"]
        np.testing.assert_array_equal(up, np.round(prepare_image(photo(page, fmt), (8, 8),
                                                                 prep="fill"), 4))  # fmt: skip


def test_failed_requests_are_one_line_each_in_the_servers_log(served):
    """Every refusal of BAD, over real HTTP, and a client that leaves mid-body: one
    access line each and no traceback."""
    import httpx

    url, out = served
    statuses = []
    for kwargs, status, _ in BAD.values():
        try:
            answer = httpx.post(url + "/api/predict", **kwargs, timeout=60)
        except httpx.TransportError:  # the 8 MiB body: refused before it is all sent
            answer = None
        statuses.append(status)
        if answer is not None:
            assert answer.status_code == status, answer.text
    with socket.create_connection(("127.0.0.1", int(url.rsplit(":", 1)[1]))) as s:
        s.sendall(b"POST /api/predict HTTP/1.1\r\nHost: x\r\nContent-Type: image/png\r\n"
                  b"Content-Length: 1000\r\n\r\nonly a part")  # fmt: skip
    statuses.append(400)  # the client went away: nobody reads the answer
    httpx.get(url + "/api/nothing")
    httpx.get(url + "/api/predict")
    statuses += [404, 405]
    for _ in range(100):
        lines = out.read_text().splitlines()[1:]
        if len(lines) >= len(statuses):
            break
        time.sleep(0.1)
    text = out.read_text()
    assert "Traceback" not in text and "Exception" not in text, text
    assert len(lines) == len(statuses), text
    for line, status in zip(lines, statuses, strict=True):
        assert re.fullmatch(rf"\d\d:\d\d:\d\d (POST|GET) /api/\w+ {status} \d+ ms", line), line


BOOM = """
from handprop.serve.models import ServedModel
def boom(self, image):
    raise RuntimeError("boom: a bug in explain")
ServedModel.explain = boom
"""


def test_a_bug_is_a_500_line_and_its_traceback_once(runs, tmp_path):
    """A real internal error (a model whose explain raises): the page gets one line,
    the log the request's line and one traceback, not uvicorn's second one."""
    import httpx

    with serving(runs, tmp_path / "boom.log", before=BOOM) as (url, out):
        for _ in range(2):
            answer = httpx.post(url + "/api/predict", content=stroke_png(),
                                headers={"Content-Type": "image/png"})  # fmt: skip
            assert answer.status_code == 500
            assert answer.json() == {
                "error": "internal error in handprop serve (RuntimeError: boom: a bug in explain)"
            }
        empty = httpx.post(url + "/api/predict", content=b"", headers={"Content-Type": "image/png"})
        assert empty.status_code == 400
        for _ in range(100):
            if out.read_text().count(" ms\n") >= 3:
                break
            time.sleep(0.1)
    text = out.read_text()
    assert text.count("Traceback (most recent call last)") == 2, text
    assert text.count("handprop serve: internal error in POST /api/predict (a bug):") == 2, text
    assert text.count("RuntimeError: boom: a bug in explain") == 2, text
    assert "Exception in ASGI application" not in text, text
    access = [line for line in text.splitlines() if line.endswith(" ms")]
    assert [line.split()[3] for line in access] == ["500", "500", "400"], text


def test_a_bug_in_process_is_a_500_and_logged_once(runs, monkeypatch, caplog):
    from handprop.serve import find_models
    from handprop.serve.app import create_app
    from handprop.serve.models import ServedModel

    def boom(self, image):
        raise RuntimeError("boom")

    monkeypatch.setattr(ServedModel, "explain", boom)
    client = make_client(create_app(find_models(runs)))
    with caplog.at_level(logging.ERROR, logger="handprop.serve"):
        answer = post_png(client, stroke_png())
    assert answer.status_code == 500
    assert answer.json() == {"error": "internal error in handprop serve (RuntimeError: boom)"}
    [record] = caplog.records
    assert record.getMessage() == "handprop serve: internal error in POST /api/predict (a bug):"
    assert record.exc_info[0] is RuntimeError


@pytest.mark.parametrize(
    ("host", "address", "warning"),
    [
        ("127.0.0.1", "127.0.0.1", None),
        ("localhost", "127.0.0.1", None),
        ("127.0.0.2", "127.0.0.2", None),
        ("::1", "::1", None),
        ("::ffff:127.0.0.1", "::ffff:127.0.0.1", None),
        ("0.0.0.0", "0.0.0.0", "--host 0.0.0.0 serves on every network interface"),
        ("::", "::", "--host :: serves on every network interface"),
        ("192.168.1.5", "192.168.1.5",
         "--host 192.168.1.5 serves on an address other machines can reach"),
        ("myhost", "10.0.0.7", "--host myhost (10.0.0.7) serves on an address other machines"),
        ("fe80::1%eth0", "fe80::1%eth0", "--host fe80::1%eth0 serves on an address other"),
    ],
)  # fmt: skip
def test_serving_beyond_this_machine_is_warned(host, address, warning):
    from handprop.serve.app import exposure

    said = exposure(host, address)
    if warning is None:
        assert said is None
    else:
        assert said.startswith(f"handprop: warning: {warning}") and "\n" not in said
        assert "no authentication" in said and "--host 127.0.0.1" in said


@pytest.mark.parametrize(
    ("host", "address", "shown"), [("0.0.0.0", "0.0.0.0", "0.0.0.0"), ("::", "::", "[::]"),
                                   ("127.0.0.1", "127.0.0.1", "127.0.0.1")],
)  # fmt: skip
def test_the_warning_goes_to_stderr_after_the_ready_line(runs, monkeypatch, host, address, shown):
    """``handprop serve --host`` with the server faked: nothing listens, the ready
    line is stdout's first (and only) line, the warning stderr's."""
    from handprop.serve import app
    from handprop.serve.app import exposure

    def fake_run(models, host, port, ready=None, log=None):
        ready(port, address)

    monkeypatch.setattr(app, "run", fake_run)
    result = CliRunner().invoke(main, ["serve", str(runs / "digits"), "--host", host])
    assert result.exit_code == 0, result.output
    assert result.stdout == (
        f"handprop serve: 1 model (digits) at http://{shown}:8000/  (Ctrl-C stops)\n"
    )
    warning = exposure(host, address)
    assert result.stderr == ("" if warning is None else warning + "\n")


def test_a_port_in_use_on_every_interface_is_one_line_and_no_warning(runs, monkeypatch):
    import uvicorn

    # should the bind succeed after all, serve nothing and return at once
    monkeypatch.setattr(uvicorn.Server, "run", lambda self, sockets=None: None)
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen(1)
        port = taken.getsockname()[1]
        result = CliRunner().invoke(
            main, ["serve", str(runs / "digits"), "--host", "0.0.0.0", "--port", port]
        )
    one_error_line(result, f"cannot listen on 0.0.0.0:{port} (Address already in use)")


@pytest.fixture
def browser():
    sync_api = pytest.importorskip(
        "playwright.sync_api", reason="Playwright for Python not installed (pip install playwright)"
    )
    if not CHROMIUM.is_file():
        pytest.skip(f"no Chromium at {CHROMIUM} (apt-get install chromium)")
    with sync_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=str(CHROMIUM), args=["--no-sandbox"])
        try:
            yield browser
        finally:
            browser.close()


def canvas_pixels(page, selector: str) -> np.ndarray:
    data = page.evaluate(
        """(sel) => { const c = document.querySelector(sel);
            return Array.from(c.getContext('2d').getImageData(0, 0, c.width, c.height).data); }""",
        selector,
    )
    return np.array(data, dtype=np.uint8).reshape(-1, 4)


def draw(page, *strokes):
    """Each stroke as a person draws it: press, move through its points (the mouse
    passing through 4 positions between two of them), release."""
    box = page.locator("#pad").bounding_box()
    for points in strokes:
        page.mouse.move(box["x"] + points[0][0], box["y"] + points[0][1])
        page.mouse.down()
        for x, y in points[1:]:
            page.mouse.move(box["x"] + x, box["y"] + y, steps=4)
        page.mouse.up()


def wait_for_answers(page, more_than: int) -> int:
    page.wait_for_function(f"Number(document.body.dataset.answers) > {more_than}")
    page.wait_for_timeout(400)  # the last stroke's answer, sent after the one in flight
    page.wait_for_function("document.querySelectorAll('#bars .bar-row').length > 0")
    return int(page.evaluate("document.body.dataset.answers"))


def bars(page) -> list[float]:
    return [
        float(p)
        for p in page.eval_on_selector_all("#bars .bar-row", "rs => rs.map(r => r.dataset.p)")
    ]


def open_page(browser, server, viewport=(1280, 900)):
    """The page, loaded, with every 4xx/5xx answer and page error collected."""
    page = browser.new_page(viewport={"width": viewport[0], "height": viewport[1]})
    page.failed, page.errors = [], []
    page.on("response", lambda r: r.status >= 400 and page.failed.append((r.status, r.url)))
    page.on("pageerror", lambda exc: page.errors.append(str(exc)))
    page.goto(server)
    page.wait_for_function("document.body.dataset.ready === '1'")
    return page


def choose(page, model: str) -> None:
    """Pick ``model`` (the picker is enabled when the server has several)."""
    page.select_option("#model", model)
    page.wait_for_function(
        "(m) => document.getElementById('model').value === m && "
        "document.getElementById('model-info').textContent !== ''",
        arg=model,
    )


def watch_the_canvas(page) -> None:
    """Record, at every frame from now on, any place of the canvas but its first."""
    page.evaluate(
        """() => {
            const pad = document.getElementById('pad');
            const first = pad.getBoundingClientRect();
            window.padMoves = [];
            const look = () => {
                const r = pad.getBoundingClientRect();
                if (r.left !== first.left || r.top !== first.top) {
                    window.padMoves.push([r.left, r.top]);
                }
                requestAnimationFrame(look);
            };
            requestAnimationFrame(look);
        }"""
    )


def test_the_page_reads_a_drawn_stroke_as_a_one(server, browser, runs):
    page = open_page(browser, server)
    model = "mnist" if (runs / "mnist").is_dir() else "quickstart"
    choose(page, model)
    options = page.eval_on_selector_all("#model option", "os => os.map(o => o.textContent)")
    assert any(o.startswith("digits (digits) — ") and o.endswith("%") for o in options), options

    assert canvas_pixels(page, "#input")[:, :3].max() == 0  # nothing drawn: a black preview
    assert sum(bars(page)) == 0

    draw(page, *map(points, STROKES["1"]))  # a 1 as a person draws it (below)
    seen = wait_for_answers(page, 0)
    assert page.inner_text("#answer") == "1"
    p = bars(page)
    assert len(p) == 10 and sum(p) == pytest.approx(1, abs=1e-3) and max(p) == p[1]
    width = page.eval_on_selector("#bars .bar-row.top .fill", "e => e.style.width")
    assert float(width.rstrip("%")) == pytest.approx(100 * p[1], abs=0.1)
    preview = canvas_pixels(page, "#input")
    assert preview[:, 0].max() > 200  # the stroke, white on black
    side = int(np.sqrt(len(preview)))
    assert side == (28 if model == "mnist" else 8)
    saliency = canvas_pixels(page, "#saliency")
    coloured = (saliency[:, 0] != saliency[:, 2]).sum()  # red or blue, not gray
    assert coloured > len(saliency) // 10
    assert page.locator("#layer .cell").count() == 8
    assert not page.locator("#error").is_visible()

    # a second stroke: a horizontal bar across the top; the answer and its pictures change
    before_preview, before_saliency = preview.copy(), saliency.copy()
    draw(page, [(80, 50), (200, 50)])
    wait_for_answers(page, seen)
    assert bars(page) != p
    assert not np.array_equal(canvas_pixels(page, "#input"), before_preview)
    assert not np.array_equal(canvas_pixels(page, "#saliency"), before_saliency)

    page.click("#clear")
    assert canvas_pixels(page, "#input")[:, :3].max() == 0 and sum(bars(page)) == 0

    # the other model from the picker reads the same stroke
    choose(page, "digits")
    count = int(page.evaluate("document.body.dataset.answers"))
    draw(page, *map(points, STROKES["1"]))
    wait_for_answers(page, count)
    assert page.inner_text("#answer") == "1"
    assert int(np.sqrt(len(canvas_pixels(page, "#input")))) == 8

    # a file that is not an image: the server's one line on the page, and it serves on
    page.set_input_files(
        "#file", files=[{"name": "notes.txt", "mimeType": "text/plain", "buffer": b"hello"}]
    )
    page.wait_for_selector("#error", state="visible")
    assert page.inner_text("#error") == (
        "notes.txt: not a readable image (not a format Pillow knows)"
    )
    count = int(page.evaluate("document.body.dataset.answers"))
    page.set_input_files(
        "#file", files=[{"name": "one.png", "mimeType": "image/png", "buffer": stroke_png()}]
    )
    wait_for_answers(page, count)
    assert page.inner_text("#answer") == "1" and not page.locator("#error").is_visible()
    assert page.errors == []
    assert [status for status, _ in page.failed] == [422]  # notes.txt's, and only it

    if os.environ.get("HANDPROP_SCREENSHOT"):  # the README's picture
        page.set_viewport_size({"width": 1280, "height": 680})
        page.click("#clear")
        choose(page, model)
        count = int(page.evaluate("document.body.dataset.answers"))
        draw(page, [(150, 40), (150, 240)], [(112, 84), (150, 40)])
        wait_for_answers(page, count)
        page.screenshot(path=os.environ["HANDPROP_SCREENSHOT"])


#: the digits 0 to 9 as a person draws them on the 280x280 canvas: each stroke the
#: points "x,y" the pen passes through, from press to release
STROKES = {
    "0": [
        (
            "130,46 116,54 103,67 93,85 86,106 82,130 83,155 87,178 95,199 105,216 118,228 "
            "133,234 148,234 162,228 175,216 186,198 193,177 197,154 198,129 194,106 187,84 "
            "177,66 164,53 150,46 135,45 120,51"
        ),
    ],
    "1": [
        "152,42 149,81 146,120 144,160 141,199 138,238",
    ],
    "2": [
        (
            "88,78 96,65 108,54 123,47 139,45 155,47 170,53 183,63 191,76 195,91 194,106 185,118 "
            "165,141 145,165 125,188 105,212 85,235 125,234 165,233 205,232"
        ),
    ],
    "3": [
        (
            "87,68 99,56 113,48 131,44 148,45 164,51 178,62 186,75 190,90 188,105 180,119 168,130 "
            "152,138 135,140 154,142 171,150 184,161 193,175 195,190 191,205 181,218 167,229 "
            "149,235 130,236 111,232 95,224 83,212"
        ),
    ],
    "4": [
        "110,42 103,72 96,101 89,130 82,160 113,160 144,159 174,158 205,158",
        "172,70 171,104 170,138 170,172 169,206 168,240",
    ],
    "5": [
        (
            "195,45 165,46 135,46 105,47 103,74 100,101 98,128 111,118 130,112 151,113 170,121 "
            "185,133 196,150 200,170 197,190 188,207 174,221 155,230 135,232 115,228 97,217 "
            "84,202"
        ),
    ],
    "6": [
        (
            "179,47 159,55 141,67 124,85 111,106 101,131 95,157 93,185 95,200 102,213 112,224 "
            "125,231 140,235 155,234 170,229 182,220 191,208 196,194 197,180 193,166 185,153 "
            "174,143 160,137 145,135 129,137 116,144 104,154 97,166 93,181"
        ),
    ],
    "7": [
        "80,50 110,50 140,49 170,48 200,48 188,80 175,112 162,144 150,176 138,208 125,240",
    ],
    "8": [
        (
            "156,46 177,51 190,61 195,73 190,89 175,108 154,128 131,148 109,168 93,187 85,203 "
            "88,217 100,227 119,233 142,235 165,232 183,226 193,215 194,201 185,184 168,165 "
            "145,145 122,124 102,105 89,87 85,71 91,59 106,50 127,46 151,45"
        ),
    ],
    "9": [
        (
            "191,86 186,72 177,60 165,51 150,46 135,45 120,49 107,57 96,68 90,81 88,96 91,111 "
            "98,124 109,135 122,142 137,145 153,143 167,138 179,128 187,116 192,101 191,86 "
            "190,124 187,153 185,182 182,211 180,240"
        ),
    ],
}


def points(stroke: str) -> list[tuple[int, int]]:
    return [tuple(map(int, xy.split(","))) for xy in stroke.split()]


@pytest.mark.parametrize(
    ("model", "at_least"),
    [("quickstart", 7), pytest.param("mnist", 8, marks=pytest.mark.mnist)],
)
def test_drawn_digits_read_right_and_the_canvas_never_moves(server, browser, runs, model, at_least):
    """0 to 9 drawn stroke by stroke (press, several moves, release), each on a clear
    canvas: at least ``at_least`` read right, no request refused (a press paints a dot,
    so nothing blank is sent), and the canvas stays where it was under the pen."""
    page = open_page(browser, server)
    choose(page, model)
    watch_the_canvas(page)
    read = []
    for strokes in STROKES.values():
        page.click("#clear")
        count = int(page.evaluate("document.body.dataset.answers"))
        draw(page, *map(points, strokes))
        wait_for_answers(page, count)
        read.append(page.inner_text("#answer"))
    right = sum(got == digit for got, digit in zip(read, STROKES, strict=True))
    assert right >= at_least, f"{model} read 0-9 as {read}"
    assert page.evaluate("window.padMoves") == []
    assert page.failed == [] and page.errors == []
    assert not page.locator("#error").is_visible()


def test_a_press_alone_paints_a_dot_and_is_read(server, browser):
    page = open_page(browser, server)
    choose(page, "quickstart")
    box = page.locator("#pad").bounding_box()
    page.mouse.move(box["x"] + 140, box["y"] + 140)
    page.mouse.down()
    page.mouse.up()
    wait_for_answers(page, 0)
    ink = canvas_pixels(page, "#pad")[:, 0].reshape(280, 280)
    assert ink[140, 140] == 255 and (ink > 128).sum() > 200  # a round dot, pen width 20
    assert page.failed == [] and not page.locator("#error").is_visible()


def test_the_page_keeps_its_shape_between_models_and_on_a_phone(server, browser, runs):
    page = open_page(browser, server)
    heights = set()
    for model in sorted(p.name for p in runs.iterdir()):
        choose(page, model)
        heights.add(page.eval_on_selector("header", "h => h.getBoundingClientRect().height"))
    assert len(heights) == 1, heights
    # the error line floats: showing it moves nothing
    pad = page.locator("#pad").bounding_box()
    page.set_input_files(
        "#file", files=[{"name": "notes.txt", "mimeType": "text/plain", "buffer": b"hello"}]
    )
    page.wait_for_selector("#error", state="visible")
    assert page.locator("#pad").bounding_box() == pad

    phone = open_page(browser, server, viewport=(390, 844))
    width = phone.evaluate("document.documentElement.scrollWidth")
    assert width <= 390, f"the page is {width} px wide on a 390 px screen"
    assert phone.failed == []  # the favicon too
