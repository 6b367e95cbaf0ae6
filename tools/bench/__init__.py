"""Benchmarks, each run as `python tools/bench/NAME.py`, results in BENCHMARKS.md.

Each script takes --smoke (its own code at a toy size, in seconds, writing no results file) and
names in RESULT_LINE the regex of the line that carries its result; tests/e2e/test_bench_smoke.py
runs every script here that way.
"""
