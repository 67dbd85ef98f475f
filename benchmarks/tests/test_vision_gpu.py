"""benchmarks/vision_gpu.py runs end to end on a tiny timm ViT on the CPU (the GPU benchmark's plumbing)."""

from __future__ import annotations

import importlib.util
from pathlib import Path


def test_gpu_benchmark_script_runs_tiny_on_cpu(capsys):
    path = Path(__file__).resolve().parents[1] / "vision_gpu.py"
    spec = importlib.util.spec_from_file_location("vision_gpu", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    assert module.main(["--model", "vit_tiny_patch16_224", "--depth", "1", "--images", "2", "--methods", "wanda",
                        "--levels", "2:4", "--device", "cpu"]) == 0
    assert "| 2:4 | wanda |" in capsys.readouterr().out
