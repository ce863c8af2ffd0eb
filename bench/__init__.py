"""Benchmarks on the real local stack; each prints a table and writes JSON to bench/results/."""
