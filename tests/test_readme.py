"""The README's Python examples run as a new user would type them."""

import re
from pathlib import Path

import pytest

README = Path(__file__).parents[1] / "README.md"
BLOCKS = re.findall(r"^```python\n(.*?)^```", README.read_text(encoding="utf-8"), flags=re.M | re.S)


def test_the_readme_has_python_examples():
    assert BLOCKS


@pytest.mark.parametrize("code", BLOCKS, ids=lambda code: code.splitlines()[0][:40])
def test_a_readme_example_runs(code, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # whatever it writes lands here
    names = {"__name__": "readme"}
    exec(compile(code, str(README), "exec"), names)
    said = re.search(r"score\((\w+), (\w+)\)\s+# ([0-9.]+)", code)
    if said:  # the score the comment promises, give or take two of 450 test digits
        X, y, score = said.groups()
        assert names["clf"].score(names[X], names[y]) == pytest.approx(float(score), abs=0.005)
