"""docs/tutorial.ipynb: stored without outputs, and runs from top to bottom without error.

The notebook runs in a Jupyter kernel (nbclient, ipykernel) on scikit-learn's 8x8 digits
(HANDPROP_TUTORIAL_DATA=digits: seconds, never MNIST nor a download), in a temporary
working directory, so that nothing lands in the checkout. Without nbformat, nbclient or
ipykernel the run is skipped and says so.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

import handprop

NOTEBOOK = Path(__file__).resolve().parents[1] / "docs" / "tutorial.ipynb"
#: seconds any one cell may take (the slowest takes a few on the digits)
CELL_TIMEOUT = 300
#: a last cell, run after the notebook's own in the same kernel: what it ran on
PROBE = "import sys, handprop\nprint(sys.executable)\nprint(handprop.__file__)"


def test_tutorial_is_stored_without_outputs():
    nb = json.loads(NOTEBOOK.read_text(encoding="utf-8"))
    assert nb["metadata"]["kernelspec"]["name"] == "python3"
    assert "widgets" not in nb["metadata"], "widget state in the notebook's metadata"
    assert any(cell["cell_type"] == "code" for cell in nb["cells"]), "no code cells"
    for i, cell in enumerate(nb["cells"]):
        if cell["cell_type"] != "code":
            continue
        where = f"cell {i} ({''.join(cell['source'])[:40]!r}...)"
        assert cell["outputs"] == [], f"{where} has outputs: strip them before committing"
        assert cell["execution_count"] is None, f"{where} has an execution count"
        assert "widgets" not in cell["metadata"], f"{where} holds widget state"
        assert "execution" not in cell["metadata"], f"{where} holds execution timings"


def test_tutorial_runs(tmp_path, tmp_path_factory, monkeypatch):
    for module in ("nbformat", "nbclient", "ipykernel"):
        pytest.importorskip(
            module, reason=f"running the tutorial needs {module} (the dev extra brings it)"
        )
    import nbformat
    from nbclient import NotebookClient

    nb = nbformat.read(NOTEBOOK, as_version=4)
    nbformat.validate(nb)
    n_cells = len(nb.cells)
    nb.cells.append(nbformat.v4.new_code_cell(PROBE))
    # the kernel inherits this environment: the digits, and the kernel's own plot backend
    monkeypatch.setenv("HANDPROP_TUTORIAL_DATA", "digits")
    monkeypatch.delenv("MPLBACKEND", raising=False)
    # "python3" is this interpreter, whatever kernels the user has installed: a kernel
    # spec in the first folder of JUPYTER_PATH, which comes before all others
    jupyter = tmp_path_factory.mktemp("jupyter")
    spec = jupyter / "kernels" / "python3" / "kernel.json"
    spec.parent.mkdir(parents=True)
    argv = [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"]
    spec.write_text(json.dumps({"argv": argv, "display_name": "Python 3", "language": "python"}))
    monkeypatch.setenv("JUPYTER_PATH", str(jupyter))
    client = NotebookClient(
        nb,
        kernel_name="python3",
        timeout=CELL_TIMEOUT,
        resources={"metadata": {"path": str(tmp_path)}},  # the kernel's working directory
    )
    client.execute()  # raises CellExecutionError, with the cell and its traceback, on an error

    # on this interpreter and this checkout's handprop, not some other kernel's
    python, module = nb.cells[-1].outputs[0]["text"].splitlines()
    assert Path(python).resolve() == Path(sys.executable).resolve()
    assert Path(module).resolve() == Path(handprop.__file__).resolve()
    # no warnings either: a reader would see them
    stderr = [
        (i, out["text"])
        for i, cell in enumerate(nb.cells[:n_cells])
        if cell.cell_type == "code"
        for out in cell.outputs
        if out.get("name") == "stderr"
    ]
    assert not stderr, f"cells wrote to stderr: {stderr}"
    assert not any(tmp_path.iterdir()), "the notebook left files in its working directory"
