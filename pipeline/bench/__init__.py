"""Benchmarks that anyone can rerun: `python -m pipeline.bench all` (see __main__.py).

Every figure is a ratio against a baseline measured in the same run, or a fraction of a ceiling
measured in the same run, taken as the median of several repeats: on a shared machine absolute
numbers move with the load, ratios much less.
"""
