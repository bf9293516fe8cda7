"""The cost of one in-place ``Allreduce`` of a float32 vector, measured under MPI.

    mpiexec -n 2 python -m benchmarks.mpi_allreduce            # ~5 s on 2 cores
    mpiexec -n 2 python -m benchmarks.mpi_allreduce --quick    # smoke test, writes nothing

Every rank sums a float32 vector in place (``MPI.IN_PLACE``, ``MPI.SUM``), the call
data-parallel training makes once per step on its flat gradient. Sizes run from 1
element to 4^12 (16.8M, 64 MiB) in powers of 4, plus the two flat parameter vectors
that matter here: 784-100-10's (79,510) and the CNN's of ``experiments/cnn.toml``.

How it measures: per size, after warm-up calls, rank 0 picks a count k of calls that
takes about 10 ms and broadcasts it; a timing is a barrier, k calls back to back, and
the time per call of the slowest rank (MAX reduce). The sizes are timed in rounds, each
round all sizes once, so that load from other processes hits every size alike; the
median over the rounds is reported. An alpha-beta model,
``time = alpha + bytes / beta``, is fitted by least squares on relative residuals
(every size counts alike, from 4 bytes to 64 MiB). Rank 0 prints a table and writes
``benchmarks/MPI_ALLREDUCE.json`` (read by ``python -m benchmarks.scaling``).

mpi4py is imported only when this runs; handprop never needs it.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from benchmarks.common import REPO_ROOT, atomic_write_text, machine_description, now_iso

DEFAULT_OUTPUT = REPO_ROOT / "benchmarks" / "MPI_ALLREDUCE.json"
CNN_TOML = REPO_ROOT / "experiments" / "cnn.toml"
#: the seed network (the original program's 784-100-10)
SEED_SPEC = "784-100-10"
#: seconds of back-to-back calls per repetition
TARGET_SECONDS = 0.01


def cnn_layers(path: Path = CNN_TOML) -> list[str]:
    """The ``layers`` list of a TOML config (experiments/cnn.toml by default)."""
    try:
        import tomllib
    except ImportError:  # Python 3.10
        import tomli as tomllib
    with open(path, "rb") as f:
        return list(tomllib.load(f)["layers"])


def param_counts() -> dict[str, int]:
    """Flat parameter vector lengths: ``{"mlp": 79510, "cnn": ...}`` (MNIST shapes)."""
    from handprop.nn import Network

    mlp = Network.from_spec(SEED_SPEC, activation="sigmoid", rng=0)
    cnn = Network.from_layers(cnn_layers(), (1, 28, 28), 10, rng=0)
    return {"mlp": int(mlp.n_params), "cnn": int(cnn.n_params)}


def fit_alpha_beta(nbytes: Sequence[float], seconds: Sequence[float]) -> tuple[float, float]:
    """(alpha seconds, beta bytes/s) of ``t = alpha + bytes/beta``, least squares on
    relative residuals ``(model - t) / t``, so small and large messages weigh alike."""
    x, t = np.asarray(nbytes, float), np.asarray(seconds, float)
    A = np.stack([1 / t, x / t], axis=1)
    (alpha, inv_beta), *_ = np.linalg.lstsq(A, np.ones_like(t), rcond=None)
    return float(alpha), float(1 / inv_beta)


class Timer:
    """Back-to-back in-place Allreduces of one float32 vector of ``n`` elements."""

    def __init__(self, comm: Any, n: int, warmup: int = 3) -> None:
        from mpi4py import MPI

        self.comm, self.x, self.in_place, self.sum = (
            comm,
            np.ones(n, np.float32),
            MPI.IN_PLACE,
            MPI.SUM,
        )
        for _ in range(warmup):
            self.call()
        one = self.time(1)
        self.k = comm.bcast(max(1, min(10000, round(TARGET_SECONDS / max(one, 1e-7)))), root=0)

    def call(self) -> None:
        self.comm.Allreduce(self.in_place, self.x, op=self.sum)

    def time(self, k: int | None = None) -> float:
        """Seconds per call over ``k`` calls after a barrier: the slowest rank's, on all."""
        from mpi4py import MPI

        k = k or self.k
        self.comm.Barrier()
        start = time.perf_counter()
        for _ in range(k):
            self.call()
        return self.comm.allreduce((time.perf_counter() - start) / k, op=MPI.MAX)


def sizes_to_measure(max_power: int, named: dict[str, int]) -> list[tuple[int, str]]:
    sizes = [(4**k, "") for k in range(max_power + 1)]
    sizes += [(n, f"{name} parameters") for name, n in named.items()]
    return sorted(sizes)


def render_table(rows: list[dict[str, Any]], alpha: float, beta: float) -> str:
    lines = [
        "| floats | bytes | median µs | min-max µs | GB/s | model µs | what |",
        "|---:|---:|---:|---:|---:|---:|---|",
    ]
    for r in rows:
        model = alpha + r["bytes"] / beta
        lines.append(
            f"| {r['n']:,} | {r['bytes']:,} | {r['seconds'] * 1e6:,.1f} | "
            f"{r['min'] * 1e6:,.1f}-{r['max'] * 1e6:,.1f} | {r['bytes'] / r['seconds'] / 1e9:.2f} "
            f"| {model * 1e6:,.1f} | {r['label']} |"
        )
    return "\n".join(lines)


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="mpiexec -n 2 python -m benchmarks.mpi_allreduce",
        description="Time in-place float32 Allreduce over message sizes; fit alpha + bytes/beta.",
    )
    p.add_argument("--repeats", type=int, default=15, help="rounds over all sizes (default 15)")
    p.add_argument("--max-power", type=int, default=12, help="largest size 4^K (default 12)")
    p.add_argument("--quick", action="store_true", help="5 rounds, up to 4^9; writes nothing")
    p.add_argument("--output", type=Path, default=DEFAULT_OUTPUT, help=f"default {DEFAULT_OUTPUT}")
    p.add_argument("--no-write", action="store_true", help="print only")
    args = p.parse_args(argv)
    if args.quick:
        args.repeats, args.max_power, args.no_write = 5, min(args.max_power, 9), True
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        from mpi4py import MPI
    except ImportError:
        print("mpi4py is missing: pip install -e '.[mpi]'", file=sys.stderr)
        return 2
    comm = MPI.COMM_WORLD
    root = comm.rank == 0
    named = param_counts()
    if root:
        print(f"Allreduce on {comm.size} ranks; {MPI.Get_library_version().splitlines()[0]}")
    sizes = sizes_to_measure(args.max_power, named)
    timers = [Timer(comm, n) for n, _ in sizes]
    times: list[list[float]] = [[] for _ in sizes]
    for rep in range(args.repeats):  # rounds over all sizes: a burst of load hits them alike
        for i, timer in enumerate(timers):
            times[i].append(timer.time())
        if root:
            print(f"  round {rep + 1}/{args.repeats}", end="\r", flush=True)
    del timers
    if root:
        print()
    rows = [
        {
            "n": n,
            "bytes": 4 * n,
            "seconds": float(np.median(t)),
            "min": min(t),
            "max": max(t),
            "label": label,
        }
        for (n, label), t in zip(sizes, times, strict=True)
    ]
    if not root:
        return 0
    alpha, beta = fit_alpha_beta([r["bytes"] for r in rows], [r["seconds"] for r in rows])
    print()
    print(render_table(rows, alpha, beta))
    fit = f"alpha {alpha * 1e6:.1f} µs, beta {beta / 1e9:.2f} GB/s"
    print(f"\nalpha-beta fit ({comm.size} ranks): {fit}")
    for name, n in named.items():
        r = next(r for r in rows if r["n"] == n)
        print(f"{name}: {n:,} floats ({4 * n / 1e6:.2f} MB): {r['seconds'] * 1e6:.0f} µs")
    if args.no_write:
        return 0
    command = "mpiexec -n {} python -m benchmarks.mpi_allreduce {}".format(
        comm.size, " ".join(argv if argv is not None else sys.argv[1:])
    ).strip()
    payload = {
        "command": command,
        "measured_at": now_iso(),
        "ranks": comm.size,
        "library": MPI.Get_library_version().strip(),
        "machine": machine_description(1, None),
        "repeats": args.repeats,
        "param_counts": named,
        "fit": {
            "alpha_s": alpha,
            "beta_bytes_per_s": beta,
            "model": "seconds = alpha + bytes / beta; least squares on relative residuals",
        },
        "sizes": rows,
    }
    args.output.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(args.output, json.dumps(payload, indent=1) + "\n")
    print(f"written: {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
