"""Benchmarks (`make bench`): ours against the reference, same data, same invocation, JSON out."""
