"""Strong scaling of data-parallel training, projected from measurements (issue 14).

    mpiexec -n 2 python -m benchmarks.mpi_allreduce   # first: Allreduce here -> alpha, beta
    python -m benchmarks.scaling                      # ~1 min: compute per shard, projection
    python -m benchmarks.scaling --reuse              # re-project from SCALING.json's timings
    python -m benchmarks.scaling --reuse --measured seed:1=0.12 --measured seed:2=0.065

One data-parallel step on p ranks is modelled as

    step(p) = pass(ceil(B / p) rows) + update + Allreduce(p, 4 * n_params bytes)

- ``pass(b)``: one ``net.train_pass`` over b rows, measured here at every shard size the
  projection uses (one thread: ``threadpool_limits(1)``, ``handprop.nn.set_threads(1)``),
  so the per-row overhead of small shards is measured, not assumed away;
- ``update``: one optimizer step on the whole flat vector, which every rank repeats;
- ``Allreduce``: ring, ``2 (p-1) alpha + 2 (p-1)/p bytes / bandwidth``, with alpha and
  bandwidth per link: shared memory fitted here (benchmarks/MPI_ALLREDUCE.json) and
  10/25/100 Gb/s networks with a stated latency (LINKS).

An epoch is ``steps * step(p)``; efficiency is ``epoch(1) / (p * epoch(p))``. Writes
``benchmarks/SCALING.json``, the figure ``docs/images/scaling.png`` and the generated
table block of ``docs/scaling.md``. ``--measured CASE:P=SECONDS`` adds epoch times
measured with ``mpiexec -n P handprop train ...`` to the table and the plot.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from benchmarks.common import REPO_ROOT, atomic_write_text, machine_description, median, now_iso
from benchmarks.mpi_allreduce import DEFAULT_OUTPUT as ALLREDUCE_JSON
from benchmarks.mpi_allreduce import SEED_SPEC, cnn_layers, param_counts

OUTPUT = REPO_ROOT / "benchmarks" / "SCALING.json"
FIGURE = REPO_ROOT / "docs" / "images" / "scaling.png"
DOC = REPO_ROOT / "docs" / "scaling.md"
DOC_BEGIN, DOC_END = "<!-- scaling tables: begin -->", "<!-- scaling tables: end -->"
#: the ranks of the table, and of the plot
RANKS = (1, 2, 8, 64, 512)
PLOT_RANKS = tuple(2**k for k in range(10))
HEADLINE = "Fewest ranks (powers of 2) where Allreduce > compute per step / efficiency < 50%"
#: seconds of calls per timed repetition of a training pass
TARGET_SECONDS = 0.1


@dataclass(frozen=True)
class Case:
    """An epoch of ``samples`` rows in steps of ``batch`` (None: one full-batch step)."""

    name: str
    label: str
    net: str  # "mlp" (784-100-10 sigmoid, GD) or "cnn" (experiments/cnn.toml, Adam)
    samples: int
    batch: int | None = None

    @property
    def global_batch(self) -> int:
        return self.batch or self.samples

    @property
    def steps(self) -> int:
        return math.ceil(self.samples / self.global_batch)

    def rows(self, p: int) -> int:
        """Rows of the largest shard on p ranks (the slowest rank sets the pace)."""
        return math.ceil(self.global_batch / p)


CASES = (
    Case("seed", "seed epoch: 784-100-10, 18000 rows, full batch", "mlp", 18000),
    Case("mnist", "MNIST full batch: 784-100-10, 60000 rows", "mlp", 60000),
    Case("cnn128", "CNN, global batch 128 (469 steps)", "cnn", 60000, 128),
    Case("cnn1024", "CNN, global batch 1024 (59 steps)", "cnn", 60000, 1024),
)


@dataclass(frozen=True)
class Link:
    """Ring Allreduce over a link of per-message latency ``alpha`` (s) and ``bandwidth``
    (bytes/s); ``max_ranks`` bounds the ranks it is plotted and tabled for."""

    name: str
    label: str
    alpha: float
    bandwidth: float
    max_ranks: int = 512

    def allreduce(self, p: int, nbytes: int, algorithm: str = "ring") -> float:
        """Seconds of one Allreduce of ``nbytes`` on p ranks: "ring" (2 (p-1) messages in
        turn), or "halving" (Rabenseifner's recursive halving then doubling: 2 log2 p
        messages, the same bytes), which MPI libraries pick for short vectors."""
        if p == 1:
            return 0.0
        messages = 2 * (p - 1) if algorithm == "ring" else 2 * math.ceil(math.log2(p))
        return messages * self.alpha + 2 * (p - 1) / p * nbytes / self.bandwidth


#: networks, one rank per host: line rate (no protocol overhead), MPI's small-message
#: latency over TCP for Ethernet and over RDMA (verbs) for InfiniBand
NETWORK_LINKS = (
    Link("10G", "10 Gb/s Ethernet (TCP), 25 µs", 25e-6, 10e9 / 8),
    Link("25G", "25 Gb/s Ethernet (TCP), 25 µs", 25e-6, 25e9 / 8),
    Link("100G", "100 Gb/s InfiniBand (RDMA), 5 µs", 5e-6, 100e9 / 8),
)


def links(allreduce: dict[str, Any]) -> list[Link]:
    """The shared-memory link fitted here, then NETWORK_LINKS.

    The fit is of the 2-rank call, ``alpha + bytes / beta``; ring at p = 2 is
    ``2 a + bytes / b``, so a = alpha / 2 and b = beta reproduce it exactly."""
    alpha, beta = allreduce["fit"]["alpha_s"], allreduce["fit"]["beta_bytes_per_s"]
    label = f"shared memory here (fit at p=2: {alpha * 1e6:.1f} µs, {beta / 1e9:.1f} GB/s)"
    return [Link("shm", label, alpha / 2, beta, max_ranks=64), *NETWORK_LINKS]


# -- measuring ------------------------------------------------------------------------


def build(net: str) -> tuple[Any, Any, tuple[int, ...]]:
    """(network, optimizer, input shape) of a case's net, as the configs train it."""
    from handprop.nn import GD, Adam, Network

    if net == "mlp":
        return Network.from_spec(SEED_SPEC, activation="sigmoid", rng=0), GD(2.5), (784,)
    model = Network.from_layers(cnn_layers(), (1, 28, 28), 10, init="he_normal", rng=0)
    return model, Adam(1e-3), (1, 28, 28)


def per_call(fn: Any, repeats: int) -> float:
    """Median seconds per call of ``fn`` over ``repeats`` runs of ~TARGET_SECONDS."""
    fn()
    start = time.perf_counter()
    fn()
    k = max(1, round(TARGET_SECONDS / (time.perf_counter() - start)))
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        for _ in range(k):
            fn()
        times.append((time.perf_counter() - start) / k)
    return median(times)


def measure_net(kind: str, sizes: Sequence[int], repeats: int) -> dict[str, Any]:
    """Seconds of one training pass of ``kind``'s net over each number of rows in
    ``sizes``, and of one optimizer step; seeded random data of MNIST's shape."""
    net, opt, shape = build(kind)
    rng = np.random.default_rng(0)
    X = rng.random((max(sizes), *shape), dtype=np.float32)
    y = rng.integers(0, 10, max(sizes))
    passes = {}
    for b in sorted(sizes, reverse=True):
        passes[b] = per_call(lambda b=b: net.train_pass(X[:b], y[:b]), repeats)
        print(f"  {kind} pass of {b:>6} rows: {passes[b] * 1e3:9.3f} ms", flush=True)
    update = per_call(lambda: opt.step(net.params, net.grads), repeats)
    print(f"  {kind} optimizer step: {update * 1e3:.3f} ms", flush=True)
    return {"pass_s": dict(sorted(passes.items())), "update_s": update}


def measure_compute(repeats: int = 5, ranks: Sequence[int] = PLOT_RANKS) -> dict[str, Any]:
    """``measure_net`` for both nets at every shard size the cases need on ``ranks``,
    on one thread (BLAS and handprop's own)."""
    from threadpoolctl import threadpool_limits

    from handprop.nn import get_threads, set_threads

    threads = get_threads()
    out: dict[str, Any] = {}
    with threadpool_limits(1):
        set_threads(1)
        try:
            for kind in ("mlp", "cnn"):
                sizes = {c.rows(p) for c in CASES if c.net == kind for p in ranks}
                out[kind] = measure_net(kind, sorted(sizes), repeats)
        finally:
            set_threads(threads)
    return out


# -- the model ------------------------------------------------------------------------


def project(
    compute: dict[str, Any],
    allreduce: dict[str, Any],
    ranks: Sequence[int] = RANKS,
    algorithm: str = "ring",
) -> list[dict[str, Any]]:
    """One row per (case, p): shard rows, compute and update per step, and per link the
    Allreduce per step, the epoch time and the efficiency."""
    counts = allreduce["param_counts"]
    rows = []
    for case in CASES:
        c = compute[case.net]
        t1 = case.steps * (c["pass_s"][case.rows(1)] + c["update_s"])
        for p in ranks:
            compute_s = c["pass_s"][case.rows(p)] + c["update_s"]
            row: dict[str, Any] = {
                "case": case.name,
                "p": p,
                "rows": case.rows(p),
                "compute_step_s": compute_s,
                "compute_epoch_s": case.steps * compute_s,
                "no_comm_efficiency": t1 / (p * case.steps * compute_s),
                "links": {},
            }
            for link in links(allreduce):
                if p > link.max_ranks:
                    continue
                comm = link.allreduce(p, 4 * counts[case.net], algorithm)
                epoch = case.steps * (compute_s + comm)
                row["links"][link.name] = {
                    "allreduce_s": comm,
                    "epoch_s": epoch,
                    "efficiency": t1 / (p * epoch),
                }
            rows.append(row)
    return rows


def per_sample(compute: dict[str, Any]) -> dict[str, float]:
    """Seconds per sample of one pass + step: the seed epoch, the CNN at batch 128."""
    mlp, cnn = compute["mlp"], compute["cnn"]
    return {
        "seed": (mlp["pass_s"][18000] + mlp["update_s"]) / 18000,
        "cnn128": (cnn["pass_s"][128] + cnn["update_s"]) / 128,
    }


def first_below(rows: list[dict[str, Any]], case: str, link: str, what: str) -> int | None:
    """The fewest ranks (of the rows given) at which ``what`` happens, else None:
    "half" = efficiency under 50%, "comm" = Allreduce longer than the compute per step."""
    for r in rows:
        if r["case"] != case or link not in r["links"]:
            continue
        at = r["links"][link]
        if (what == "half" and at["efficiency"] < 0.5) or (
            what == "comm" and at["allreduce_s"] > r["compute_step_s"]
        ):
            return r["p"]
    return None


def parse_measured(items: Sequence[str]) -> dict[str, dict[int, float]]:
    """``["seed:2=0.065", ...]`` -> ``{"seed": {2: 0.065}}``."""
    out: dict[str, dict[int, float]] = {}
    names = {c.name for c in CASES}
    for item in items:
        try:
            case, rest = item.split(":", 1)
            p, seconds = rest.split("=", 1)
            if case not in names:
                raise ValueError(f"unknown case {case!r}; known: {', '.join(sorted(names))}")
            out.setdefault(case, {})[int(p)] = float(seconds)
        except ValueError as exc:
            raise SystemExit(f"--measured {item!r}: expected CASE:P=SECONDS ({exc})") from None
    return out


# -- output ---------------------------------------------------------------------------


def fmt_s(seconds: float) -> str:
    if seconds >= 1:
        return f"{seconds:.2f} s"
    if seconds >= 1e-3:
        return f"{seconds * 1e3:.1f} ms"
    return f"{seconds * 1e6:.0f} µs"


def tables(
    rows: list[dict[str, Any]],
    allreduce: dict[str, Any],
    measured: dict[str, dict[int, float]],
) -> str:
    """The markdown block of docs/scaling.md: one table per case, then the headline."""
    link_list = links(allreduce)
    out = []
    for case in CASES:
        head = ["p", "rows/rank", "compute/step", "no comm"]
        head += [f"{link.name}: epoch (eff.)" for link in link_list]
        if case.name in measured:
            head.append("measured epoch")
        out += [f"**{case.label}**", "", "| " + " | ".join(head) + " |"]
        out.append("|" + "|".join("---:" for _ in head) + "|")
        for r in (r for r in rows if r["case"] == case.name):
            cells = [
                str(r["p"]),
                str(r["rows"]),
                fmt_s(r["compute_step_s"]),
                f"{r['no_comm_efficiency']:.0%}",
            ]
            for link in link_list:
                at = r["links"].get(link.name)
                cells.append(f"{fmt_s(at['epoch_s'])} ({at['efficiency']:.0%})" if at else "-")
            if case.name in measured:
                m = measured[case.name].get(r["p"])
                cells.append(fmt_s(m) if m is not None else "-")
            out.append("| " + " | ".join(cells) + " |")
        out.append("")
    counts = allreduce["param_counts"]
    allreduce_lines = [
        f"- {kind} ({n:,} floats), p = 2 / 8 / 64 / 512: "
        + "; ".join(
            f"{link.name} "
            + " / ".join(
                fmt_s(link.allreduce(p, 4 * n)) if p <= link.max_ranks else "-" for p in RANKS[1:]
            )
            for link in link_list
        )
        for kind, n in counts.items()
    ]
    out += [
        "Ring Allreduce per step:",
        "",
        *allreduce_lines,
        "",
        "Links: " + "; ".join(f"`{link.name}` {link.label}" for link in link_list) + ".",
    ]
    return "\n".join(out)


def headline(dense: list[dict[str, Any]], allreduce: dict[str, Any]) -> str:
    """Per case and link: the fewest ranks (powers of 2) where the Allreduce outlasts the
    compute per step, and where efficiency falls under 50%."""
    lines = [
        "| case | " + " | ".join(link.name for link in links(allreduce)) + " |",
        "|---|" + "---|" * len(links(allreduce)),
    ]
    for case in CASES:
        cells = []
        for link in links(allreduce):
            comm, half = (first_below(dense, case.name, link.name, w) for w in ("comm", "half"))
            cells.append(
                f"{comm or '>' + str(link.max_ranks)} / {half or '>' + str(link.max_ranks)}"
            )
        lines.append(f"| {case.name} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def plot(
    dense: list[dict[str, Any]],
    allreduce: dict[str, Any],
    measured: dict[str, dict[int, float]],
    path: Path = FIGURE,
) -> Path:
    """Efficiency vs ranks, one panel per case, a line per link; written to ``path``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    top = max(r["no_comm_efficiency"] for r in dense)  # above 1 where small shards run faster
    fig, axes = plt.subplots(2, 2, figsize=(10, 7.5), sharex=True, sharey=True)
    colors = dict(zip(("shm", "10G", "25G", "100G"), ("C2", "C3", "C1", "C0"), strict=True))
    for ax, case in zip(axes.flat, CASES, strict=True):
        rows = [r for r in dense if r["case"] == case.name]
        ps = [r["p"] for r in rows]
        ax.plot(ps, [r["no_comm_efficiency"] for r in rows], "k--", lw=1, label="no communication")
        for link in links(allreduce):
            pts = [
                (r["p"], r["links"][link.name]["efficiency"])
                for r in rows
                if link.name in r["links"]
            ]
            ax.plot(
                *zip(*pts, strict=True), "o-", ms=3, color=colors.get(link.name), label=link.label
            )
        t1 = rows[0]["compute_epoch_s"]
        for p, seconds in sorted(measured.get(case.name, {}).items()):
            base = measured[case.name].get(1, t1)
            ax.plot(p, base / (p * seconds), "kx", ms=9, mew=2)
        ax.axhline(0.5, color="0.6", lw=0.8)
        ax.set_xscale("log", base=2)
        ax.set_ylim(0, max(1.05, min(2.0, top + 0.05)))
        ax.set_title(case.label, fontsize=10)
        ax.grid(alpha=0.3)
    for ax in axes[1]:
        ax.set_xlabel("ranks p")
    for ax in axes[:, 0]:
        ax.set_ylabel("parallel efficiency  T(1) / (p T(p))")
    handles, labels = axes[0, 0].get_legend_handles_labels()
    if any(measured.values()):
        handles.append(plt.Line2D([], [], color="k", marker="x", ls="", mew=2))
        labels.append("measured (mpiexec)")
    fig.legend(handles, labels, loc="lower center", ncol=3, fontsize=8, frameon=False)
    fig.suptitle("Data-parallel strong scaling, projected (ring Allreduce, 1 thread per rank)")
    fig.tight_layout(rect=(0, 0.08, 1, 0.97))
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def write_doc_block(block: str, path: Path = DOC) -> bool:
    """Replace the generated block of docs/scaling.md; False when its markers are absent."""
    if not path.is_file():
        return False
    text = path.read_text(encoding="utf-8")
    if DOC_BEGIN not in text or DOC_END not in text:
        return False
    head, rest = text.split(DOC_BEGIN, 1)
    tail = rest.split(DOC_END, 1)[1]
    atomic_write_text(path, f"{head}{DOC_BEGIN}\n{block}\n{DOC_END}{tail}")
    return True


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m benchmarks.scaling",
        description="Project data-parallel epoch time and efficiency from measured compute "
        "and an alpha-beta Allreduce model.",
    )
    p.add_argument("--allreduce", type=Path, default=ALLREDUCE_JSON, help="mpi_allreduce's JSON")
    p.add_argument("--reuse", action="store_true", help=f"take compute timings from {OUTPUT}")
    p.add_argument("--repeats", type=int, default=5, help="timed repetitions per shard size")
    p.add_argument(
        "--measured",
        action="append",
        default=[],
        metavar="CASE:P=SECONDS",
        help="a measured epoch time (repeatable), e.g. seed:2=0.065; cases: "
        + ", ".join(c.name for c in CASES),
    )
    p.add_argument("--no-write", action="store_true", help="print only")
    return p.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    if not args.allreduce.is_file():
        print(
            f"{args.allreduce} is missing: run `mpiexec -n 2 python -m benchmarks.mpi_allreduce`",
            file=sys.stderr,
        )
        return 2
    allreduce = json.loads(args.allreduce.read_text(encoding="utf-8"))
    if allreduce["param_counts"] != param_counts():
        print("note: parameter counts changed since the Allreduce run; re-run it", file=sys.stderr)
    measured = parse_measured(args.measured)
    previous = json.loads(OUTPUT.read_text(encoding="utf-8")) if OUTPUT.is_file() else {}
    if args.reuse:
        if "compute" not in previous:
            print(f"--reuse: no compute timings in {OUTPUT}", file=sys.stderr)
            return 2
        compute = previous["compute"]
        for kind in compute.values():  # JSON keys are strings
            kind["pass_s"] = {int(k): v for k, v in kind["pass_s"].items()}
        for case, at in previous.get("measured", {}).items():
            for p, seconds in at.items():
                measured.setdefault(case, {}).setdefault(int(p), seconds)
    else:
        print("measuring one training pass per shard size (1 thread) ...", flush=True)
        compute = measure_compute(args.repeats)
    rows = project(compute, allreduce, RANKS)
    dense = project(compute, allreduce, PLOT_RANKS)
    block = tables(rows, allreduce, measured)
    head = headline(dense, allreduce)
    head_log = headline(project(compute, allreduce, PLOT_RANKS, "halving"), allreduce)
    samples = per_sample(compute)
    print()
    print(block)
    print(f"\n{HEADLINE}, ring:\n{head}")
    print(f"\nthe same, Rabenseifner's halving (2 log2 p messages):\n{head_log}")
    print(
        f"\ncompute per sample (pass + step, 1 thread): seed epoch {samples['seed'] * 1e6:.2f} µs,"
        f" CNN batch 128 {samples['cnn128'] * 1e6:.0f} µs"
    )
    if args.no_write:
        return 0
    command = ("python -m benchmarks.scaling " + " ".join(argv or sys.argv[1:])).strip()
    payload = {
        "command": command if not args.reuse else previous.get("command", command),
        "projected_by": command,
        "measured_at": previous.get("measured_at") if args.reuse else now_iso(),
        "machine": previous.get("machine") if args.reuse else machine_description(1, None),
        "allreduce": {"file": str(args.allreduce), **allreduce["fit"]},
        "param_counts": allreduce["param_counts"],
        "compute": compute,
        "per_sample_s": samples,
        "measured": measured,
        "projection": rows,
    }
    atomic_write_text(OUTPUT, json.dumps(payload, indent=1) + "\n")
    print(f"\nwritten: {OUTPUT}, {plot(dense, allreduce, measured)}")
    full = (
        f"{block}\n\n{HEADLINE}, ring Allreduce:\n\n{head}\n\n"
        f"The same with Rabenseifner's algorithm (2 log2 p messages, same bytes):\n\n{head_log}"
    )
    if write_doc_block(full):
        print(f"updated the tables in {DOC}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
