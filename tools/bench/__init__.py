"""Benchmarks, each run as `python tools/bench/NAME.py`; each takes --smoke for a tiny run of the same code."""
