"""The benchmark: `scripts/bench` (or `python -m benchmarks`). Not part of the tests.

Every figure is compared with a baseline measured in the same run on the same
machine (the ceiling of a raw client, the naive relay, the plain transaction), so
the ratios stay meaningful on shared, noisy machines.
"""
