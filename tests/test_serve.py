"""handprop serve: the JSON API (Starlette's test client) and the page in a real browser.

The API tests need the serve extra (starlette, uvicorn) and httpx (the test client's
transport); the browser test also needs Playwright for Python and Debian's Chromium
(``apt-get install chromium``). Each is skipped, saying which, when that is absent.
The models are trained here: an MLP on scikit-learn's 8x8 digits (offline), and one on
real MNIST when it is found (``HANDPROP_TEST_MNIST`` or ``../shared/data/mnist``).
"""

from __future__ import annotations

import io
import os
import re
import select
import shutil
import socket
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image

from handprop.cli import main
from handprop.nn import Network, save
from handprop.predict import prepare_image

ROOT = Path(__file__).parents[1]
MNIST = Path(os.environ.get("HANDPROP_TEST_MNIST", ROOT.parent / "shared/data/mnist"))
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
    """A folder of runs: an MLP on the 8x8 digits, and one on MNIST when it is here."""
    folder = tmp_path_factory.mktemp("serve")
    train(folder, "digits", DIGITS)
    if MNIST.is_dir():
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
    if MNIST.is_dir():
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


def test_the_answer_shows_the_input_the_saliency_and_the_hidden_units(client, runs):
    answer = post_png(client, stroke_png(), model="digits").json()
    assert answer["label"] == "1"
    assert sum(answer["probabilities"]) == pytest.approx(1, abs=1e-4)
    expected = prepare_image(stroke_png(), (8, 8))
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
    image = prepare_image(stroke_png(), (8, 8))
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
def server(runs):
    """``handprop serve RUNS`` as a subprocess on a free 127.0.0.1 port; always stopped."""
    port = free_port()
    proc = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "from handprop.cli import main; main()",
            "serve",
            str(runs),
            "--port",
            str(port),
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        ready, _, _ = select.select([proc.stdout], [], [], 120)
        line = proc.stdout.readline() if ready else "(nothing printed in 120 s)"
        assert f"http://127.0.0.1:{port}/" in line, line + proc.stdout.read()
        yield f"http://127.0.0.1:{port}"
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        proc.stdout.close()


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


def draw(page, points):
    box = page.locator("#pad").bounding_box()
    page.mouse.move(box["x"] + points[0][0], box["y"] + points[0][1])
    page.mouse.down()
    for x, y in points[1:]:
        page.mouse.move(box["x"] + x, box["y"] + y, steps=8)
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


def test_the_page_reads_a_drawn_stroke_as_a_one(server, browser, runs):
    page = browser.new_page(viewport={"width": 1280, "height": 900})
    errors = []
    page.on("pageerror", lambda exc: errors.append(str(exc)))
    page.goto(server)
    page.wait_for_function("document.body.dataset.ready === '1'")
    model = "mnist" if (runs / "mnist").is_dir() else "digits"
    page.select_option("#model", model)
    options = page.eval_on_selector_all("#model option", "os => os.map(o => o.textContent)")
    assert any(o.startswith("digits (digits) — ") and o.endswith("%") for o in options), options

    assert canvas_pixels(page, "#input")[:, :3].max() == 0  # nothing drawn: a black preview
    assert sum(bars(page)) == 0

    draw(page, [(140, 45), (140, 235)])  # one vertical stroke, top to bottom
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
    page.select_option("#model", "digits")
    count = int(page.evaluate("document.body.dataset.answers"))
    draw(page, [(140, 45), (140, 235)])
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
    assert errors == []

    if os.environ.get("HANDPROP_SCREENSHOT"):  # the README's picture
        page.set_viewport_size({"width": 1280, "height": 680})
        page.click("#clear")
        page.select_option("#model", model)
        count = int(page.evaluate("document.body.dataset.answers"))
        draw(page, [(150, 40), (150, 240)])
        draw(page, [(112, 84), (150, 40)])
        wait_for_answers(page, count)
        page.screenshot(path=os.environ["HANDPROP_SCREENSHOT"])
