"""Benchmark programs: they print and save figures; they are not timed tests."""
