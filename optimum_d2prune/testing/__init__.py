"""Helpers for tests and benchmarks (trained fixtures on small real datasets)."""
