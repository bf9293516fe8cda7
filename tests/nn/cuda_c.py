"""Run a CUDA elementwise kernel's body in Python, element by element, on NumPy arrays:
the check of handprop.nn.kernels' CUDA sources on a machine without a GPU.

The bodies are written in a small part of CUDA C that reads as Python once its
syntax is turned over: statements ``[type] name = expr;`` (also ``+=``, ``-=``),
``for (int j = a; j < b; j++) { ... }``, ``if (cond) { ... }``, the operators of
arithmetic and comparison, ``||``, ``&&``, one ``cond ? a : b`` per expression, the
casts ``T(x)`` and the functions tanh, exp, log, sqrt, fmax, fmin (which drop a NaN, as
``np.fmax`` and ``np.fmin`` do). Anything else is an error here, so a body that strays
from that subset fails its test.

Parameters follow ``cupy.ElementwiseKernel``: ``[raw] TYPE name``; a non-raw array is
seen by the body as its element ``i``, a raw array whole (flat, C order), a scalar as
it is, cast to its type.
"""

from __future__ import annotations

import re
from typing import Any

import numpy as np

TYPES = {"float32": np.float32, "float64": np.float64, "int32": np.int32, "int64": np.int64}
TYPES["bool"] = np.bool_
DECLARATION = re.compile(r"^(?:const\s+)?(?:T|int|bool|double|float|ptrdiff_t)\s+(\w+\s*=.*)$")
FOR = re.compile(r"^for\s*\(\s*int\s+(\w+)\s*=\s*(.+?);\s*\1\s*<\s*(.+?);\s*\1\+\+\s*\)$")
IF = re.compile(r"^if\s*\((.+)\)$")
#: C that this subset does not take: ++ and -- in expressions, pointers, bit operators,
#: C-style casts
OUTSIDE = re.compile(
    r"\+\+|--|->|(?<!&)&(?!&)|(?<!\|)\|(?!\|)|<<|>>|\bsizeof\b|\(\s*(T|int|float|double)\s*\)"
)


def params(text: str) -> list[tuple[bool, str, str]]:
    """(raw, type, name) of each parameter of an ElementwiseKernel's param string."""
    out = []
    for item in filter(None, (p.strip() for p in text.split(","))):
        words = item.split()
        raw = words[0] == "raw"
        ty, name = words[-2], words[-1]
        out.append((raw, ty, name))
    return out


def _top_level(expr: str, char: str) -> int:
    """Index of the first ``char`` outside parentheses and brackets, or -1."""
    depth = 0
    for at, c in enumerate(expr):
        if c in "([":
            depth += 1
        elif c in ")]":
            depth -= 1
        elif c == char and depth == 0:
            return at
    return -1


def expression(expr: str) -> str:
    """A C expression as Python."""
    expr = expr.strip()
    q = _top_level(expr, "?")
    if q >= 0:
        cond, rest = expr[:q], expr[q + 1 :]
        c = _top_level(rest, ":")
        if c < 0:
            raise SyntaxError(f"a ? without : in {expr!r}")
        then, other = rest[:c], rest[c + 1 :]
        return f"(({expression(then)}) if ({expression(cond)}) else ({expression(other)}))"
    if re.search(OUTSIDE, expr):
        raise SyntaxError(f"outside the subset: {expr!r}")
    expr = expr.replace("||", " or ").replace("&&", " and ")
    if re.search(r"!(?!=)", expr):
        raise SyntaxError(f"'!' (not) is outside the subset: {expr!r}")
    return expr


def _blocks(body: str) -> list[str]:
    """The body as Python lines, indented."""
    lines, depth, text = [], 0, body
    at = 0
    buf = ""
    while at < len(text):
        c = text[at]
        if c == "{":
            head = buf.strip()
            buf = ""
            m_for, m_if = FOR.match(head), IF.match(head)
            if m_for:
                j, a, b = m_for.groups()
                lines.append(
                    "    " * depth
                    + f"for {j} in range(int({expression(a)}), int({expression(b)})):"
                )
            elif m_if:
                lines.append("    " * depth + f"if {expression(m_if.group(1))}:")
            else:
                raise SyntaxError(f"a block that is neither for nor if: {head!r}")
            depth += 1
            lines.append("    " * depth + "pass")
        elif c == "}":
            if buf.strip():
                raise SyntaxError(f"a statement without ';' before '}}': {buf!r}")
            depth -= 1
            buf = ""
        elif c == ";" and not re.match(r"\s*for\s*\(", buf):
            stmt = buf.strip()
            buf = ""
            if stmt:
                lines.append("    " * depth + statement(stmt))
        else:
            buf += c
        at += 1
    if buf.strip() or depth:
        raise SyntaxError(f"unfinished body: {buf!r}, depth {depth}")
    return lines


def statement(stmt: str) -> str:
    declared = DECLARATION.match(stmt)
    if declared:
        stmt = declared.group(1)
    m = re.match(r"^([\w\[\]\s\*\+]+?)\s*(=|\+=|-=|\*=|/=)\s*(.+)$", stmt)
    if not m:
        raise SyntaxError(f"not an assignment: {stmt!r}")
    target, op, value = m.groups()
    return f"{target.strip()} {op} {expression(value)}"


def translate(body: str) -> str:
    """The body as a Python program."""
    return "\n".join(_blocks(body))


def run(inputs: str, outputs: str, body: str, *args: Any) -> tuple[Any, ...]:
    """Run the kernel (``inputs``, ``outputs`` as ElementwiseKernel's params) on NumPy
    ``args`` (inputs then outputs; the outputs are written in place and returned)."""
    spec = params(inputs) + params(outputs)
    if len(spec) != len(args):
        raise TypeError(f"{len(spec)} parameters, {len(args)} arguments")
    arrays = [
        a
        for (raw, _, _), a in zip(spec, args, strict=True)
        if not raw and isinstance(a, np.ndarray)
    ]
    size = arrays[0].size
    assert all(a.size == size for a in arrays), "elementwise arrays differ in size"
    float_type = next(a.dtype.type for a in args if hasattr(a, "dtype") and a.dtype.kind == "f")
    code = compile(translate(body), "<kernel>", "exec")
    env_base: dict[str, Any] = {
        "T": float_type, "tanh": np.tanh, "exp": np.exp, "log": np.log, "sqrt": np.sqrt,
        "fmax": np.fmax, "fmin": np.fmin, "double": np.float64, "int": int, "bool": bool,
    }  # fmt: skip
    flats = {}
    for (raw, _, name), a in zip(spec, args, strict=True):
        if raw:
            flats[name] = a.reshape(-1)  # a view: raw outputs are written through it
            assert np.shares_memory(flats[name], a)
    n_in = len(params(inputs))
    for i in range(size):
        env = dict(env_base, i=i, **flats)
        for (raw, ty, name), a in zip(spec, args, strict=True):
            if raw:
                continue
            kind = float_type if ty == "T" else TYPES[ty]
            env[name] = a.reshape(-1)[i] if isinstance(a, np.ndarray) else kind(a)
            if isinstance(a, np.ndarray) and ty != "T":
                env[name] = kind(env[name])
        exec(code, env)
        for (raw, _, name), a in list(zip(spec, args, strict=True))[n_in:]:
            if not raw:
                a.reshape(-1)[i] = env[name]
    outs = args[n_in:]
    return outs[0] if len(outs) == 1 else tuple(outs)
