"""Benchmark suite: synthetic images (bench.synth), measurements and report (bench.run).

Run ``python -m bench.run [--large]``; see bench/README.md and docs/benchmarks.md.
"""
