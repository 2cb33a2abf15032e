"""Runnable benchmarks: python -m benchmarks.NAME; figures go to docs/performance.md."""
