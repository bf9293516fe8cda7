"""``python -m benchmarks``: run the cases, print one table, write benchmarks/RESULTS.md."""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
import traceback
from collections.abc import Sequence
from pathlib import Path

from benchmarks.cases import (
    CASES,
    NATIVE_EPOCH_FLOOR,
    TARGET_LABELS,
    TARGETS,
    TORCH_CASES,
    Context,
)
from benchmarks.common import (
    REPO_ROOT,
    CaseResult,
    Row,
    atomic_write_text,
    machine_description,
    now_iso,
    numpy_blas_threads,
    results_table,
)
from benchmarks.data import default_data_dir
from benchmarks.kernels import (
    KERNELS,
    blas_corename,
    kernel_env,
    render_kernels,
    strip_kernel_args,
)

DEFAULT_OUTPUT = REPO_ROOT / "benchmarks" / "RESULTS.md"


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m benchmarks",
        description="handprop side by side with the GEMM floor, PyTorch-CPU and scikit-learn.",
    )
    p.add_argument(
        "--only",
        default=",".join(CASES),
        help=f"comma-separated cases to run, of: {', '.join(CASES)} (default: all)",
    )
    p.add_argument("--repeats", type=int, default=None, help="timed repetitions per case")
    p.add_argument(
        "--seeds",
        type=int,
        default=None,
        help="seeds per run of a case that trains over seeds: the baseline case also "
        "compares test accuracy over this many seeds when > 1 (each its own split and "
        "init; about 140 s per extra seed; default 1); time_to_99 trains the fast99 recipe "
        "this many times on each side (default 5, 1 with --quick)",
    )
    p.add_argument(
        "--quick",
        action="store_true",
        help="small fast variant (fewer repeats, 10000-sample mini-batch epoch, "
        "50-epoch baseline and RSS runs, one fast99 seed on 10000 images); writes no "
        "RESULTS.md unless --output is given",
    )
    p.add_argument(
        "--data-dir",
        type=Path,
        default=None,
        help="MNIST folder (default: $HANDPROP_DATA, else ../shared/data/mnist)",
    )
    p.add_argument(
        "--threads",
        type=int,
        default=None,
        help="BLAS and PyTorch threads (default: NumPy's BLAS default, PyTorch pinned to it)",
    )
    p.add_argument("--output", type=Path, default=None, help=f"default: {DEFAULT_OUTPUT}")
    p.add_argument("--no-write", action="store_true", help="print only; write no files")
    p.add_argument(
        "--kernel",
        choices=("both", *KERNELS),
        default="both",
        help="BLAS kernel(s) to measure under: 'native' runs a subprocess with "
        "OPENBLAS_CORETYPE and OPENBLAS_L2_SIZE unset, 'environment' one with them as the "
        "environment has them (Haswell forced when it sets neither); default both",
    )
    p.add_argument("--child-json", type=Path, default=None, help=argparse.SUPPRESS)
    p.add_argument(
        "--merge",
        action="store_true",
        help="keep the previous results of cases not run now (from RESULTS.json)",
    )
    args = p.parse_args(argv)
    names = [s.strip() for s in args.only.split(",") if s.strip()]
    unknown = [s for s in names if s not in CASES]
    if unknown or not names:
        p.error(
            f"--only: unknown case(s) {', '.join(unknown) or '(none)'}; known: {', '.join(CASES)}"
        )
    args.cases = [name for name in CASES if name in names]
    if args.repeats is not None and args.repeats < 1:
        p.error(f"--repeats must be >= 1, got {args.repeats}")
    if args.seeds is not None and args.seeds < 1:
        p.error(f"--seeds must be >= 1, got {args.seeds}")
    if args.threads is not None and args.threads < 1:
        p.error(f"--threads must be >= 1, got {args.threads}")
    return args


def setup_threads(ctx: Context, threads: int | None, need_torch: bool) -> object | None:
    """Pin BLAS, handprop (and PyTorch, when used) to the same thread count.

    Returns the threadpoolctl limiter, which must stay alive for the limit to hold.
    """
    limiter = None
    if threads is not None:
        from handprop.nn import set_threads

        set_threads(threads)  # handprop's own threads (batch shards, elementwise passes)
        try:
            from threadpoolctl import threadpool_limits

            limiter = threadpool_limits(limits=threads)
        except ImportError:
            print("threadpoolctl missing: --threads not applied to BLAS", file=sys.stderr)
    ctx.threads = numpy_blas_threads() if threads is None else threads
    if need_torch:
        from benchmarks.torch_ref import import_torch

        ctx.torch, ctx.torch_why = import_torch()
        if ctx.torch is None:
            print(f"note: {ctx.torch_why}; the PyTorch columns are skipped", file=sys.stderr)
        else:
            n = ctx.threads or os.cpu_count() or 1
            ctx.torch.set_num_threads(n)
            if threads is not None:  # torch's own BLAS/OpenMP pools, loaded just now
                from threadpoolctl import threadpool_limits

                limiter = threadpool_limits(limits=threads)
    return limiter


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    if args.child_json is None:
        return run_kernels(args, list(argv if argv is not None else sys.argv[1:]))
    return run_here(args, argv)


def run_kernels(args: argparse.Namespace, argv: list[str]) -> int:
    """Run the cases in one subprocess per BLAS kernel, then print and write both."""
    import subprocess
    import tempfile

    kernels = list(KERNELS) if args.kernel == "both" else [args.kernel]
    child_args = strip_kernel_args(argv)
    runs: dict[str, dict] = {}
    failed = False
    with tempfile.TemporaryDirectory(prefix="handprop-bench-") as tmp:
        for kernel in kernels:
            env, described = kernel_env(kernel)
            out = Path(tmp) / f"{kernel}.json"
            cmd = [sys.executable, "-m", "benchmarks", *child_args, "--kernel", kernel]
            cmd += ["--child-json", str(out)]
            print(f"== kernel {kernel}: {described}", flush=True)
            rc = subprocess.call(cmd, env=env, cwd=REPO_ROOT)
            failed = failed or rc != 0
            if out.is_file():
                runs[kernel] = json.loads(out.read_text(encoding="utf-8"))
                runs[kernel]["env"] = described
            else:
                print(f"kernel {kernel}: the subprocess wrote no results (rc {rc})")
    command = ("python -m benchmarks " + " ".join(argv)).strip()
    output = args.output or (None if args.quick else DEFAULT_OUTPUT)
    if output is not None and not args.no_write and args.merge:
        previous = output.with_suffix(".json")
        old = json.loads(previous.read_text(encoding="utf-8")) if previous.is_file() else {}
        for kernel, run in (old.get("kernels") or {}).items():
            if kernel not in runs:
                runs[kernel] = run
                continue
            ran = {c["name"] for c in runs[kernel]["cases"]}
            kept = [c for c in run.get("cases", []) if c["name"] not in ran]
            merged = kept + runs[kernel]["cases"]
            runs[kernel]["cases"] = sorted(merged, key=lambda c: list(CASES).index(c["name"]))
    report = render_kernels(runs, command, args.quick, TARGET_LABELS, TARGETS)
    print()
    print(report)
    if output is not None and not args.no_write:
        output.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_text(output, report)
        payload = {"command": command, "kernels": runs}
        atomic_write_text(output.with_suffix(".json"), json.dumps(payload, indent=1) + "\n")
        print(f"written: {output} and {output.with_suffix('.json').name}")
    elif args.quick and not args.no_write:
        print("quick mode: RESULTS.md not written (pass --output PATH to write)")
    return 1 if failed or not runs else 0


def run_here(args: argparse.Namespace, argv: Sequence[str] | None) -> int:
    """Run the cases in this process (one kernel) and write them to ``--child-json``."""
    if args.kernel == "native":
        TARGETS["epoch_floor"] = NATIVE_EPOCH_FLOOR
    data_dir = args.data_dir or default_data_dir()
    ctx = Context(data_dir=data_dir, quick=args.quick, repeats=args.repeats, seeds=args.seeds)
    limiter = setup_threads(ctx, args.threads, bool(TORCH_CASES & set(args.cases)))
    torch_threads = ctx.torch.get_num_threads() if ctx.torch is not None else None
    print(
        f"benchmarks: {', '.join(args.cases)}{' (quick)' if args.quick else ''}; "
        f"data {data_dir}; threads BLAS {ctx.threads}, torch {torch_threads or 'n/a'}",
        flush=True,
    )

    results: list[CaseResult] = []
    failed = False
    for name in args.cases:
        print(f"[{name}] running ...", flush=True)
        start = time.perf_counter()
        try:
            result = CASES[name](ctx)
        except Exception as exc:
            failed = True
            traceback.print_exc()
            result = CaseResult(name, [Row.skipped(name, f"error {type(exc).__name__}: {exc}")])
        result.seconds = time.perf_counter() - start
        result.measured_at = now_iso()
        results.append(result)
        print(results_table(result.rows).split("\n", 2)[2], flush=True)

    mnist = ctx.loaded_mnist()
    data = f"MNIST from {mnist.source}" if mnist is not None else f"MNIST dir {data_dir}"
    payload = {
        "kernel": args.kernel,
        "corename": blas_corename(),
        "machine": machine_description(ctx.threads, torch_threads, data),
        "cases": [r.to_json() for r in results],
    }
    atomic_write_text(args.child_json, json.dumps(payload, indent=1) + "\n")
    del limiter
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
