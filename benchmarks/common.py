"""Shared pieces of the benchmark harness: result rows, targets, timing, machine facts.

Nothing here knows about handprop's internals; the cases in :mod:`benchmarks.cases`
measure handprop through its public API only.
"""

from __future__ import annotations

import datetime as _dt
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

#: the repository root (benchmarks/ lives directly under it)
REPO_ROOT = Path(__file__).resolve().parent.parent


# -- results --------------------------------------------------------------------------


@dataclass(frozen=True)
class Target:
    """A bound on a ratio: ``ratio <= bound`` (op "<=") or ``ratio >= bound`` (">=")."""

    op: str
    bound: float
    unit: str = "x"  # "x" for a ratio, or a unit such as "MB" for an absolute value

    def check(self, value: float | None) -> bool | None:
        if value is None:
            return None
        return value <= self.bound if self.op == "<=" else value >= self.bound

    def __str__(self) -> str:
        unit = "x" if self.unit == "x" else f" {self.unit}"
        return f"{self.op} {self.bound:g}{unit}"


@dataclass
class Row:
    """One line of the results table.

    ``ratio`` is handprop / reference: a time ratio for time metrics (lower is better),
    a throughput ratio for rates (higher is better); the target says which.
    ``passed`` is None when the row has no target or could not be measured.
    """

    case: str
    metric: str
    handprop: float | None
    reference: str = ""
    ref_value: float | None = None
    ratio: float | None = None
    target: str = ""
    passed: bool | None = None
    note: str = ""

    @classmethod
    def compare(
        cls,
        case: str,
        metric: str,
        handprop: float | None,
        reference: str,
        ref_value: float | None,
        target: Target | None,
        note: str = "",
    ) -> Row:
        """A row whose ratio is handprop / reference, checked against ``target``."""
        ratio = None
        if handprop is not None and ref_value:
            ratio = handprop / ref_value
        return cls(
            case,
            metric,
            handprop,
            reference,
            ref_value,
            ratio,
            "" if target is None else str(target),
            None if target is None else target.check(ratio),
            note,
        )

    @classmethod
    def skipped(cls, case: str, reason: str) -> Row:
        """A row saying a measurement could not be made, and why."""
        return cls(case, "-", None, note=f"skipped: {reason}")


@dataclass
class CaseResult:
    """What one case reports: its rows, free-form notes, and extra markdown sections."""

    name: str
    rows: list[Row] = field(default_factory=list)
    sections: list[str] = field(default_factory=list)
    seconds: float = 0.0
    measured_at: str = ""

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_json(cls, obj: dict[str, Any]) -> CaseResult:
        rows = [Row(**r) for r in obj.get("rows", [])]
        return cls(
            obj["name"],
            rows,
            list(obj.get("sections", [])),
            float(obj.get("seconds", 0.0)),
            str(obj.get("measured_at", "")),
        )


def now_iso() -> str:
    """The current time, UTC, to the second."""
    return _dt.datetime.now(_dt.timezone.utc).replace(microsecond=0).isoformat()


# -- timing ---------------------------------------------------------------------------


#: seconds to let idle thread pools go to sleep before timing a different contender
SETTLE_SECONDS = 0.25


def time_side_by_side(
    fns: dict[str, Callable[[], object]],
    repeats: int,
    warmup: int = 2,
    settle: float = SETTLE_SECONDS,
    rewarm: int = 0,
    best_of: int = 1,
) -> dict[str, list[float]]:
    """Seconds per call of each function, measured interleaved.

    Every function runs ``warmup`` times first (page faults, BLAS thread start-up, work
    buffers); then each repetition calls every function once, rotating the order so that
    none always runs right after the same neighbour. Interleaving spreads any load from
    other processes over all contenders instead of one.

    Before a function runs right after a different one, the harness sleeps ``settle``
    seconds: OpenBLAS's workers busy-wait for about 2^28 cycles (~0.1 s) after each
    call and libgomp's (PyTorch's) spin too, so without the pause a PyTorch epoch timed
    right after a NumPy one shares its 2 cores with a spinning OpenBLAS thread and
    measures about twice as slow as it runs alone.

    The pause has its own cost: caches go cold and idle threads fall asleep, which adds
    a few ms to a 40 ms call that a loop of such calls (a training run) never pays.
    ``rewarm`` untimed calls after each switch measure every contender as it runs in
    such a loop.

    ``best_of`` > 1: each repetition's sample is the fastest of that many back-to-back
    calls. On a shared machine a short call (inference, ~10 ms) is often preempted by
    another process for a whole time slice, which doubles that one sample; the fastest
    of a few calls drops those slices while the median over repetitions still shows a
    lasting slow-down.
    """
    names = list(fns)
    previous = None

    def call(name: str) -> float:
        nonlocal previous
        if previous is not None and previous != name:
            if settle:
                time.sleep(settle)
            for _ in range(rewarm):
                fns[name]()
        previous = name
        best = float("inf")
        for _ in range(best_of):
            start = time.perf_counter()
            fns[name]()
            best = min(best, time.perf_counter() - start)
        return best

    for name in names:
        for _ in range(warmup):
            call(name)
    times: dict[str, list[float]] = {name: [] for name in names}
    for rep in range(repeats):
        k = rep % len(names)
        for name in names[k:] + names[:k]:
            times[name].append(call(name))
    return times


def median(values: Sequence[float]) -> float:
    return float(statistics.median(values))


def spread(values: Sequence[float]) -> str:
    """ "min-max" of a list of seconds, in ms, for the notes."""
    return f"{min(values) * 1e3:.1f}-{max(values) * 1e3:.1f} ms"


# -- machine --------------------------------------------------------------------------


def cpu_model() -> str:
    """The CPU model name from /proc/cpuinfo (Linux), else platform's guess."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def usable_cores() -> int:
    """Cores this process may run on (its affinity mask), else the machine's count."""
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def blas_pools() -> list[dict[str, Any]]:
    """threadpoolctl's view of the thread pools loaded in this process (BLAS, OpenMP)."""
    try:
        from threadpoolctl import threadpool_info
    except ImportError:
        return []
    return threadpool_info()


def numpy_blas_threads() -> int | None:
    """Threads of NumPy's BLAS pool (the first BLAS pool threadpoolctl finds)."""
    for pool in blas_pools():
        if pool.get("user_api") == "blas":
            return int(pool["num_threads"])
    return None


def versions() -> dict[str, str]:
    """Versions of the interpreter and of every library the cases may use."""
    out = {"python": platform.python_version()}
    for name in ("numpy", "torch", "sklearn", "threadpoolctl", "handprop"):
        if name in ("torch", "sklearn") and name not in sys.modules:
            # report what is installed without importing it just for its version
            try:
                from importlib.metadata import version

                out[name] = version("scikit-learn" if name == "sklearn" else name)
            except Exception:
                out[name] = "not installed"
            continue
        try:
            module = __import__(name)
            out[name] = str(getattr(module, "__version__", "?"))
        except ImportError:
            out[name] = "not installed"
    return out


def load_average() -> str:
    try:
        return " ".join(f"{x:.2f}" for x in os.getloadavg())
    except (AttributeError, OSError):
        return "n/a"


def machine_description(
    threads: int | None, torch_threads: int | None, data: str = ""
) -> list[str]:
    """Markdown bullet lines describing the machine, the thread settings, the data."""
    lines = [
        f"- date: {now_iso()}",
        f"- CPU: {cpu_model()}, {os.cpu_count()} logical cores, {usable_cores()} usable",
        f"- OS: {platform.platform()}",
        "- versions: " + ", ".join(f"{k} {v}" for k, v in versions().items()),
        f"- threads: NumPy BLAS {threads if threads is not None else 'unknown'}, "
        f"PyTorch {torch_threads if torch_threads is not None else 'n/a'}",
    ]
    for pool in blas_pools():
        extra = ", ".join(str(pool[k]) for k in ("architecture", "threading_layer") if pool.get(k))
        words = [
            f"- pool: {pool.get('user_api')}/{pool.get('internal_api')}",
            str(pool.get("version") or ""),
            f"{pool.get('num_threads')} threads",
            f"({extra})" if extra else "",
            Path(str(pool.get("filepath", ""))).name,
        ]
        lines.append(" ".join(w for w in words if w))
    if data:
        lines.append(f"- data: {data}")
    lines.append(f"- load average at the end (1/5/15 min): {load_average()}")
    return lines


# -- output ---------------------------------------------------------------------------


def atomic_write_text(path: Path, text: str) -> None:
    """Write under a temporary name in the same folder, then rename into place."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


def fmt_value(value: float | None) -> str:
    """Numbers for the table: 3 significant digits, thousands separated."""
    if value is None:
        return "-"
    if abs(value) >= 1000:
        return f"{value:,.0f}"
    if abs(value) >= 100:
        return f"{value:.1f}"
    if abs(value) >= 1:
        return f"{value:.2f}"
    return f"{value:.4f}"


def results_table(rows: Sequence[Row]) -> str:
    """The rows as one markdown table (readable as plain text too)."""
    header = ["case", "metric", "handprop", "reference", "ref value", "ratio", "target", "result"]
    lines = [
        "| " + " | ".join([*header, "note"]) + " |",
        "|" + "|".join(["---"] * (len(header) + 1)) + "|",
    ]
    for r in rows:
        result = {True: "PASS", False: "MISS", None: ""}[r.passed]
        cells = [
            r.case,
            r.metric,
            fmt_value(r.handprop),
            r.reference or "-",
            fmt_value(r.ref_value),
            "-" if r.ratio is None else f"{r.ratio:.3g}x",
            r.target or "-",
            result or "-",
            r.note.replace("|", "/"),
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)
