"""The benchmark scripts import each other as top-level modules (`import protocol`), as they do when run from the
command line: put their folder on the path, and forget them after each test."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

BENCHMARKS = Path(__file__).resolve().parents[1]
SCRIPTS = ("protocol", "ablation", "high_sparsity", "tune", "zeroshot", "quality", "vision", "memory", "speed",
           "preset_time", "kl_rows", "vision_gpu")


@pytest.fixture
def bench(monkeypatch):
    """`bench("tune")` imports benchmarks/tune.py (and its `protocol`) fresh."""
    monkeypatch.syspath_prepend(str(BENCHMARKS))
    loaded = []

    def load(name: str):
        __import__(name)
        loaded.append(name)
        return sys.modules[name]

    yield load
    for name in SCRIPTS:
        sys.modules.pop(name, None)
