"""The benchmark scripts import each other as top-level modules (`import protocol`), as they do when run from the
command line: put their folder on the path, and forget them after each test."""

from __future__ import annotations

import importlib
import sys
from pathlib import Path

import pytest

BENCHMARKS = Path(__file__).resolve().parents[1]
SCRIPTS = ("protocol", "ablation", "high_sparsity", "tune", "zeroshot", "quality", "vision", "memory", "speed",
           "preset_time", "kl_rows", "vision_gpu", "chat", "structured", "sparsity_buys")


@pytest.fixture
def bench(monkeypatch):
    """`bench("tune")` imports benchmarks/tune.py (and its `protocol`) fresh."""
    monkeypatch.syspath_prepend(str(BENCHMARKS))
    yield importlib.import_module
    for name in SCRIPTS:
        sys.modules.pop(name, None)
