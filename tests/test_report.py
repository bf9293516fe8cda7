"""``handprop report``: one HTML page that parses and depends on no other file."""

from __future__ import annotations

import base64
import json
import struct
from html.parser import HTMLParser

import pytest
from click.testing import CliRunner

import handprop.analysis.figures.writing as figure_writing
from handprop.analysis.figures import pixel_size
from handprop.analysis.report import flatten, html_table, report_html, write_report
from handprop.errors import ConfigError, DataError
from test_runs import fake_images, write_grid, write_run


class PageParser(HTMLParser):
    """Collects tags, every URL-carrying attribute, the text, and unclosed tags."""

    VOID = frozenset({"meta", "img", "br", "hr", "link", "input"})

    def __init__(self) -> None:
        super().__init__()
        self.tags: list[str] = []
        self.urls: list[tuple[str, str, str]] = []
        self.text: list[str] = []
        self.open: list[str] = []

    def handle_starttag(self, tag, attrs):
        self.tags.append(tag)
        if tag not in self.VOID:
            self.open.append(tag)
        for name, value in attrs:
            if name in ("src", "href", "srcset", "action", "data", "poster", "background"):
                self.urls.append((tag, name, value or ""))

    def handle_endtag(self, tag):
        if self.open and self.open[-1] == tag:
            self.open.pop()
        else:
            raise AssertionError(f"</{tag}> closes <{self.open[-1] if self.open else None}>")

    def handle_data(self, data):
        self.text.append(data)


def parse(page: str) -> PageParser:
    parser = PageParser()
    parser.feed(page)
    parser.close()
    return parser


def assert_self_contained(page: str) -> PageParser:
    p = parse(page)
    assert p.open == [], f"unclosed tags: {p.open}"
    for tag, name, url in p.urls:
        assert url.startswith(("data:", "#")), f"<{tag} {name}={url[:40]!r}> leaves the page"
    assert not {"script", "link", "iframe", "object", "embed"} & set(p.tags)
    # no url() in the inline CSS (fonts, images) and no other document referenced
    assert "url(" not in page and "@import" not in page
    assert "http://" not in page and "https://" not in page
    return p


def embedded_png_sizes(p: PageParser) -> list[tuple[int, int]]:
    sizes = []
    for tag, _, url in p.urls:
        if tag == "img":
            assert url.startswith("data:image/png;base64,")
            data = base64.b64decode(url.split(",", 1)[1])
            assert data[:8] == b"\x89PNG\r\n\x1a\n"
            sizes.append(struct.unpack(">II", data[16:24]))
    return sizes


@pytest.fixture(autouse=True)
def images(monkeypatch):
    monkeypatch.setattr(figure_writing, "_load_images", lambda run: fake_images())


def test_run_report_is_self_contained(tmp_path):
    folder = write_run(tmp_path / "run", comparisons=True)
    # one comparison model is enough here and keeps the test fast
    (folder / "predictions_sklearn_default.csv").unlink()
    out = write_report(folder)
    assert out == folder / "report.html"
    page = out.read_text(encoding="utf-8")
    p = assert_self_contained(page)
    text = " ".join(p.text)
    assert "50.00%" in text  # handprop's accuracy
    assert "100.00%" in text  # the scikit-learn analogue's, in the comparison table
    assert "Comparison with scikit-learn" in text
    assert "learning_rate" in text and "cross_entropy" in text  # the config table
    assert "bar" in text and "macro avg" in text  # per class
    sizes = embedded_png_sizes(p)
    assert len(sizes) == 9  # 2 confusion matrices + 7 other figures (diagnostics too)
    assert pixel_size("misclassified", rows=1) in sizes  # 6 errors: one row of the grid
    # internal links point at anchors that exist
    anchors = {url[1:] for tag, name, url in p.urls if name == "href"}
    assert anchors and all(f'id="{a}"' in page for a in anchors)
    # written atomically: nothing but the run's files and the report
    assert not [f for f in folder.iterdir() if f.name.startswith(".")]


def test_report_of_a_run_without_comparisons_config_or_dataset(tmp_path, monkeypatch):
    def fail(run):
        raise DataError("no such dataset")

    monkeypatch.setattr(figure_writing, "_load_images", fail)
    folder = write_run(tmp_path / "run")
    (folder / "config.toml").unlink()
    page = report_html(folder)
    p = assert_self_contained(page)
    text = " ".join(p.text)
    assert "Comparison" not in text
    assert "has no config.toml" in text
    assert "Not shown: misclassified: cannot load the dataset" in text
    assert len(embedded_png_sizes(p)) == 7


def test_grid_report(tmp_path):
    grid = write_grid(tmp_path / "grid", {"e8": {"epochs": 8}, "e4": {"epochs": 4}})
    out = write_report(grid, tmp_path / "page.html")
    page = out.read_text(encoding="utf-8")
    p = assert_self_contained(page)
    text = " ".join(p.text)
    assert "e4" in text and "e8" in text
    assert "50.00%" in text  # each run's accuracy
    assert sorted(embedded_png_sizes(p)) == sorted(
        [pixel_size("grid_training_curves"), pixel_size("grid_accuracy")]
    )
    # one table of the runs (it was there twice: summary.csv's, then the folders'), in
    # summary.csv's order
    assert p.tags.count("table") == 1
    assert [t for t in p.text if t in ("e4", "e8")] == ["e8", "e4"]


def test_grid_table_completes_summary_csv_from_the_run_folders(tmp_path):
    from handprop.analysis.report import grid_table
    from handprop.run.reader import GridFolder

    folder = write_grid(tmp_path / "grid", {"a": {"epochs": 4}})
    (folder / "summary.csv").write_text(
        "run,status,accuracy,final_loss,seconds,epochs,message\n"
        "a,skipped,0.5,0.2,0.06,4,\n"
        "b,cancelled,,,,,not started: the grid was stopped\n"
    )
    header, rows = grid_table(GridFolder(folder))
    assert header == [
        "run", "status", "accuracy", "final loss", "epochs", "training time (s)", "message"
    ]  # fmt: skip
    assert rows == [
        ["a", "completed", "50.00%", "0.2", "4", "0.1", ""],  # the folder's own numbers
        ["b", "cancelled", "", "", "", "", "not started: the grid was stopped"],
    ]


def test_figures_scale_to_the_page_border_included():
    from handprop.analysis.report import CSS

    rule = CSS[CSS.index("figure img {") :].split("}")[0]
    # the diagnostics (1300 px) are wider than the page (1250 px): max-width 100% alone
    # let the 1 px border overflow the box
    assert "max-width: 100%" in rule and "box-sizing: border-box" in rule
    assert pixel_size("diagnostics")[0] > 1250


def test_text_is_escaped():
    table = html_table(["<b>"], [["a & <script>"]])
    assert "<script>" not in table and "&lt;script&gt;" in table
    assert flatten({"a": {"b": 1}, "c": 2}) == [("a.b", 1), ("c", 2)]


def test_cli_writes_the_page(tmp_path, monkeypatch):
    import handprop.analysis.report
    from handprop.cli.report import command

    # the figures are tested above; here only the command's wiring
    monkeypatch.setattr(handprop.analysis.report, "build_run_figures", lambda run: ([], []))

    folder = write_run(tmp_path / "run")
    result = CliRunner().invoke(command, [str(folder), "--out", str(tmp_path / "r.html")])
    assert result.exit_code == 0, result.output
    assert result.output.strip() == str(tmp_path / "r.html")
    assert (tmp_path / "r.html").is_file()


def test_cli_user_errors(tmp_path):
    from handprop.cli.report import command

    result = CliRunner().invoke(command, [str(tmp_path / "missing")])
    assert result.exit_code == 1 and isinstance(result.exception, ConfigError)
    folder = write_run(tmp_path / "run")
    (folder / "predictions.csv").write_text("index,true,pred,p0,p1,p2\n1,0,0,0.5,0.5\n")
    result = CliRunner().invoke(command, [str(folder)])
    assert result.exit_code == 1 and isinstance(result.exception, DataError)
    assert "line 2: expected 6 columns, got 5" in str(result.exception)
    assert not (folder / "report.html").exists()


def test_report_of_a_diverged_run_shows_why(tmp_path):
    folder = write_run(tmp_path / "run")
    (folder / "predictions.csv").unlink()
    metrics = json.loads((folder / "metrics.json").read_text())
    metrics.update(status="diverged", message="epoch 3: loss is nan at learning rate 50")
    (folder / "metrics.json").write_text(json.dumps(metrics))
    p = assert_self_contained(report_html(folder))
    text = " ".join(p.text)
    assert "diverged" in text and "loss is nan at learning rate 50" in text
    # its inside is still worth seeing: where did the gradients go?
    assert embedded_png_sizes(p) == [pixel_size("training_curves"), pixel_size("diagnostics")]


def test_config_table_shows_what_defines_the_run_and_folds_the_rest():
    from handprop.analysis.report import config_html, defining_fields

    gd = {"hidden": [100], "activation": ["sigmoid"], "learning_rate": 2.5, "epochs": 1000}
    names = defining_fields(gd)
    assert "learning_rate" in names and "batch_size" in names
    assert not {"momentum", "beta1", "beta2", "rho", "eps", "out", "name"} & set(names)
    adam = defining_fields({**gd, "optimizer": "adam", "dropout": [0.2]})
    assert {"beta1", "beta2", "eps", "dropout"} <= set(adam) and "rho" not in adam
    assert "augment_elastic_alpha" not in adam
    elastic = defining_fields({**gd, "augment_elastic_alpha": 34.0})
    assert {"augment_elastic_alpha", "augment_elastic_sigma"} <= set(elastic)
    page = config_html({**gd, "init": "glorot_uniform", "batch_size": None})
    assert "['sigmoid']" not in page and "[100]" not in page  # lists read as values
    assert '<tr class="changed"><td title="weight initialisation">init</td>' in page
    assert "full batch" in page and "<details>" in page


def test_report_carries_every_caveat_compare_knows(tmp_path, monkeypatch):
    from handprop.analysis.compare import comparison_caveats

    monkeypatch.setattr(figure_writing, "_load_images", lambda run: fake_images())
    folder = write_run(tmp_path / "run", comparisons=True)
    models = {
        "sklearn_default": {"label": "scikit-learn (default)", "accuracy": 0.5,
                            "macro_f1": 0.5, "converged": False, "notes": []},
        "sklearn_analogue": {"label": "scikit-learn (analogue)", "accuracy": 1.0,
                             "macro_f1": 1.0, "notes": ["scikit-learn has no dropout",
                             "initialisation is scikit-learn's own, not the run's uniform"]},
    }  # fmt: skip
    (folder / "comparison.json").write_text(json.dumps({"models": models}))
    caveats = comparison_caveats(models)
    assert len(caveats) == 3 and "stopped at max_iter" in caveats[0]
    text = " ".join(assert_self_contained(report_html(folder)).text)
    for caveat in caveats:
        assert caveat in text
