"""The benchmark scripts, a package so that each runs as ``python -m benchmarks.<script>`` from the repository root.

Their shared helpers (environment record, quiet Trainer, timing, memory, result files) live in
:mod:`benchmarks.harness`.
"""
