"""Benchmarks: each ``bench_*.py`` module has ``run() -> dict`` printing and returning its figures."""
