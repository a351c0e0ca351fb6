"""Benchmark scripts: each one command, each writing JSON + a Markdown table to ``benchmarks/results/``.

Run everything with ``python -m benchmarks.run_all`` (``make bench``); run one with
``python -m benchmarks.<script>`` (add ``--quick`` for a smoke test).
"""
