"""Benchmarks: each measure next to a floor measured in the same run (see README, Performance)."""
