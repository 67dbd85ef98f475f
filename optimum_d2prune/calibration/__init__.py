"""Calibration: data, hooks, statistics."""
