"""handprop's benchmark harness (issue 6): ``python -m benchmarks`` from the repo root.

Measures handprop through its public API side by side with the GEMM floor, PyTorch-CPU
and scikit-learn, prints one table of ratios and writes ``benchmarks/RESULTS.md``.
PyTorch and scikit-learn are benchmark-only dependencies; handprop never imports them.
"""
