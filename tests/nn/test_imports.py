"""handprop.nn imports nothing but NumPy and the standard library."""

import subprocess
import sys
import textwrap


def test_nn_imports_only_numpy_and_stdlib():
    code = textwrap.dedent(
        """
        import sys
        before = set(sys.modules)
        import handprop.nn
        new = {m.split(".")[0] for m in set(sys.modules) - before}
        allowed = set(sys.stdlib_module_names) | {"numpy", "handprop", "_distutils_hack"}
        print(sorted(new - allowed))
        print(sorted(m for m in sys.modules if m.startswith("handprop.")))
        """
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True
    ).stdout.splitlines()
    assert out[0] == "[]", f"handprop.nn pulled in: {out[0]}"
    loaded = eval(out[1])
    assert all(
        m.startswith(
            (
                "handprop.nn",
                "handprop.errors",
                "handprop.atomic",
                "handprop.memory",
                "handprop.files",
            )
        )
        for m in loaded
    ), loaded
